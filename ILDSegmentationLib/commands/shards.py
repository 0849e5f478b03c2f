"""A batch split into shards (``ildseg segment ... --shard I/N``), for clusters without
Ray (a Slurm job array: one shard per array task), and their summaries merged
(``ildseg merge-summaries``).

A case belongs to shard ``1 + (first 8 bytes of sha256(lower-cased case id)) mod N``:
the same whatever the order in which the cases are listed, and a case keeps its shard
when others are added to the cohort (shard sizes are even only on average: with few
cases a shard may be empty). Every shard writes its cases into the same ``DIR/<case_id>/``
folders as the whole batch would (resuming, skipping complete cases, as always), and
two files of its own: ``DIR/summary-shard-I-of-N.csv`` (the summary of its cases) and
``DIR/summary-shard-I-of-N.json`` (which cases it holds, their places in the batch,
and a fingerprint of the whole batch's case list). The merge checks that the shards
are all there, of the same batch, each complete and none overlapping, then writes one
``summary.csv`` with the rows in the batch's order: the table the unsharded batch writes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..imaging.atomicfile import atomic_path
from .batch import SUMMARY_NAME, BatchCase, write_summary_rows
from ..errors import InputError

SHARD_STEM = "summary-shard-{index}-of-{count}"
_STEM_RE = re.compile(r"^summary-shard-(\d+)-of-(\d+)$")


def parse_shard(text: str) -> Tuple[int, int]:
    """'I/N' -> (I, N), 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise InputError(f"--shard {text}: give I/N, shard I of N, such as 1/4")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 1 <= index <= count:
        raise InputError(f"--shard {text}: I must be from 1 to N (shards are counted from 1; "
                         "with a Slurm array use --array=1-N)")
    return index, count


