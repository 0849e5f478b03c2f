"""The manifest: a CSV with the header ``case_id,ct,lung_mask,annotation``, and
optionally a fifth column ``scan``.

Paths are relative to the CSV's folder or absolute; ``lung_mask`` may be ``auto``.
``scan`` names the scan (the patient's CT) a case comes from; cases of one scan are
never split across folds, so that no patient is both trained and validated on. Empty
or absent, each case is its own scan. ``ildseg simulate`` fills it: cases simulated in
one CT share their scan. Every problem names the case and the line of the CSV.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ..errors import InputError

HEADER = ["case_id", "ct", "lung_mask", "annotation"]
SCAN_COLUMN = "scan"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Case:
    case_id: str
    ct: Path
    lung_mask: Optional[Path]  # None: compute automatically
    annotation: Path
    line: int
    scan: str = ""  # the scan it comes from; "" reads as case_id (see ``scan_id``)

    @property
    def scan_id(self) -> str:
        """The scan's name, for people: the scan column, or the case id."""
        return self.scan or self.case_id

    @property
    def scan_key(self) -> tuple:
        """What groups cases: a case without a scan is its own scan, even when another
        case names a scan of the same text as this case's id."""
        return ("scan", self.scan) if self.scan else ("case", self.case_id)

    def where(self) -> str:
        return f"case '{self.case_id}' (manifest line {self.line})"


def read_manifest(path: PathLike) -> List[Case]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"manifest not found: {p}")
    try:
        # utf-8-sig: spreadsheet programs save "CSV UTF-8" with a byte-order mark.
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"manifest {p.name}, line {line}: not UTF-8 text; save it as CSV UTF-8") from None
    header = [c.strip() for c in rows[0]] if rows else []
    if header not in (HEADER, HEADER + [SCAN_COLUMN]):
        raise InputError(f"manifest {p.name}: first line must be '{','.join(HEADER)}' "
                         f"(optionally followed by ',{SCAN_COLUMN}')")
    n_columns = len(header)
    base = p.parent
    cases: List[Case] = []
    seen = set()
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != n_columns:
            raise InputError(f"manifest {p.name} line {line}: expected {n_columns} columns, found {len(row)}")
        case_id, ct, mask, ann, *scan = (c.strip() for c in row)
        if not case_id or case_id in seen:
            raise InputError(f"manifest {p.name} line {line}: case_id '{case_id}' is empty or repeated")
        seen.add(case_id)

        def resolve(value: str, what: str) -> Path:
            q = Path(value)
            q = q if q.is_absolute() else base / q
            if not q.exists():
                raise InputError(f"case '{case_id}' (manifest line {line}): {what} not found: {q}")
            return q

        cases.append(Case(case_id, resolve(ct, "CT"), None if mask in ("", "auto") else resolve(mask, "lung mask"),
                          resolve(ann, "annotation"), line, scan[0] if scan else ""))
    if not cases:
        raise InputError(f"manifest {p.name} lists no cases")
    return cases


def manifest_sha256(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(path: PathLike, rows: List[List[str]]) -> None:
    """Rows of four columns, or five with the scan."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER + [SCAN_COLUMN] if rows and len(rows[0]) == 5 else HEADER)
        w.writerows(rows)
