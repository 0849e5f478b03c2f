"""Everything the Slicer module does to the MRML scene, without Qt or the application.

The Slicer panel (``ILDSegmentation/ILDSegmentation.py``) only wires widgets to
:func:`process`; every MRML operation lives here so that it runs, and is tested,
against Slicer's real MRML core outside the application (the ``slicer-core``
wheel). Only ``slicer`` MRML classes, their module logics' static functions and
``vtk`` are used: never ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules`` or
``qt``, which exist only inside the application. The scene is passed explicitly.

Geometry: MRML nodes are RAS, the library is LPS (:mod:`.nodes` converts); arrays
are K, J, I as ``slicer.util.arrayFromVolume`` returns them.

Transactions: :func:`process` reads the inputs, computes the lung mask and the
segmentation and the volumes *before* it touches the scene; temporary label maps
live in a private scene or in no scene at all. A cancelled or failed run therefore
leaves the user's scene exactly as it was: no new nodes, input nodes and an
existing output node untouched. Only then are the output nodes created or updated,
and a failure during that short step removes the nodes it created and restores the
output segmentation's previous content.

This module imports without Slicer (``slicer`` is looked up lazily), so the rest of
the library and its tests do not depend on it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..classes import CLASSES, NUM_CLASSES, TissueClass
from ..errors import CancelCheck, Cancelled, InputError, is_cancelled
from ..terminology import terminology_entry
from .nodes import (ijk_to_ras_matrix, list_segment_ids, lung_mask_from_node, numpy_to_vtk_matrix, require_slicer,
                    volume_array_and_geometry)

try:  # Slicer's MRML core: inside Slicer, or the slicer-core wheel outside it.
    import slicer
    import vtk
except ImportError:  # pragma: no cover - exercised only where slicer-core is absent
    slicer = None  # type: ignore[assignment]
    vtk = None  # type: ignore[assignment]

if TYPE_CHECKING:  # not imported at run time: the panel imports no torch
    from ..analysis.case import CaseResult

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]

#: Node reference roles from the output segmentation to the nodes made with it, so a
#: second run finds and updates them (and they are saved with the scene).
RESULTS_TABLE_ROLE = "ildsegResultsTable"
REGIONS_TABLE_ROLE = "ildsegRegionsTable"
PROBABILITY_ROLE = "ildsegProbabilityMap"
INPUT_VOLUME_ROLE = "ildsegInputVolume"
#: Prefix of the attributes recording how a segmentation was made.
ATTRIBUTE_PREFIX = "ILDSegmentation."

#: Column names of the results table.
COL_SEGMENT = "Segment"
COL_SEGMENT_ID = "Segment ID"
COL_VOXELS = "Voxels"
COL_VOLUME = "Volume [mL]"
COL_PERCENT = "Percent of lung [%]"
TOTAL_ROW_NAME = "Lung (total)"
TOTAL_ROW_ID = "lung"


# ---------------------------------------------------------------------------------
# Headless set-up (scripts and tests outside the Slicer application)
# ---------------------------------------------------------------------------------
class HeadlessMRML:
    """A scene plus the module logics Slicer's application would create.

    Segmentation conversion rules are registered by the Segmentations logic's
    ``SetMRMLScene``; without it ``AddEmptySegment`` silently adds nothing, so the
    logics must exist before any segmentation node. Keep this object alive as long
    as the scene is used. Inside Slicer use ``slicer.mrmlScene`` instead.
    """

    def __init__(self, scene: Any = None) -> None:
        require_slicer()
        self.scene = scene if scene is not None else slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        colors = self.app_logic.GetColorLogic()
        colors.SetMRMLScene(self.scene)
        colors.AddDefaultColorNodes()
        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.terminologies_logic = slicer.vtkSlicerTerminologiesModuleLogic()
        for name, logic in (("Volumes", self.volumes_logic), ("Segmentations", self.segmentations_logic),
                            ("SubjectHierarchy", self.subject_hierarchy_logic),
                            ("Terminologies", self.terminologies_logic)):
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(name, logic)


def load_terminology(terminologies_logic: Any, path: str) -> str:
    """Load the module's ``.term.json`` so segment terminology entries resolve to our
    context; returns the context name. Raises InputError when Slicer refuses the file."""
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if not name:
        raise InputError(f"Slicer could not load the terminology file {path}")
    return name


# ---------------------------------------------------------------------------------
# Output segmentation: six segments with fixed IDs, names, colors, terminology
# ---------------------------------------------------------------------------------
def _set_segment_properties(segment: Any, c: TissueClass) -> None:
    segment.SetName(c.name)
    segment.SetColor(*c.color)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(c))
    # Names and colors are ours, not generated: Slicer must not rename or recolor them.
    if hasattr(segment, "SetNameAutoGenerated"):
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)


def segment_tag(segment: Any, name: str) -> Optional[str]:
    """A segment's tag value (e.g. ``vtkSegment.GetTerminologyEntryTagName()``), or None."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def ensure_class_segments(segmentation_node: Any) -> None:
    """Create the six class segments (fixed IDs) that are missing and (re)set name,
    color and terminology of all six. Other segments the user added are left alone."""
    require_slicer()
    segmentation = segmentation_node.GetSegmentation()
    for c in CLASSES:
        if segmentation.GetSegment(c.segment_id) is None:
            added = segmentation.AddEmptySegment(c.segment_id, c.name, list(c.color))
            if added != c.segment_id:
                raise RuntimeError(f"Slicer did not add segment '{c.segment_id}' (got '{added}'); the segmentation "
                                   "converter rules are not registered (create the Segmentations logic first)")
        _set_segment_properties(segmentation.GetSegment(c.segment_id), c)