def shard_of(case_id: str, count: int) -> int:
    """The shard (1..count) of a case: from its id alone (lower-cased, as ids are unique
    whatever their case), so the list's order does not matter."""
    digest = hashlib.sha256(case_id.lower().encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def batch_fingerprint(cases: Sequence[BatchCase]) -> str:
    """sha256 of the batch's sorted case ids: shards of one batch carry the same."""
    ids = sorted(c.case_id.lower() for c in cases)
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def shard_stem(index: int, count: int) -> str:
    return SHARD_STEM.format(index=index, count=count)


def select_shard(cases: Sequence[BatchCase], index: int, count: int) -> List[BatchCase]:
    """The cases of shard ``index`` of ``count``, in the batch's order."""
    return [c for c in cases if shard_of(c.case_id, count) == index]


def write_shard_manifest(out_dir: Path, index: int, count: int, cases: Sequence[BatchCase]) -> Path:
    """``summary-shard-I-of-N.json``: what the merge needs to check this shard."""
    path = Path(out_dir) / f"{shard_stem(index, count)}.json"
    mine = [{"case_id": c.case_id, "position": i} for i, c in enumerate(cases)
            if shard_of(c.case_id, count) == index]
    doc = {"shard": index, "of": count, "cases_in_batch": len(cases), "batch_fingerprint": batch_fingerprint(cases),
           "cases": mine}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- merging

def _shard_files(sources: Sequence[str]) -> List[Path]:
    """The shard summaries named, or found in the folders named."""
    found: List[Path] = []
    for given in sources:
        p = Path(given)
        if p.is_dir():
            inside = sorted(q for q in p.glob("summary-shard-*-of-*.csv") if _STEM_RE.match(q.stem))
            if not inside:
                raise InputError(f"{p} holds no shard summary (summary-shard-I-of-N.csv, written by "
                                 "ildseg segment --shard I/N)")
            found += inside
        elif p.is_file() and _STEM_RE.match(p.stem) and p.suffix == ".csv":
            found.append(p)
        elif p.exists():
            raise InputError(f"{p} is not a shard summary (summary-shard-I-of-N.csv) or a folder of them")
        else:
            raise InputError(f"{p} does not exist")
    return found


def _read_shard(csv_path: Path) -> Tuple[Dict[str, Any], List[Dict[str, str]]]:
    meta_path = csv_path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        ok = isinstance(meta, dict) and all(k in meta for k in ("shard", "of", "batch_fingerprint", "cases"))
    except FileNotFoundError:
        raise InputError(f"{meta_path} is missing: the shard's list of cases is written beside its summary "
                         "(rerun the shard)") from None
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{meta_path} is not a shard's list of cases (damaged? rerun the shard)")
    m = _STEM_RE.match(csv_path.stem)
    assert m is not None
    if (int(m.group(1)), int(m.group(2))) != (meta["shard"], meta["of"]):
        raise InputError(f"{meta_path} describes shard {meta['shard']}/{meta['of']}, not the one its name says")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {csv_path}: {e}") from None
    return meta, rows


def merge_summaries(sources: Sequence[str]) -> Tuple[List[Dict[str, str]], int]:
    """The rows of the whole batch, in its order, from its shard summaries; and N.

    Refused (InputError, one line): shards of different splits or batches, a shard
    given twice, a case in two shards, a shard missing, or a shard whose summary
    lacks some of its cases (it was interrupted: rerun it)."""
    files = _shard_files(sources)
    shards: Dict[int, Tuple[Path, Dict[str, Any], List[Dict[str, str]]]] = {}
    count = fingerprint = None
    for path in files:
        meta, rows = _read_shard(path)
        index = int(meta["shard"])
        if count is None:
            count, fingerprint = int(meta["of"]), meta["batch_fingerprint"]
        elif int(meta["of"]) != count:
            raise InputError(f"shards of different splits: {path} is shard {index}/{meta['of']}, "
                             f"{files[0]} one of {count}")
        elif meta["batch_fingerprint"] != fingerprint:
            raise InputError(f"shards of different batches (another list of cases): {path} and {files[0]}")
        if index in shards:
            raise InputError(f"shard {index}/{count} given twice: {shards[index][0]} and {path}")
        shards[index] = (path, meta, rows)
    assert count is not None
    missing = [i for i in range(1, count + 1) if i not in shards]
    if missing:
        listed = ", ".join(f"{i}/{count}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {count} shards missing ({listed}): run them "
                         f"(ildseg segment ... --shard I/{count}) before merging")
    placed: Dict[str, Tuple[int, int, Dict[str, str]]] = {}  # lower-cased id -> (position, shard, row)
    for index in sorted(shards):
        path, meta, rows = shards[index]
        by_id = {r.get("case_id", "").lower(): r for r in rows}
        wanted = {c["case_id"].lower(): c for c in meta["cases"]}
        extra = sorted(set(by_id) - set(wanted))
        if extra:
            raise InputError(f"{path} has rows for cases not in shard {index}/{count} (e.g. {extra[0]})")
        lacking = [c["case_id"] for c in meta["cases"] if c["case_id"].lower() not in by_id]
        if lacking:
            raise InputError(f"shard {index}/{count} is incomplete: {len(lacking)} of its {len(wanted)} cases have "
                             f"no row in {path.name} (e.g. {lacking[0]}): rerun it to finish")
        for key, c in wanted.items():
            if key in placed:
                raise InputError(f"case {c['case_id']} is in shard {placed[key][1]}/{count} and in "
                                 f"shard {index}/{count}")
            placed[key] = (int(c["position"]), index, by_id[key])
    ordered = sorted(placed.values(), key=lambda t: t[0])
    return [row for _, _, row in ordered], count


def add_arguments(p: Any) -> None:
    p.add_argument("summaries", nargs="+", metavar="SHARD",
                   help="folders holding shard summaries (summary-shard-I-of-N.csv), or those files")
    p.add_argument("--out", metavar="summary.csv",
                   help=f"the merged table (default: {SUMMARY_NAME} in the folder of the shard summaries, "
                        "when they are all in one)")


def run(args: Any) -> int:
    """``ildseg merge-summaries``: see the module."""
    rows, count = merge_summaries(args.summaries)
    out = args.out
    if out is None:
        folders = {p.parent.resolve() for p in _shard_files(args.summaries)}
        if len(folders) != 1:
            raise InputError("the shard summaries are in several folders: name the merged table with --out FILE")
        out = folders.pop() / SUMMARY_NAME
    write_summary_rows(Path(out), rows)
    if not args.quiet:
        failed = sum(r.get("status") == "failed" for r in rows)
        print(f"{count} shards, {len(rows)} cases ({failed} failed) merged into {out}")
    return 0
