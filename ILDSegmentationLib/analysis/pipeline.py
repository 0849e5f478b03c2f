"""Files in, files out: the whole ``ildseg segment`` job as one function.

read CT (+ lung mask or compute one) -> :func:`.case.analyze_case` (engine, volumes,
regions, input checks) -> label map, probabilities, report, tables and pictures.
Every output is checked writable before the work starts, is written through a
temporary name, and is removed again if a later step fails, so a failed or
cancelled run leaves no outputs behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .. import __version__
from ..engine.inference import CancelCheck, Inferer, ProgressCallback
from ..engine.modelfile import LoadedModel, load_model
from ..errors import InputError
from ..imaging.atomicfile import atomic_path, check_writable
from ..imaging.io import (check_ct_plausible, output_kind, probability_output_kind, read_ct, read_lung_mask,
                          write_label_map, write_probabilities)
from .case import analyze_case
from .regions import DEFAULT_BAND_MM, table_csv
from .suitability import warning_lines

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


def _stage_progress(progress: Optional[ProgressCallback], start: float, span: float) -> Optional[ProgressCallback]:
    if progress is None:
        return None
    return lambda f, msg: progress(start + span * f, msg)


def segment_file(
    ct_path: PathLike,
    output: PathLike,
    *,
    lung_mask: Optional[PathLike] = None,
    model: Union[PathLike, LoadedModel, None] = None,
    device: str = "auto",
    probabilities: Optional[PathLike] = None,
    report: Optional[PathLike] = None,
    overlay: Optional[PathLike] = None,
    dicom_seg: Optional[PathLike] = None,
    table: Optional[PathLike] = None,
    visual_report: Optional[PathLike] = None,
    subpleural_band_mm: float = DEFAULT_BAND_MM,
    max_memory_mb: float = 1024,
    pixel_spacing: str = "model",
    crop_box: str = "mask",
    decision: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: CancelCheck = None,
) -> Dict[str, Any]:
    """Segment one CT file. ``lung_mask``: a label map file (non-zero = lung), or
    None / "auto" to compute one. ``pixel_spacing``: "model" or "native", see
    :class:`~ILDSegmentationLib.engine.inference.Inferer`. ``output`` named ``.dcm``, or
    ``dicom_seg``, writes a DICOM Segmentation referencing the CT's DICOM series
    (:mod:`ILDSegmentationLib.imaging.dicomseg`; refused before any work for a CT that is not DICOM). ``model``:
    a model file, None for the bundled one, or a model already loaded. ``crop_box``: "mask" (the paper's) or
    "aerated" (a box the mask's exact border does not move), see the same.
    ``decision``: "auto" (the model's rule for whole lungs), "paper" or "prior"
    (:mod:`ILDSegmentationLib.engine.decision`); the report says which ran. Returns
    the report (also written to ``report``).

    ``table``: CSV of the volumes per region and class; ``visual_report``: one-page PNG or PDF
    (needs matplotlib); ``subpleural_band_mm``: width of the subpleural band (:mod:`.regions`). The
    report holds the regional volumes, the distribution descriptors and the input checks (:mod:`.suitability`).
    """
    t0 = time.perf_counter()
    # ``output`` named .dcm, or ``dicom_seg``: a DICOM Segmentation over the CT's series.
    from ..imaging.dicomseg import check_dicom_source, is_dicom_seg_path, write_dicom_seg
    if not is_dicom_seg_path(output):
        output_kind(output)
    if dicom_seg is not None and not is_dicom_seg_path(dicom_seg):
        raise InputError(f"the DICOM SEG output is a DICOM file: name it .dcm, not {Path(dicom_seg).name}")
    if probabilities is not None:
        probability_output_kind(probabilities)
    if overlay is not None and not str(overlay).lower().endswith(".png"):
        raise InputError(f"the overlay is a PNG picture: name it .png, not {Path(overlay).name}")
    if table is not None and not str(table).lower().endswith(".csv"):
        raise InputError(f"the regions table is CSV: name it .csv, not {Path(table).name}")
    if visual_report is not None:
        from .visual_report import check_available
        check_available(visual_report)
    if not (isinstance(subpleural_band_mm, (int, float)) and 0 < subpleural_band_mm <= 100):
        raise InputError(f"the subpleural band must be wider than 0 and at most 100 mm, not {subpleural_band_mm}")
    outputs = [Path(p) for p in (output, probabilities, report, overlay, dicom_seg, table, visual_report)
               if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise InputError("two outputs have the same file name")
    for p in outputs:
        check_writable(p)
    for seg_output in (output, dicom_seg):
        if is_dicom_seg_path(seg_output):
            check_dicom_source(ct_path, seg_output)  # a NRRD CT has no series to reference
    for name, given in (("CT", ct_path), ("lung mask", None if lung_mask in (None, "auto") else lung_mask)):
        if given is not None and Path(given).resolve() in {p.resolve() for p in outputs}:
            raise InputError(f"an output would overwrite the input {name}: {given}")

    # A batch passes the model it loaded once (batch.py); a path or None loads it here.
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    inferer = Inferer(loaded, device=device, max_memory_mb=max_memory_mb, pixel_spacing=pixel_spacing,
                      crop_box=crop_box, decision=decision)
    timings: Dict[str, float] = {}

    t = time.perf_counter()
    ct = read_ct(ct_path)
    hu_check = check_ct_plausible(ct, ct_path)  # refuses a label map, an MR series, raw values...
    timings["read"] = time.perf_counter() - t
    if progress:
        progress(0.02, "CT read")

    auto = lung_mask is None or str(lung_mask) == "auto"
    mask = None  # computed by analyze_case
    if not auto:
        t = time.perf_counter()
        mask = read_lung_mask(lung_mask, ct)
        timings["lung_mask"] = time.perf_counter() - t
    case = analyze_case(ct.array, ct.geometry, mask, inferer,
                        probabilities=probabilities is not None, dicom_files=ct.dicom_files,
                        subpleural_band_mm=subpleural_band_mm, mask_progress=_stage_progress(progress, 0.02, 0.08),
                        progress=_stage_progress(progress, 0.10, 0.85), cancel=cancel, timings=timings)
    labels, probs, info = case.labels, case.probabilities, loaded.info
    for line in warning_lines(case.report()):  # said, never refused
        log.warning(f"input check: {line}")
    summary: Dict[str, Any] = {
        "ildseg_version": __version__,
        "input": {"ct": str(ct_path), "size_ijk": list(ct.image.GetSize()), "spacing_mm": list(ct.image.GetSpacing()),
                  "note": ct.description, "hu_check": hu_check},
        "lung_mask": "computed automatically (ildseg lungmask)" if auto else str(lung_mask),
        **case.report(),
        "outputs": {"labels": str(output)},
    }

    written: List[Path] = []
    try:
        t = time.perf_counter()
        for seg_output in (output, dicom_seg):
            if is_dicom_seg_path(seg_output):
                written.append(write_dicom_seg(labels, ct, seg_output, model_name=info.name,
                                               model_sha256=loaded.sha256))
        if not is_dicom_seg_path(output):
            written.append(write_label_map(labels, ct.image, output))
        if dicom_seg is not None:
            summary["outputs"]["dicom_seg"] = str(dicom_seg)
        if probabilities is not None:
            written.append(write_probabilities(probs, ct.image, probabilities))
            summary["outputs"]["probabilities"] = str(probabilities)
        if overlay is not None:
            from .overlay import render_overlay
            title = f"ILD segmentation - {Path(str(ct_path)).name} - model: {info.name}"
            written.append(render_overlay(ct.array, labels, ct.geometry, overlay, title=title))
            summary["outputs"]["overlay"] = str(overlay)
        if table is not None:
            with atomic_path(table) as tmp:
                Path(tmp).write_text(table_csv({**case.volumes, **case.regional}), encoding="utf-8")
            written.append(Path(table))
            summary["outputs"]["table"] = str(table)
        if visual_report is not None:
            from .visual_report import render_visual_report
            title = f"ILD patterns - {Path(str(ct_path)).name} - model: {info.name}"
            written.append(render_visual_report(ct.array, labels, ct.geometry, summary, visual_report, title=title,
                                                maps=case.maps))
            summary["outputs"]["visual_report"] = str(visual_report)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if report is not None:
            summary["outputs"]["report"] = str(report)
            with atomic_path(report) as tmp:
                Path(tmp).write_text(json.dumps(summary, indent=2))
            written.append(Path(report))
        # Inside the clean-up: a Ctrl-C seen by this last callback removes the outputs,
        # so that "interrupted; no output was written" stays true.
        if progress:
            progress(1.0, "done")
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    return summary
