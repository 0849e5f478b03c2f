"""The six tissue classes of Anthimopoulos et al. 2018 (SPEC section 2).

Label values are those of the output label map and of training annotations:
0 is "outside the lung" in outputs and "not annotated" in annotations.
Colors follow the paper's Fig. 7 (blue, purple, green, yellow, orange, red).
Terminology codes are (coding scheme, code value, code meaning) triplets; where each
comes from (DICOM PS3.16 context groups, SNOMED CT) is in docs/terminology.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

Code = Tuple[str, str, str]

#: Category shared by the five patterns and healthy tissue in the terminology: DICOM
#: CID 7150 Segmentation Property Category, with its meaning there (Slicer's own lists
#: still say "Morphologically Altered Structure"; Slicer matches codes by scheme and value).
CATEGORY: Code = ("SCT", "49755003", "Morphologically Abnormal Structure")
#: Anatomic region of every class.
ANATOMIC_REGION: Code = ("SCT", "39607008", "Lung")


@dataclass(frozen=True)
class TissueClass:
    label: int
    name: str
    abbreviation: str
    color: Tuple[float, float, float]  # RGB in 0..1
    segment_id: str
    type_code: Code
    type_modifier: Optional[Code] = None

    @property
    def color_uint8(self) -> Tuple[int, int, int]:
        return tuple(int(round(255 * c)) for c in self.color)  # type: ignore[return-value]


CLASSES: Tuple[TissueClass, ...] = (
    # "Normal" is a type of that category in DICOM CID 7194 (Morphologically Abnormal
    # Structure Segmentation Property Type); the region says where: Lung. (Earlier
    # files used type Lung + modifier Normal, a pair no DICOM context group has; they
    # are still read as Healthy, training/annotations.py.)
    TissueClass(1, "Healthy", "H", (0.0, 0.0, 1.0), "healthy",
                ("SCT", "17621005", "Normal")),
    TissueClass(2, "Ground glass opacity", "GGO", (0.58, 0.0, 0.83), "ground_glass_opacity",
                ("DCM", "112120", "Ground glass opacity")),
    TissueClass(3, "Micronodules", "MN", (0.0, 0.8, 0.0), "micronodules",
                ("DCM", "112122", "Micronodule")),
    TissueClass(4, "Consolidation", "Cons", (1.0, 1.0, 0.0), "consolidation",
                ("SCT", "95436008", "Lung consolidation")),
    TissueClass(5, "Reticulation", "Ret", (1.0, 0.5, 0.0), "reticulation",
                ("DCM", "112113", "Reticular pattern")),
    TissueClass(6, "Honeycombing", "HC", (1.0, 0.0, 0.0), "honeycombing",
                ("DCM", "112106", "Honeycomb pattern")),
)

NUM_CLASSES = len(CLASSES)
CLASS_NAMES: Tuple[str, ...] = tuple(c.name for c in CLASSES)


def by_label(label: int) -> TissueClass:
    for c in CLASSES:
        if c.label == label:
            return c
    raise KeyError(label)
