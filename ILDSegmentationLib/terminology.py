"""DICOM/SNOMED terminology of the six classes in Slicer's serialized form.

Slicer stores a segment's terminology as one string:
``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``
where each coded item is ``scheme^value^meaning``. The context name matches the
terminology file shipped with the Slicer module (Resources/ILDSegmentation.term.json).
"""
from __future__ import annotations

from typing import Optional

from .classes import ANATOMIC_REGION, CATEGORY, Code, TissueClass

TERMINOLOGY_CONTEXT = "ILD Segmentation - Anthimopoulos 2018 lung tissue classes"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _code(code: Optional[Code]) -> str:
    return "^".join(code) if code else "^^"


def terminology_entry(c: TissueClass) -> str:
    return "~".join((
        TERMINOLOGY_CONTEXT, _code(CATEGORY), _code(c.type_code), _code(c.type_modifier),
        ANATOMIC_CONTEXT, _code(ANATOMIC_REGION), _code(None),
    ))


def parse_terminology_entry(entry: str) -> dict:
    """The codes of a serialized entry: {category, type, type_modifier, region} -> (scheme, value, meaning)."""
    parts = entry.rstrip("|").split("~")
    if len(parts) < 7:
        raise ValueError(f"not a terminology entry: {entry!r}")

    def code(s: str):
        f = s.split("^")
        return tuple(f) if len(f) == 3 and f[1] else None

    return {"context": parts[0], "category": code(parts[1]), "type": code(parts[2]),
            "type_modifier": code(parts[3]), "region": code(parts[5])}
