"""``ildseg evaluate``: a model against annotated cases, the way the paper scores it
(balanced accuracy over annotated lung pixels, confusion matrix), plus Dice.

Each case runs through the inference engine itself (same cropping as in use),
restricted to the annotated slices."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from ..classes import NUM_CLASSES
from ..engine.inference import Inferer
from ..engine.modelfile import LoadedModel
from .dataset import read_case
from .manifest import Case
from .metrics import confusion_matrix, summarize


def evaluate_arrays(inferer: Inferer, hu, lung_mask, annotation, geometry) -> np.ndarray:
    result = inferer.segment(hu, lung_mask, geometry, only_slices_of=annotation)
    return confusion_matrix(annotation, result.labels)


def evaluate_cases(cases: Sequence[Case], model: LoadedModel, device: str = "auto",
                   progress: Optional[Callable[[str], None]] = None, pixel_spacing: str = "model") -> Dict[str, Any]:
    inferer = Inferer(model, device=device, pixel_spacing=pixel_spacing)
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    per_case = {}
    for case in cases:
        ct, mask, annotation = read_case(case)
        cm = evaluate_arrays(inferer, ct.array, mask, annotation, ct.geometry)
        bacc = summarize(cm)["balanced_accuracy"]
        per_case[case.case_id] = None if np.isnan(bacc) else bacc  # None: no annotated voxel in its lung
        total += cm
        if progress:
            progress(f"{case.case_id}: BACC " + ("- (no annotated voxel in the lung)" if np.isnan(bacc)
                                                  else f"{bacc:.3f}"))
    report = summarize(total)
    report["per_case_balanced_accuracy"] = per_case
    report["model"] = {"file": str(model.path), "sha256": model.sha256, "name": model.info.name}
    report["device"] = inferer.device_name
    report["pixel_spacing"] = {"choice": pixel_spacing, "model_range":
                               None if model.info.pixel_spacing_mm is None else list(model.info.pixel_spacing_mm)}
    return report
