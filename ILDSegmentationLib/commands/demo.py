"""``ildseg demo``: the whole path on a built-in case, with no input at all.

The case is made by code (no patient data may be shipped): the synthetic chest CT
of :mod:`ILDSegmentationLib.simulation.phantom` with ILD patterns inserted by
:mod:`ILDSegmentationLib.simulation.simulate`, so the truth is known and the demo can
print how well the model does on it. The demo writes the CT and the truth next to
the result so both can be opened in 3D Slicer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..engine.inference import ProgressCallback
from ..imaging.images import write_image
from ..imaging.io import write_label_map
from ..simulation.phantom import make_chest_phantom
from ..analysis.pipeline import segment_file

PathLike = Union[str, "os.PathLike[str]"]
DEMO_SEED = 0


def make_demo_case(seed: int = DEMO_SEED):
    """(CT image in HU, dense truth 0..6 as a uint8 array K,J,I)."""
    from ..simulation.simulate import simulate_case
    phantom = make_chest_phantom(seed=seed)
    sim = simulate_case(phantom.hu, phantom.geometry, lung_mask=phantom.lung_labels, seed=seed)
    image = sitk.GetImageFromArray(sim.hu)
    g = phantom.geometry
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(g.direction)
    return image, sim.truth


def run_demo(out: PathLike, model: Optional[PathLike] = None, device: str = "auto", max_memory_mb: float = 1024,
             pixel_spacing: str = "model", decision: str = "auto",
             progress: Optional[ProgressCallback] = None) -> Dict[str, Any]:
    """Write demo_ct.nrrd, demo_truth.seg.nrrd, segmentation.seg.nrrd, report.json and
    overlay.png into ``out``; return the report with ``demo_balanced_accuracy``.
    ``decision``: the decision rule (:mod:`ILDSegmentationLib.engine.decision`), as for ``ildseg segment``."""
    from ..training.metrics import confusion_matrix, summarize
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ct_image, truth = make_demo_case()
    ct_path = write_image(ct_image, out / "demo_ct.nrrd")
    write_label_map(truth, ct_image, out / "demo_truth.seg.nrrd")
    summary = segment_file(ct_path, out / "segmentation.seg.nrrd", model=model, device=device,
                           report=out / "report.json", overlay=out / "overlay.png",
                           max_memory_mb=max_memory_mb, pixel_spacing=pixel_spacing, decision=decision,
                           progress=progress)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.seg.nrrd")))
    scores = summarize(confusion_matrix(truth, predicted))
    summary["demo_balanced_accuracy"] = scores["balanced_accuracy"]
    summary["demo_per_class_accuracy"] = scores["per_class_accuracy"]
    summary["case"] = {"what": "synthetic chest CT (ildseg phantom) with simulated ILD patterns, made by code",
                       "size_ijk": list(ct_image.GetSize()), "spacing_mm": list(ct_image.GetSpacing()),
                       "truth_classes_present": sorted(int(v) for v in np.unique(truth) if v)}
    return summary
