"""One CT analysed: its labels and what they say, the same for every front end.

The command line (:func:`.pipeline.segment_file`: files in, files out) and the
Slicer logic (:func:`ILDSegmentationLib.slicer.mrml.process`: nodes in, nodes out)
both run :func:`analyze_case` on an array in HU with its geometry and read the
:class:`CaseResult`: labels, class volumes, regions and distribution, input checks,
and what ran (model, device, pixel size). The Slicer panel's run in a separate
process rebuilds the same :class:`CaseResult` from the command's report
(:meth:`CaseResult.from_report`). A new output is added here, once.

Arrays are K, J, I (a 2D J, I CT is one axial slice); geometry is LPS.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CancelCheck
from ..imaging.geometry import Geometry, as_volume, canonical_view
from .regions import DEFAULT_BAND_MM, RegionMaps, region_maps, regional_volumes
from .report import class_volumes, panel_results
from .suitability import input_checks

if TYPE_CHECKING:  # torch is imported only by what runs the network
    from ..engine.inference import Inferer, SegmentationResult

ProgressCallback = Callable[[float, str], None]

#: The report keys of :func:`~.regions.regional_volumes`.
REGIONAL_KEYS = ("regions", "sides", "depth", "distribution", "region_rules")


@dataclass
class CaseResult:
    """What one analysed CT gives, on the CT's own grid.

    labels: uint8, the CT's shape (0 outside the lung, 1..6 the classes).
    probabilities: float32, the CT's shape + (6,), or None.
    volumes: :func:`~.report.class_volumes` (lung and per class voxels, mL, percent).
    regional: :func:`~.regions.regional_volumes` (per lung, zone and depth; distribution).
    input_checks: :func:`~.suitability.input_checks` (one dict per check).
    model: file, sha256, name, trained, provenance. device: where the network ran.
    pixel_spacing: (row, column) mm of the CT and of what the network saw
    (:func:`pixel_spacing_summary`). crop_box: the crop box choice. decision_rule: the
    rule that made the labels (:func:`decision_summary`; empty for a report written
    before the rule was recorded). slices: total,
    with lung, lung crops. timings: seconds per step. maps: the region maps (side,
    zone, depth per voxel) when computed here, for pictures; None when rebuilt from
    a report.
    """

    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    volumes: Dict[str, Any]
    regional: Dict[str, Any]
    input_checks: List[Dict[str, str]]
    model: Dict[str, Any]
    device: str
    pixel_spacing: Dict[str, Any]
    crop_box: Any
    slices: Dict[str, int]
    timings: Dict[str, float] = field(default_factory=dict)
    decision_rule: Dict[str, Any] = field(default_factory=dict)
    maps: Optional[RegionMaps] = None

    @property
    def network_pixel_spacing_mm(self) -> Optional[tuple]:
        network = self.pixel_spacing.get("network")
        return tuple(network) if network else None

    @property
    def resampled(self) -> bool:
        return bool(self.pixel_spacing.get("resampled"))

    def report(self) -> Dict[str, Any]:
        """The analysis' keys of the report, in the report's order (``ildseg segment``
        adds the input, the lung mask's source, the outputs and the timings)."""
        return {**self.volumes, "model": self.model, "device": self.device, "pixel_spacing_mm": self.pixel_spacing,
                "crop_box": self.crop_box, "decision_rule": self.decision_rule, "slices": self.slices, **self.regional,
                "input_checks": self.input_checks}

    def panel(self) -> Dict[str, Any]:
        """What a results panel shows beyond the class volumes (:func:`~.report.panel_results`)."""
        return panel_results(self.report())

    @classmethod
    def from_report(cls, report: Dict[str, Any], labels: np.ndarray, geometry: Geometry,
                    probabilities: Optional[np.ndarray] = None) -> "CaseResult":
        """The result of a run made elsewhere (``ildseg segment`` in a child process)
        from the labels it wrote and its report: the class volumes are counted on the
        labels, the rest is the report's."""
        return cls(labels=np.asarray(labels), probabilities=probabilities, volumes=class_volumes(labels, geometry),
                   regional={k: report[k] for k in REGIONAL_KEYS if k in report},
                   input_checks=list(report.get("input_checks") or []), model=dict(report.get("model") or {}),
                   device=str(report.get("device", "")), pixel_spacing=dict(report.get("pixel_spacing_mm") or {}),
                   crop_box=report.get("crop_box"), slices=dict(report.get("slices") or {}),
                   timings={k: float(v) for k, v in (report.get("timings_s") or {}).items() if k != "total"},
                   decision_rule=dict(report.get("decision_rule") or {}))


def pixel_spacing_summary(result: SegmentationResult, info: Any, choice: str) -> Dict[str, Any]:
    """In-plane (row, column) pixel spacing of the CT and of what the network saw."""
    return {"ct": [round(v, 4) for v in result.ct_pixel_spacing_mm],
            "network": [round(v, 4) for v in result.network_pixel_spacing_mm],
            "resampled": result.resampled, "choice": choice,
            "model_range": None if info.pixel_spacing_mm is None else list(info.pixel_spacing_mm)}


def decision_summary(result: SegmentationResult, inferer: Inferer) -> Dict[str, Any]:
    """The report's ``decision_rule``: the rule that made the labels
    (:mod:`ILDSegmentationLib.engine.decision`), the option asked for (``choice``:
    auto, paper or prior) and the rule in words."""
    return {**result.decision.to_dict(), "choice": inferer.decision_choice, "description": result.decision.describe()}


def model_summary(loaded: Any) -> Dict[str, Any]:
    """The report's ``model``: file, sha256, name, trained, provenance."""
    info = loaded.info
    return {"file": str(getattr(loaded, "path", "")), "sha256": getattr(loaded, "sha256", ""), "name": info.name,
            "trained": info.trained, "provenance": info.provenance}


def segment_lungs(hu: np.ndarray, geometry: Geometry, mask: Optional[np.ndarray], inferer: Inferer, *,
                  probabilities: bool = False, mask_progress: Optional[ProgressCallback] = None,
                  progress: Optional[ProgressCallback] = None, cancel: CancelCheck = None,
                  timings: Optional[Dict[str, float]] = None) -> SegmentationResult:
    """The labels of one CT: ``mask`` None computes the lung mask
    (:func:`~ILDSegmentationLib.imaging.lungmask.compute_lung_mask`, reporting to
    ``mask_progress``), then the network runs over the lungs (``progress``, ``cancel``).
    Labels and probabilities come back in the CT's own shape. ``timings`` gets
    ``lung_mask`` (when computed here) and ``network`` (seconds)."""
    timings = {} if timings is None else timings
    if mask is None:
        from ..imaging.lungmask import compute_lung_mask
        t = time.perf_counter()
        mask = compute_lung_mask(hu, geometry, progress=mask_progress)
        timings["lung_mask"] = time.perf_counter() - t
    result = inferer.segment(hu, mask, geometry, probabilities=probabilities, progress=progress, cancel=cancel)
    timings["network"] = result.seconds
    # The engine treats a 2D CT as one axial slice and answers (1, J, I); outputs take
    # the CT's own shape so they can be written on its (2D) grid.
    result.labels = result.labels.reshape(np.shape(hu))
    if result.probabilities is not None:
        result.probabilities = result.probabilities.reshape(np.shape(hu) + result.probabilities.shape[-1:])
    return result


def describe_labels(result: SegmentationResult, hu: np.ndarray, geometry: Geometry, inferer: Inferer, *,
                    dicom_files: Sequence[str] = (), subpleural_band_mm: float = DEFAULT_BAND_MM,
                    timings: Optional[Dict[str, float]] = None) -> CaseResult:
    """What the labels say: class volumes, regions and distribution, and the input
    checks (``dicom_files``: the CT's DICOM files, whose tags some checks read)."""
    timings = {} if timings is None else timings
    labels = result.labels
    volumes = class_volumes(labels, geometry)
    info = inferer.model.info
    t = time.perf_counter()
    view = canonical_view(geometry)
    maps = region_maps(view.to_canonical(as_volume(labels)), view.canonical_spacing(geometry), subpleural_band_mm)
    regional = regional_volumes(labels, geometry, maps=maps)
    checks = input_checks(hu, labels, geometry, dicom_files=dicom_files, model_pixel_range=info.pixel_spacing_mm,
                          network_pixel_mm=result.network_pixel_spacing_mm)
    timings["regions"] = time.perf_counter() - t
    return CaseResult(labels=labels, probabilities=result.probabilities, volumes=volumes, regional=regional,
                      input_checks=checks, model=model_summary(inferer.model), device=result.device,
                      pixel_spacing=pixel_spacing_summary(result, info, inferer.pixel_spacing),
                      crop_box=inferer.crop_box, decision_rule=decision_summary(result, inferer),
                      slices={"total": result.slices_total, "with_lung": result.slices_with_lung,
                              "lung_crops": result.crops},
                      timings=timings, maps=maps)


def analyze_case(hu: np.ndarray, geometry: Geometry, mask: Optional[np.ndarray], inferer: Inferer, *,
                 probabilities: bool = False, dicom_files: Sequence[str] = (),
                 subpleural_band_mm: float = DEFAULT_BAND_MM, mask_progress: Optional[ProgressCallback] = None,
                 progress: Optional[ProgressCallback] = None, cancel: CancelCheck = None,
                 timings: Optional[Dict[str, float]] = None) -> CaseResult:
    """Segment one CT (HU, K, J, I) and say what its labels show: :func:`segment_lungs`
    then :func:`describe_labels` (see both for the arguments)."""
    timings = {} if timings is None else timings
    result = segment_lungs(hu, geometry, mask, inferer, probabilities=probabilities, mask_progress=mask_progress,
                           progress=progress, cancel=cancel, timings=timings)
    return describe_labels(result, hu, geometry, inferer, dicom_files=dicom_files,
                           subpleural_band_mm=subpleural_band_mm, timings=timings)