def _labelmap_node_like(labels: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """A label map node in no scene holding ``labels`` on the given grid; it is
    garbage collected with its last reference, so it never appears in the scene."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(labels, dtype=np.uint8))
    return node


def write_labels_to_segmentation(labels: np.ndarray, ct_node: Any, segmentation_node: Any) -> None:
    """Replace the six class segments' content by the label map (1..6 -> class).

    Uses the ``ImportLabelmapToSegmentationNode`` overload that takes segment IDs, so
    label value v goes to segment ``CLASSES[v - 1].segment_id`` and classes absent
    from ``labels`` become (or stay) empty segments. The reference geometry is the
    CT's grid (in world space when the CT is transformed).
    """
    require_slicer()
    labels = np.asarray(labels)
    if labels.shape != tuple(slicer.util.arrayFromVolume(ct_node).shape):
        raise InputError(f"label map shape {labels.shape} differs from the CT's")
    temporary = _labelmap_node_like(labels, ijk_to_ras_matrix(ct_node))
    if ct_node.GetParentTransformNode() is None:
        # Also references the CT, which the Segment Editor then offers as source volume.
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    else:  # the labels are on the CT's grid in world space
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(temporary)
    ensure_class_segments(segmentation_node)
    ids = vtk.vtkStringArray()
    for c in CLASSES:
        ids.InsertNextValue(c.segment_id)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, segmentation_node, ids):
        raise RuntimeError("Slicer could not import the label map into the segmentation")
    # Import may touch names/colors on segments it (re)creates: set ours again.
    ensure_class_segments(segmentation_node)


# ---------------------------------------------------------------------------------
# Results table
# ---------------------------------------------------------------------------------
def results_vtk_table(volumes: Dict[str, Any]) -> Any:
    """Per class name, segment ID, voxels, volume (mL), percent of lung, and a last
    row for the whole lung. Volumes are voxel count x voxel volume, unrounded."""
    require_slicer()
    voxel_ml = float(volumes["voxel_volume_ml"])
    lung_voxels = int(volumes["lung_voxels"])
    names, ids = vtk.vtkStringArray(), vtk.vtkStringArray()
    voxels, ml, percent = vtk.vtkLongLongArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
    for array, column in ((names, COL_SEGMENT), (ids, COL_SEGMENT_ID), (voxels, COL_VOXELS), (ml, COL_VOLUME),
                          (percent, COL_PERCENT)):
        array.SetName(column)
    rows = [(CLASSES[i].name, CLASSES[i].segment_id, int(entry["voxels"])) for i, entry in enumerate(volumes["classes"])]
    rows.append((TOTAL_ROW_NAME, TOTAL_ROW_ID, lung_voxels))
    for name, segment_id, n in rows:
        names.InsertNextValue(name)
        ids.InsertNextValue(segment_id)
        voxels.InsertNextValue(n)
        ml.InsertNextValue(n * voxel_ml)
        percent.InsertNextValue(100.0 * n / lung_voxels if lung_voxels else 0.0)
    table = vtk.vtkTable()
    for array in (names, ids, voxels, ml, percent):
        table.AddColumn(array)
    return table


def _describe_table(table_node: Any) -> None:
    table_node.SetColumnUnitLabel(COL_VOLUME, "mL")
    table_node.SetColumnUnitLabel(COL_PERCENT, "%")
    table_node.SetColumnDescription(COL_VOXELS, "number of voxels labelled with the class")
    table_node.SetColumnDescription(COL_VOLUME, "voxel count x voxel volume")
    table_node.SetColumnDescription(COL_PERCENT, "share of the segmented lung (all non-zero labels)")
    table_node.SetLocked(True)  # a result, not something to edit by hand


def results_from_table(table_node: Any) -> List[Dict[str, Any]]:
    """Rows of a results table as dicts (for scripts and tests)."""
    table = table_node.GetTable()
    cols = [table.GetColumn(i) for i in range(table.GetNumberOfColumns())]
    return [{c.GetName(): c.GetValue(r) for c in cols} for r in range(table.GetNumberOfRows())]


# ---------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------
@dataclass
class ProcessResult:
    segmentation_node: Any
    table_node: Any
    probability_nodes: List[Any]
    volumes: Dict[str, Any]
    lung_mask_source: str
    model_name: str
    model_trained: bool
    device: str
    seconds: float
    created_node_ids: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    #: (row, column) pixel spacing in mm the network ran at; differs from the CT's
    #: when the CT was resampled into the model's training range.
    network_pixel_spacing_mm: Optional[Tuple[float, float]] = None
    resampled: bool = False
    #: The decision rule that made the labels, in words (ILDSegmentationLib.engine.decision).
    decision: str = ""
    #: Per region x class volumes (ILDSegmentationLib.analysis.regions.TABLE_COLUMNS), or None.
    regions_table_node: Any = None
    #: One line per input check that warns (ILDSegmentationLib.analysis.suitability), and the
    #: distribution descriptors, as text lines.
    warnings: List[str] = field(default_factory=list)
    distribution: List[str] = field(default_factory=list)


def regions_vtk_table(panel: Dict[str, Any]) -> Any:
    """A vtkTable of a panel's ``columns`` and ``rows``
    (:meth:`~ILDSegmentationLib.analysis.case.CaseResult.panel`): text columns as strings,
    counts as integers, volumes and percents as doubles (NaN where none)."""
    require_slicer()
    columns, rows = list(panel["columns"]), list(panel["rows"])
    table = vtk.vtkTable()
    for index, name in enumerate(columns):
        values = [row[index] for row in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, str) for v in present):
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue("" if v is None else str(v))
        elif present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
            array = vtk.vtkLongLongArray()
            for v in values:
                array.InsertNextValue(0 if v is None else int(v))
        else:
            array = vtk.vtkDoubleArray()
            for v in values:
                array.InsertNextValue(float("nan") if v is None else float(v))
        array.SetName(name)
        table.AddColumn(array)
    return table


def _stage(progress: Optional[ProgressCallback], cancel: CancelCheck, start: float, span: float) -> ProgressCallback:
    """A progress callback for one stage that maps its 0..1 onto [start, start+span]
    and raises Cancelled when the user cancelled: every stage that reports progress
    (the lung mask too, which has no cancel argument) becomes cancellable there."""
    def callback(fraction: float, message: str) -> None:
        if is_cancelled(cancel):
            raise Cancelled("cancelled by the user; the scene was not changed")
        if progress is not None:
            progress(start + span * min(max(float(fraction), 0.0), 1.0), message)
    return callback


def _load(model: Any) -> Any:
    """None = bundled model; a path; or an already loaded model (the Slicer logic
    keeps one between runs)."""
    if model is not None and hasattr(model, "network") and hasattr(model, "info"):
        return model
    from ..engine.modelfile import load_model
    return load_model(None if model in (None, "") else model, device="cpu")


def _unique_name(scene: Any, name: str) -> str:
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def remove_node(scene: Any, node: Any) -> None:
    """Remove a node with its display and storage nodes (MRML's RemoveNode alone
    leaves those behind as orphans)."""
    if node is None or node.GetScene() is not scene:
        return
    owned = []
    if node.IsA("vtkMRMLDisplayableNode"):
        owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def _referenced(node: Any, role: str, n: int = 0) -> Any:
    return node.GetNthNodeReference(role, n) if node is not None else None


class _Commit:
    """The scene-changing step: remembers what it created and the output
    segmentation's previous content, and undoes both if anything fails."""

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self.created: List[Any] = []
        self.segmentation_backup: Any = None
        self.segmentation_node: Any = None

    def new_node(self, class_name: str, name: str) -> Any:
        node = self.scene.AddNewNodeByClass(class_name, _unique_name(self.scene, name))
        self.created.append(node)
        return node

    def backup(self, segmentation_node: Any) -> None:
        self.segmentation_node = segmentation_node
        self.segmentation_backup = slicer.vtkSegmentation()
        self.segmentation_backup.DeepCopy(segmentation_node.GetSegmentation())

    def rollback(self) -> None:
        for node in reversed(self.created):
            remove_node(self.scene, node)
        if self.segmentation_backup is not None:
            self.segmentation_node.GetSegmentation().DeepCopy(self.segmentation_backup)


def process(
    scene: Any,
    ct_node: Any,
    lung_mask_node: Any = None,
    output_segmentation_node: Any = None,
    *,
    model: Any = None,
    device: str = "auto",
    segment_ids: Optional[Sequence[str]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelCheck = None,
    probabilities: bool = False,
    max_memory_mb: float = 1024.0,
    cpu_fallback: bool = True,
    pixel_spacing: str = "model",
    crop_box: str = "mask",
    decision: str = "auto",
) -> ProcessResult:
    """Segment the ILD patterns of ``ct_node`` into a segmentation node.

    lung_mask_node: None (compute one automatically), a label map (non-zero = lung,
    any grid) or a segmentation node (``segment_ids`` chooses the lung segments;
    default all). output_segmentation_node: None creates one; an existing node is
    updated in place, together with the results table and probability maps it
    references. model: None (bundled), a model file path, or a loaded model.
    device: "auto", "cpu", "cuda", "mps". progress(fraction, message) is called
    between slice batches (the Slicer panel processes GUI events there); cancel is a
    threading.Event or a callable returning True to stop. max_memory_mb bounds one
    batch; out of GPU memory the engine halves its batches, then finishes on the CPU
    (``cpu_fallback``) or raises DeviceError. pixel_spacing: "model" runs the network
    at a pixel size within the model's training range (resampling the CT in-plane
    when outside it), "native" at the CT's own (see :class:`~ILDSegmentationLib.engine.inference.Inferer`).
    crop_box: where each lung's crop is cut, "mask" (the paper's) or "aerated"
    (:data:`~ILDSegmentationLib.engine.cropping.CROP_BOX_CHOICES`, ``ildseg segment --crop-box``).
    decision: "auto" (the model's rule for whole lungs), "paper" (the paper's argmax)
    or "prior" (:mod:`ILDSegmentationLib.engine.decision`).

    Nothing in the scene changes until everything is computed; on cancel
    (:class:`Cancelled`) or any error the scene is left exactly as it was. Input
    nodes are never modified. Returns a :class:`ProcessResult`.
    """
    require_slicer()
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    check_process_nodes(scene, ct_node, lung_mask_node, output_segmentation_node)
    stage = _stage(progress, cancel, 0.0, 0.02)
    stage(0.0, "Reading the CT")
    hu, geometry = volume_array_and_geometry(ct_node)
    timings["read"] = time.perf_counter() - t_start

    # -- model ---------------------------------------------------------------------
    t = time.perf_counter()
    stage(0.5, "Loading the model")
    loaded = _load(model)
    timings["model"] = time.perf_counter() - t

    # -- lung mask: a node's, read here; none: computed before the network -----------
    t = time.perf_counter()
    mask = None
    if lung_mask_node is None:
        stage(1.0, "Computing the lung mask")
    else:
        stage(1.0, f"Reading the lung mask '{lung_mask_node.GetName()}'")
        mask = lung_mask_from_node(lung_mask_node, ct_node, segment_ids)
        timings["lung_mask"] = time.perf_counter() - t
    source = lung_mask_description(lung_mask_node, segment_ids)

    # -- network -------------------------------------------------------------------
    from ..analysis.case import describe_labels, segment_lungs
    from ..engine.inference import Inferer

    # Out of GPU memory the engine halves its batches, then finishes on the CPU or,
    # without cpu_fallback, raises DeviceError so that the caller can ask the user.
    inferer = Inferer(loaded, device=device, max_memory_mb=max_memory_mb, cpu_fallback=cpu_fallback,
                      pixel_spacing=pixel_spacing, crop_box=crop_box,
                      decision=decision)
    result = segment_lungs(hu, geometry, mask, inferer, probabilities=probabilities,
                           mask_progress=_stage(progress, cancel, 0.02, 0.08),
                           progress=_stage(progress, cancel, 0.10, 0.85), cancel=cancel, timings=timings)
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user; the scene was not changed")

    _stage(progress, cancel, 0.96, 0.0)(0.0, "Creating the segmentation")
    if is_cancelled(cancel):  # clicked while the GUI processed that last message
        raise Cancelled("cancelled by the user; the scene was not changed")
    case = describe_labels(result, hu, geometry, inferer, timings=timings)
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user; the scene was not changed")
    return commit_results(scene, ct_node, output_segmentation_node, case, source, t_start=t_start, timings=timings,
                          progress=progress)


def check_process_nodes(scene: Any, ct_node: Any, lung_mask_node: Any, output_segmentation_node: Any) -> None:
    """The checks :func:`process` makes on its nodes before any work (one-line
    InputError): the nodes are in ``scene``, the output is a segmentation and is not
    the lung mask, the lung mask is not the CT. Shared with the background run."""
    if scene is None:
        raise InputError("no MRML scene given")
    if ct_node is not None and ct_node.GetScene() is not scene:
        raise InputError(f"the CT '{ct_node.GetName()}' is not in this scene")
    if output_segmentation_node is not None:
        if not output_segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"the output '{output_segmentation_node.GetName()}' is not a segmentation node")
        if output_segmentation_node.GetScene() is not scene:
            raise InputError(f"the output segmentation '{output_segmentation_node.GetName()}' is not in this scene")
        if lung_mask_node is not None and output_segmentation_node is lung_mask_node:
            raise InputError("the output segmentation cannot be the lung mask: choose another output "
                             "(or none to create a new one)")
    if lung_mask_node is not None and lung_mask_node is ct_node:
        raise InputError("the lung mask cannot be the CT itself")


def lung_mask_description(lung_mask_node: Any, segment_ids: Optional[Sequence[str]] = None) -> str:
    """How the lung mask was given, as recorded on the output segmentation."""
    if lung_mask_node is None:
        return "computed automatically"
    source = lung_mask_node.GetName()
    if lung_mask_node.IsA("vtkMRMLSegmentationNode"):
        chosen = list(segment_ids) if segment_ids is not None else segment_ids_of(lung_mask_node)
        source += f" (segments {', '.join(chosen)})"
    return source


def commit_results(scene: Any, ct_node: Any, output_segmentation_node: Any, case: CaseResult,
                   lung_mask_source: str, *, t_start: Optional[float] = None,
                   timings: Optional[Dict[str, float]] = None,
                   progress: Optional[ProgressCallback] = None) -> ProcessResult:
    """Write a finished run's results into the scene: the only step that changes it.

    case: the analysed CT (:class:`~ILDSegmentationLib.analysis.case.CaseResult`, made
    in this process or rebuilt from a separate process' report): its labels (uint8
    K, J, I on the CT's grid, 0 outside the lung, 1..6) go into the segmentation, its
    class volumes into the results table, its regions into a second table, its
    probabilities (float32 K, J, I, 6, or None) into probability maps, and its model,
    device and pixel size, with ``lung_mask_source``, onto the segmentation's
    attributes. output_segmentation_node None creates a segmentation; an existing one
    is updated in place with the tables and probability maps it references. A failure
    here removes the nodes it created and restores the segmentation's previous
    content. Raises InputError, writing nothing, when the CT or the output left the
    scene meanwhile (the panel stays usable during a run)."""
    require_slicer()
    t_start = time.perf_counter() if t_start is None else t_start
    timings = dict(case.timings) if timings is None else timings
    labels, volumes, probabilities, panel = case.labels, case.volumes, case.probabilities, case.panel()
    decision = str(case.decision_rule.get("description", ""))  # the rule that made the labels, in words
    # The panel stays usable during a run: the user may have deleted a node.
    for node, what in ((ct_node, "CT"), (output_segmentation_node, "output segmentation")):
        if node is not None and node.GetScene() is not scene:
            raise InputError(f"the {what} was removed from the scene during the run; nothing was written")
    labels = np.asarray(labels)
    if labels.shape != tuple(slicer.util.arrayFromVolume(ct_node).shape):
        raise InputError(f"the results ({labels.shape}) no longer fit the CT '{ct_node.GetName()}' "
                         f"({tuple(slicer.util.arrayFromVolume(ct_node).shape)}); nothing was written")
    ct_ijk_to_ras = ijk_to_ras_matrix(ct_node)
    table = results_vtk_table(volumes)
    regions_table = regions_vtk_table(panel) if panel is not None and panel.get("rows") else None
    probability_images: List[Any] = []
    if probabilities is not None:
        for i in range(NUM_CLASSES):
            holder = slicer.vtkMRMLScalarVolumeNode()
            holder.SetIJKToRASMatrix(numpy_to_vtk_matrix(ct_ijk_to_ras))
            slicer.util.updateVolumeFromArray(holder, np.ascontiguousarray(probabilities[..., i], dtype=np.float32))
            probability_images.append(holder)

    # -- commit: the only step that changes the scene --------------------------------
    t = time.perf_counter()
    commit = _Commit(scene)
    try:
        seg_node = output_segmentation_node
        if seg_node is None:
            seg_node = commit.new_node("vtkMRMLSegmentationNode", f"{ct_node.GetName()} ILD segmentation")
            seg_node.CreateDefaultDisplayNodes()
        else:
            commit.backup(seg_node)
        write_labels_to_segmentation(labels, ct_node, seg_node)

        table_node = _referenced(seg_node, RESULTS_TABLE_ROLE)
        if table_node is None or not table_node.IsA("vtkMRMLTableNode"):
            table_node = commit.new_node("vtkMRMLTableNode", f"{seg_node.GetName()} volumes")
        regions_node = _referenced(seg_node, REGIONS_TABLE_ROLE)
        if regions_table is not None and (regions_node is None or not regions_node.IsA("vtkMRMLTableNode")):
            regions_node = commit.new_node("vtkMRMLTableNode", f"{seg_node.GetName()} regions")
        probability_nodes: List[Any] = []
        for i, holder in enumerate(probability_images):
            node = _referenced(seg_node, PROBABILITY_ROLE, i)
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                node = commit.new_node("vtkMRMLScalarVolumeNode",
                                       f"{seg_node.GetName()} probability {CLASSES[i].abbreviation}")
            probability_nodes.append(node)

        # From here on only cheap swaps of data into nodes that exist.
        table_node.SetAndObserveTable(table)
        _describe_table(table_node)
        seg_node.SetNodeReferenceID(RESULTS_TABLE_ROLE, table_node.GetID())
        if regions_table is not None:
            regions_node.SetAndObserveTable(regions_table)
            regions_node.SetColumnUnitLabel("region_volume_ml", "mL")
            regions_node.SetColumnUnitLabel("volume_ml", "mL")
            regions_node.SetColumnUnitLabel("percent_of_region", "%")
            regions_node.SetColumnDescription("percent_of_region", "share of the region's lung")
            regions_node.SetLocked(True)
            seg_node.SetNodeReferenceID(REGIONS_TABLE_ROLE, regions_node.GetID())
        else:
            regions_node = None
        for i, (node, holder) in enumerate(zip(probability_nodes, probability_images)):
            node.CopyOrientation(holder)
            node.SetAndObserveImageData(holder.GetImageData())
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
            node.SetAttribute(ATTRIBUTE_PREFIX + "Class", CLASSES[i].name)
            seg_node.SetNthNodeReferenceID(PROBABILITY_ROLE, i, node.GetID())
        if not probability_nodes:
            # Maps from an earlier run no longer match this segmentation: remove them.
            stale = [seg_node.GetNthNodeReference(PROBABILITY_ROLE, i)
                     for i in range(seg_node.GetNumberOfNodeReferences(PROBABILITY_ROLE))]
            seg_node.RemoveNodeReferenceIDs(PROBABILITY_ROLE)
            for node in stale:
                remove_node(scene, node)
        seg_node.SetNodeReferenceID(INPUT_VOLUME_ROLE, ct_node.GetID())
        spacing = case.network_pixel_spacing_mm
        model = case.model
        for key, value in (("Model", str(model.get("name", ""))),
                           ("ModelTrained", str(bool(model.get("trained"))).lower()),
                           ("ModelSHA256", str(model.get("sha256") or "")), ("Device", case.device),
                           ("LungMask", lung_mask_source), ("InputVolume", ct_node.GetName()),
                           ("NetworkPixelSpacingMm", " x ".join(f"{v:.4g}" for v in spacing) if spacing else ""),
                           ("DecisionRule", decision)):
            seg_node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
        _place_in_hierarchy(scene, ct_node, commit.created)
    except BaseException:
        commit.rollback()
        raise
    timings["scene"] = time.perf_counter() - t
    if progress is not None:
        progress(1.0, "Done")
    return ProcessResult(
        segmentation_node=seg_node, table_node=table_node, probability_nodes=probability_nodes, volumes=volumes,
        lung_mask_source=lung_mask_source, model_name=str(model.get("name", "")),
        model_trained=bool(model.get("trained")), device=case.device, seconds=time.perf_counter() - t_start,
        created_node_ids=[n.GetID() for n in commit.created], timings=timings,
        network_pixel_spacing_mm=case.network_pixel_spacing_mm, resampled=case.resampled, decision=decision,
        regions_table_node=regions_node, warnings=list((panel or {}).get("warnings") or []),
        distribution=list((panel or {}).get("distribution") or []))


def segment_ids_of(segmentation_node: Any) -> List[str]:
    """All segment IDs of a segmentation node, in order."""
    return list_segment_ids(segmentation_node)


def default_lung_segment_ids(segmentation_node: Any) -> List[str]:
    """The segments whose name mentions the lung, else all segments."""
    ids = list_segment_ids(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    lungs = [i for i in ids if "lung" in (segmentation.GetSegment(i).GetName() or "").lower()]
    return lungs or ids


def lung_segment_ids_for(mask_node: Any, current_ids: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The lung segments to use once ``mask_node`` has become the lung mask: the
    current choice when it still fits this segmentation (e.g. saved with a scene),
    else :func:`default_lung_segment_ids`. None when the mask is not a segmentation
    (no mask, or a label map: there is nothing to choose)."""
    if mask_node is None or not mask_node.IsA("vtkMRMLSegmentationNode"):
        return None
    current = [str(i) for i in (current_ids or [])]
    available = set(list_segment_ids(mask_node))
    if current and all(i in available for i in current):
        return current
    return default_lung_segment_ids(mask_node)


def results_input_volume(segmentation_node: Any) -> Any:
    """The CT whose results ``segmentation_node`` holds (set by :func:`process`), or None."""
    return _referenced(segmentation_node, INPUT_VOLUME_ROLE)


def output_fits_input(segmentation_node: Any, ct_node: Any) -> bool:
    """False when ``segmentation_node`` holds the results of another CT than
    ``ct_node``: a run for ``ct_node`` must then go to a new segmentation, not
    overwrite the other CT's results (and its table, named after that CT). A
    segmentation that holds no results yet fits any CT."""
    if segmentation_node is None:
        return True
    source = results_input_volume(segmentation_node)
    return source is None or ct_node is None or source.GetID() == ct_node.GetID()


def has_segments(segmentation_node: Any) -> bool:
    """Whether there is anything to edit: a segmentation node with at least one segment."""
    return segmentation_node is not None and segmentation_node.GetSegmentation() is not None \
        and segmentation_node.GetSegmentation().GetNumberOfSegments() > 0


def _place_in_hierarchy(scene: Any, ct_node: Any, nodes: Sequence[Any]) -> None:
    """Put new output nodes next to the CT in the subject hierarchy (same study), as
    a radiologist expects in the Data module. Skipped when there is no hierarchy."""
    sh = scene.GetSubjectHierarchyNode() if hasattr(scene, "GetSubjectHierarchyNode") else None
    if sh is None:
        return
    ct_item = sh.GetItemByDataNode(ct_node)
    if not ct_item:
        return
    parent = sh.GetItemParent(ct_item)
    if not parent or parent == sh.GetSceneItemID():
        return
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:  # outside the application no plugin creates items for new nodes
            sh.CreateItem(parent, node)


__all__ = [
    "HeadlessMRML", "ProcessResult", "process", "load_terminology", "ensure_class_segments",
    "write_labels_to_segmentation", "results_vtk_table", "results_from_table", "segment_ids_of", "segment_tag",
    "remove_node", "RESULTS_TABLE_ROLE", "PROBABILITY_ROLE", "commit_results", "check_process_nodes",
    "lung_mask_description", "regions_vtk_table", "REGIONS_TABLE_ROLE",
]
