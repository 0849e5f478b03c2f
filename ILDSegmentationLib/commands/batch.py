"""``ildseg segment`` over many CTs: one output folder per case and a summary table.

Cases come from CT paths (files or DICOM series folders), folders of series (each
folder below that holds DICOM files is one case, each NRRD/NIfTI/MHA file another), or
a CSV manifest (``case_id,ct[,lung_mask]``, paths relative to the CSV; a training
manifest also works, its other columns ignored). The model is loaded once for the
whole batch. Each case writes ``DIR/<case_id>/`` (labels, ``report.json``, and the
other outputs asked for), each file through a temporary name; ``DIR/summary.csv``
gets one row per case, rewritten (through a temporary name) as each case finishes.

A case that fails is reported in one line and skipped; the others go on, and the
command exits with :data:`EXIT_SOME_FAILED`. A case whose outputs are complete (its
``report.json``, written last, and every output asked for exist) is not redone on a
rerun, unless ``overwrite``: an interrupted batch resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from ..imaging.atomicfile import atomic_path
from ..classes import CLASSES
from ..errors import ILDSegError, InputError
from ..imaging.paths import safe_name

PathLike = Union[str, "os.PathLike[str]"]

#: Exit code of a batch in which some (or all) cases failed; the others' outputs are complete.
EXIT_SOME_FAILED = 3
SUMMARY_NAME = "summary.csv"
REPORT_NAME = "report.json"
DEFAULT_LABELS_NAME = "labels.seg.nrrd"
#: Image files a folder walk takes as CTs (a label map named like a CT would be refused
#: as a case by the HU check, with its reason, and the batch goes on).
_CT_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_NOT_CT_EXTENSIONS = (".seg.nrrd",)
_STRIP_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".dcm")


@dataclass
class BatchCase:
    """One CT of a batch. ``lung_mask`` None computes one."""

    case_id: str
    ct: Path
    lung_mask: Optional[Path] = None
    where: str = ""  # where it was listed, for messages


@dataclass
class CaseOutcome:
    case: BatchCase
    status: str  # "done", "skipped" (complete from an earlier run) or "failed"
    report: Optional[Dict[str, Any]] = None
    error: str = ""
    seconds: float = 0.0


@dataclass
class BatchResult:
    outcomes: List[CaseOutcome] = field(default_factory=list)
    summary: Optional[Path] = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.count("failed") else 0


# ---------------------------------------------------------------- finding the cases

def _strip_extension(name: str) -> str:
    lower = name.lower()
    for ext in _STRIP_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)]
    return name


def _holds_dicom(folder: Path) -> bool:
    from ..imaging.io import _looks_like_dicom
    try:
        return any(p.is_file() and _looks_like_dicom(p) for p in folder.iterdir())
    except OSError:
        return False


def _is_ct_file(path: Path) -> bool:
    lower = path.name.lower()
    return lower.endswith(_CT_EXTENSIONS) and not lower.endswith(_NOT_CT_EXTENSIONS)


def cases_in_folder(root: Path) -> List[BatchCase]:
    """The CTs below a folder, in name order: each folder holding DICOM files is one
    case (a series; its own subfolders are not searched), each image file another.
    The case id is the path below ``root`` with '/' as '_'. Hidden entries are skipped."""
    found: List[BatchCase] = []

    def walk(folder: Path) -> None:
        try:
            entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
        except OSError as e:
            raise InputError(f"cannot list folder {folder}: {e.strerror or e}") from None
        for p in entries:
            if p.is_dir():
                if _holds_dicom(p):
                    found.append(BatchCase(_case_id_below(root, p), p, where=str(p)))
                else:
                    walk(p)
            elif p.is_file() and _is_ct_file(p):
                found.append(BatchCase(_case_id_below(root, p), p, where=str(p)))

    walk(root)
    return found


def _case_id_below(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).parts)
    parts[-1] = _strip_extension(parts[-1])
    return safe_name("_".join(parts))


def cases_from_paths(paths: Sequence[PathLike]) -> List[BatchCase]:
    """Cases of CT paths given on the command line: a CT file or a DICOM series folder
    is one case; a folder without DICOM files directly inside is searched
    (:func:`cases_in_folder`)."""
    cases: List[BatchCase] = []
    for given in paths:
        p = Path(given)
        if p.is_dir() and not _holds_dicom(p):
            inside = cases_in_folder(p)
            if not inside:
                raise InputError(f"folder {p} holds no CT: no DICOM series and no .nrrd, .nii(.gz) or .mha file")
            cases += inside
        else:
            cases.append(BatchCase(safe_name(_strip_extension(p.resolve().name if str(given) in (".", "..")
                                                             else p.name)), p, where=str(p)))
    return cases


def read_batch_manifest(path: PathLike) -> List[BatchCase]:
    """Cases of a CSV manifest with a header naming ``ct`` and optionally ``case_id``
    and ``lung_mask`` (empty or ``auto``: computed); other columns are ignored. Paths
    are relative to the CSV. A CT that is missing fails its case, not the batch."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' "CSV UTF-8"
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise InputError(f"manifest {p.name}: not UTF-8 text; save it as CSV UTF-8") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "ct" not in header:
        raise InputError(f"manifest {p.name}: the first line must name the columns, with at least 'ct' "
                         "(and optionally 'case_id' and 'lung_mask')")
    col = {name: header.index(name) for name in ("case_id", "ct", "lung_mask") if name in header}
    cases: List[BatchCase] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise InputError(f"manifest {p.name} line {line}: expected {len(header)} columns, found {len(row)}")
        value = {name: row[i].strip() for name, i in col.items()}
        if not value["ct"]:
            raise InputError(f"manifest {p.name} line {line}: the ct column is empty")
        ct = Path(value["ct"])
        ct = ct if ct.is_absolute() else p.parent / ct
        mask_text = value.get("lung_mask", "")
        mask = None
        if mask_text and mask_text.lower() != "auto":
            mask = Path(mask_text)
            mask = mask if mask.is_absolute() else p.parent / mask
        case_id = value.get("case_id") or safe_name(_strip_extension(ct.name))
        if case_id in (".", "..") or case_id.startswith(".") or re.search(r"[/\\\x00-\x1f]", case_id):
            raise InputError(f"manifest {p.name} line {line}: case_id '{case_id}' cannot be a folder name "
                             "(no '/', '\\', leading '.' or control characters)")
        cases.append(BatchCase(case_id, ct, mask, where=f"manifest line {line}"))
    if not cases:
        raise InputError(f"manifest {p.name} lists no cases")
    return cases


