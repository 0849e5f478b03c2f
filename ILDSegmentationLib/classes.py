"""The six tissue classes of Anthimopoulos et al. 2018 (SPEC section 2).

Label values are those of the output label map and of training annotations:
0 is "outside the lung" in outputs and "not annotated" in annotations.
Colors follow the paper's Fig. 7 (blue, purple, green, yellow, orange, red).
Terminology codes are (coding scheme, code value, code meaning) triplets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

Code = Tuple[str, str, str]

#: Category shared by the five patterns and healthy tissue in the terminology.
CATEGORY: Code = ("SCT", "49755003", "Morphologically Altered Structure")
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
    TissueClass(1, "Healthy", "H", (0.0, 0.0, 1.0), "healthy",
                ("SCT", "39607008", "Lung"), ("SCT", "17621005", "Normal")),
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