def check_unique(cases: Sequence[BatchCase]) -> None:
    """Two cases would write into one folder: refused, naming both."""
    seen: Dict[str, BatchCase] = {}
    for c in cases:
        key = c.case_id.lower()  # case-insensitive file systems (macOS, Windows) would merge them
        if key in seen:
            raise InputError(f"two cases have the id '{c.case_id}' ({seen[key].where} and {c.where}): "
                             "give them distinct names (a manifest's case_id column)")
        seen[key] = c


# ---------------------------------------------------------------- outputs and resuming

def read_report(case_dir: Path) -> Optional[Dict[str, Any]]:
    """The case's report.json, or None when it is missing or not a complete JSON object."""
    try:
        report = json.loads((case_dir / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def completed_report(case: BatchCase, case_dir: Path, output_names: Iterable[str]) -> Optional[Dict[str, Any]]:
    """The report of an earlier run of this case whose outputs are all there, else None.

    The report is written last, so its presence means the labels and the other
    outputs of that run were written; each output asked for now must exist too. A
    folder holding another CT's results is refused (a rerun would overwrite them)."""
    report = read_report(case_dir)
    if report is None:
        return None
    earlier_ct = (report.get("input") or {}).get("ct")
    if earlier_ct and _same_path(earlier_ct, case.ct) is False:
        raise InputError(f"{case_dir} holds the results of another CT ({earlier_ct}): use another --out-dir, "
                         "another case id, or --overwrite")
    if not all((case_dir / name).is_file() for name in output_names):
        return None
    return report


def _same_path(a: PathLike, b: PathLike) -> Optional[bool]:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return None


def _flatten(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    """Scalars of nested dicts as 'prefix_key_subkey' columns (lists are joined)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}", v, out)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
            out[prefix] = " ".join("" if v is None else str(v) for v in value)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = "" if value is None else value


def _warnings(report: Dict[str, Any]) -> List[str]:
    """Every warning about the input the report records: the reading note (several
    series, uneven slices), the HU check's warnings, and the input checks' warnings."""
    found: List[str] = []
    given = report.get("input") or {}
    if given.get("note"):
        found.append(str(given["note"]))
    found += [str(w) for w in (given.get("hu_check") or {}).get("warnings", [])]
    # The input checks (suitability.py): a list of {check, status, detail}; those that
    # warn, said as the command says them ("<check>: <detail>").
    for item in report.get("input_checks") or []:
        if isinstance(item, dict) and item.get("status") == "warning":
            found.append(f"{str(item.get('check', '')).replace('_', ' ')}: {item.get('detail', '')}")
    return list(dict.fromkeys(found))  # in order, once each


def summary_row(outcome: CaseOutcome) -> Dict[str, Any]:
    """One row of summary.csv: the case, its status, lung volume, per class percent of
    the lung, the distribution descriptors (when the report has them), the input
    warnings, the seconds the case took (as recorded by its run) and any error."""
    case, report = outcome.case, outcome.report or {}
    row: Dict[str, Any] = {"case_id": case.case_id, "status": outcome.status, "ct": str(case.ct),
                           "lung_mask": str(case.lung_mask) if case.lung_mask else "auto"}
    row["lung_volume_ml"] = report.get("lung_volume_ml", "")
    by_label = {c.get("label"): c for c in report.get("classes", []) if isinstance(c, dict)}
    for c in CLASSES:
        row[f"percent_{c.segment_id}"] = by_label.get(c.label, {}).get("percent_of_lung", "")
    if isinstance(report.get("distribution"), dict):
        _flatten("distribution", report["distribution"], row)
    row["input_warnings"] = " | ".join(_warnings(report)) if report else ""
    seconds = (report.get("timings_s") or {}).get("total") if report else None
    row["seconds"] = round(seconds if seconds is not None else outcome.seconds, 2)
    row["device"] = report.get("device", "")
    row["model_sha256"] = (report.get("model") or {}).get("sha256", "")
    row["error"] = outcome.error
    return row


def write_summary(path: Path, outcomes: Sequence[CaseOutcome]) -> Path:
    """summary.csv through a temporary name: a reader never sees half a table."""
    return write_summary_rows(path, [summary_row(o) for o in outcomes])


def write_summary_rows(path: Path, rows: Sequence[Dict[str, Any]]) -> Path:
    """Rows of :func:`summary_row` (or read back from summary files) as summary.csv,
    columns in the one order every summary uses, through a temporary name."""
    columns: List[str] = []
    for r in rows:  # the fixed columns first, then any descriptor in first-seen order
        columns += [k for k in r if k not in columns]
    tail = ["input_warnings", "seconds", "device", "model_sha256", "error"]
    columns = [c for c in columns if c not in tail] + tail
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
    return path


# ---------------------------------------------------------------- running

@dataclass
class OutputNames:
    """File names written in each case folder (``None``: not written)."""

    labels: str = DEFAULT_LABELS_NAME
    report: str = REPORT_NAME
    dicom_seg: Optional[str] = None
    overlay: Optional[str] = None
    probabilities: Optional[str] = None
    #: Other outputs of :func:`~ILDSegmentationLib.analysis.pipeline.segment_file`: its keyword -> file name.
    extra: Dict[str, str] = field(default_factory=dict)

    def all(self) -> List[str]:
        named = (self.labels, self.dicom_seg, self.overlay, self.probabilities, *self.extra.values(), self.report)
        return [n for n in named if n]


def process_case(case: BatchCase, out_dir: PathLike, *, names: OutputNames, model: Any, overwrite: bool = False,
                 segment_options: Optional[Dict[str, Any]] = None,
                 progress: Optional[Callable[[BatchCase, float, str], None]] = None) -> CaseOutcome:
    """One case of a batch into ``out_dir/<case_id>/``: skipped when an earlier run
    completed it (unless ``overwrite``), else segmented with the loaded ``model``.

    Every engine runs each case through this function (the serial loop below, and
    each Ray worker of commands/distributed.py), so their outputs and resuming are
    the same. A case's failure (a user error, an OS error, or a bug) comes back as a
    "failed" outcome with a one-line error; a KeyboardInterrupt propagates."""
    from ..analysis.pipeline import segment_file
    from ..imaging.paths import os_error_message
    case_dir = Path(out_dir) / case.case_id
    t0 = time.perf_counter()
    outcome: CaseOutcome
    created = False
    try:
        done = None if overwrite else completed_report(case, case_dir, names.all())
        if done is not None:
            outcome = CaseOutcome(case, "skipped", report=done)
        else:
            created = not case_dir.exists()
            case_dir.mkdir(exist_ok=True)
            # Until the new report is written, the folder does not count as done.
            with contextlib.suppress(FileNotFoundError):
                (case_dir / names.report).unlink()
            case_progress = None if progress is None else (lambda f, m, c=case: progress(c, f, m))
            report = segment_file(
                case.ct, case_dir / names.labels, lung_mask=case.lung_mask, model=model,
                report=case_dir / names.report,
                dicom_seg=case_dir / names.dicom_seg if names.dicom_seg else None,
                overlay=case_dir / names.overlay if names.overlay else None,
                probabilities=case_dir / names.probabilities if names.probabilities else None,
                **{keyword: case_dir / name for keyword, name in names.extra.items()},
                progress=case_progress, **(segment_options or {}))
            outcome = CaseOutcome(case, "done", report=report)
    except ILDSegError as e:
        outcome = CaseOutcome(case, "failed", error=_one_line(str(e)))
    except OSError as e:
        outcome = CaseOutcome(case, "failed", error=_one_line(os_error_message(e)))
    except Exception as e:  # a bug on one case's data: reported, the batch goes on
        outcome = CaseOutcome(case, "failed", error=_one_line(f"internal error: {type(e).__name__}: {e}", 300))
    finally:
        if created and case_dir.is_dir() and not any(case_dir.iterdir()):
            with contextlib.suppress(OSError):
                case_dir.rmdir()  # nothing half-written: a failed new case leaves no folder
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_batch(cases: Sequence[BatchCase], out_dir: PathLike, *, names: Optional[OutputNames] = None,
              model: Any = None, overwrite: bool = False,
              segment_options: Optional[Dict[str, Any]] = None,
              on_case: Optional[Callable[[CaseOutcome, int, int], None]] = None,
              progress: Optional[Callable[[BatchCase, float, str], None]] = None,
              summary_name: str = SUMMARY_NAME) -> BatchResult:
    """Segment every case into ``out_dir/<case_id>/`` with one loaded ``model`` (a
    :class:`~ILDSegmentationLib.engine.modelfile.LoadedModel`; None loads the bundled one, once), one after
    another (:func:`process_case`).

    ``segment_options``: passed to :func:`~ILDSegmentationLib.analysis.pipeline.segment_file` for every case
    (device, max_memory_mb, pixel_spacing, ...). ``on_case(outcome, index, total)`` is
    called as each case ends; ``progress(case, fraction, message)`` within a case. A
    case's failure (a user error, an OS error, or a bug) is caught and recorded; a
    KeyboardInterrupt stops the batch (finished cases stay complete and listed)."""
    from ..engine import modelfile
    names = names or OutputNames()
    check_unique(cases)
    out = Path(out_dir)
    if model is None:
        model = modelfile.load_model()
    result = BatchResult(summary=out / summary_name)
    for index, case in enumerate(cases):
        outcome = process_case(case, out, names=names, model=model, overwrite=overwrite,
                               segment_options=segment_options, progress=progress)
        result.outcomes.append(outcome)
        write_summary(result.summary, result.outcomes)
        if on_case is not None:
            on_case(outcome, index, len(cases))
    return result


def _one_line(message: str, limit: int = 0) -> str:
    text = " ".join(message.split())
    return text if not limit or len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- the command

def _file_name(value: Optional[str], option: str) -> Optional[str]:
    """In a batch, output options name a file inside each case folder."""
    if value is None:
        return None
    if not value or Path(value).name != value or value in (".", ".."):
        raise InputError(f"in a batch, {option} names a file inside each case folder: give a file name "
                         f"such as {Path(value).name or 'out'}, not the path {value}")
    return value


def run_batch_command(args: Any) -> int:
    """``ildseg segment CT... --out-dir DIR`` / ``--manifest cases.csv``: see the module."""
    from tqdm import tqdm

    from ..engine import modelfile
    from ..engine.inference import Inferer

    if args.out_dir is None:
        raise InputError("several CTs, a folder of series or a manifest need --out-dir DIR "
                         "(one CT with -o writes one file)")
    if args.lung_mask not in (None, "auto"):
        raise InputError("in a batch each case's lung mask comes from the manifest's lung_mask column; "
                         "--lung-mask can only be 'auto' here")
    names = OutputNames(labels=_file_name(args.output, "-o") or DEFAULT_LABELS_NAME,
                        report=_file_name(args.report, "--report") or REPORT_NAME,
                        dicom_seg=_file_name(args.dicom_seg, "--dicom-seg"),
                        overlay=_file_name(args.overlay, "--overlay"),
                        probabilities=_file_name(args.probabilities, "--probabilities"))
    for keyword, flag in (("table", "--table"), ("visual_report", "--visual-report")):  # outputs segment may add
        if getattr(args, keyword, None) is not None:
            names.extra[keyword] = _file_name(getattr(args, keyword), flag)
    if len(set(names.all())) != len(names.all()):
        raise InputError("two outputs of a case have the same file name")
    cases = cases_from_paths(args.ct) + (read_batch_manifest(args.manifest) if args.manifest else [])
    if not cases:
        raise InputError("no CT given: name CT paths, a folder of series, or --manifest cases.csv")
    check_unique(cases)
    # How the batch runs (commands/distributed.py, commands/shards.py): checked before any work.
    from . import distributed, shards
    distributed.check_engine_arguments(args)
    engine = getattr(args, "engine", "local")
    if engine == "ray":
        distributed.import_ray()
    shard = shards.parse_shard(args.shard) if getattr(args, "shard", None) is not None else None
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"--out-dir {out} is a file, not a folder") from None
    summary_name = SUMMARY_NAME
    if shard is not None:
        shards.write_shard_manifest(out, *shard, cases)
        summary_name = shards.shard_stem(*shard) + ".csv"
        cases = shards.select_shard(cases, *shard)

    # Loaded once for every case; a bad model or device stops the batch before any case.
    model = modelfile.load_model(args.model)
    segment_options: Dict[str, Any] = {"device": args.device, "max_memory_mb": args.max_memory,
                                       "pixel_spacing": args.pixel_spacing}
    # Run options that the segment command may add: its attribute -> segment_file's keyword.
    for option, keyword in (("crop_box", "crop_box"), ("subpleural_band", "subpleural_band_mm"),
                            ("decision", "decision")):
        if getattr(args, option, None) is not None:
            segment_options[keyword] = getattr(args, option)
    if engine == "local":  # a Ray worker checks the device where it runs (the driver may have no GPU)
        Inferer(model, device=args.device, max_memory_mb=args.max_memory, pixel_spacing=args.pixel_spacing,
                decision=getattr(args, "decision", "paper"))
    else:  # the decision rule depends on the model file alone: refused here, before any worker starts
        from ..engine.decision import resolve_decision
        try:
            resolve_decision(getattr(args, "decision", "paper"), model.info.decision)
        except ValueError as e:
            raise InputError(f"decision rule: {e}") from None

    from ..analysis.report import model_notice
    notice = model_notice({"trained": model.info.trained, "name": model.info.name,
                           "provenance": model.info.provenance})
    if notice and not args.quiet:
        print(notice, file=sys.stderr)

    bar = tqdm(total=len(cases), unit="case", disable=True if args.quiet else None, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} cases {elapsed}<{remaining}{postfix}")

    def progress(case: BatchCase, fraction: float, message: str) -> None:
        bar.set_description_str(case.case_id[:24], refresh=False)
        bar.set_postfix_str(f"{int(fraction * 100)}% {message[:32]}")

    tally = _Tally(len(cases))

    def on_case(outcome: CaseOutcome, index: int, total: int) -> None:
        tally.add(outcome.status)
        bar.set_postfix_str(tally.line(), refresh=False)
        bar.update(1)
        c = outcome.case
        if outcome.status == "failed":
            # Always said, --quiet or not: the exit code alone does not name the case.
            bar.write(f"ildseg: case {c.case_id} failed: {outcome.error}", file=sys.stderr)
        elif not args.quiet:
            what = "already done, skipped" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f} s"
            lung = (outcome.report or {}).get("lung_volume_ml")
            bar.write(f"case {c.case_id}: {what}" + (f", lung {lung:.0f} mL" if isinstance(lung, (int, float)) else "")
                      + f"  [{tally.line()}]", file=sys.stderr)

    def workers_ready(message: str) -> None:
        tally.restart()  # the cluster's start is not a case's time
        if not args.quiet:
            bar.write(message, file=sys.stderr)

    args.batch_out_dir = str(out)
    try:
        if engine == "ray":
            result = distributed.run_ray_batch(
                cases, out, names=names, model=model, overwrite=args.overwrite, segment_options=segment_options,
                workers=args.workers, cpus_per_worker=args.cpus_per_worker, address=args.ray_address,
                summary_name=summary_name, on_case=on_case,
                on_start=workers_ready)
        else:
            result = run_batch(cases, out, names=names, model=model, overwrite=args.overwrite,
                               segment_options=segment_options, on_case=on_case, progress=progress,
                               summary_name=summary_name)
            if not cases:  # an empty shard still says so, for the merge
                write_summary(result.summary, [])
    finally:
        bar.close()
    failed, skipped, done = result.count("failed"), result.count("skipped"), result.count("done")
    if not args.quiet:
        print(f"{len(cases)} cases{f' (shard {shard[0]}/{shard[1]})' if shard else ''}: {done} done, "
              f"{skipped} already done (skipped), {failed} failed; summary in {result.summary}")
    return result.exit_code


class _Tally:
    """Cases finished so far and the time left, for the progress line. The time left
    is the cases left at the rate cases were segmented (or failed) so far, all workers
    together, counted from when the workers were ready (:meth:`restart`) or after the
    complete cases skipped at the start."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.restart()

    def restart(self) -> None:
        self.skipped_until = time.monotonic()

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "skipped" and self.counts["done"] + self.counts["failed"] == 0:
            self.skipped_until = time.monotonic()

    def line(self) -> str:
        done, skipped, failed = self.counts["done"], self.counts["skipped"], self.counts["failed"]
        left = self.total - done - skipped - failed
        worked = done + failed
        eta = "?"
        if worked and left:
            seconds = left * (time.monotonic() - self.skipped_until) / worked
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} d"
        elif not left:
            eta = "00:00:00"
        # "error", not "failed": a line holding 'failed' is a failed case's (logs are grepped for it).
        return (f"{done + skipped + failed}/{self.total} finished ({done} done, {skipped} skipped, "
                f"{failed} error{'s' * (failed != 1)}), {left} left, ETA {eta}")
