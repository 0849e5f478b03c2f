"""Everything the Slicer module does to the MRML scene, without Qt or the application.

The Slicer panel (``ILDSegmentation/ILDSegmentation.py``) only wires widgets to
:func:`process`; every MRML operation lives here so that it runs, and is tested,
against Slicer's real MRML core outside the application (the ``slicer-core``
wheel). Only ``slicer`` MRML classes, their module logics' static functions and
``vtk`` are used: never ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules`` or
``qt``, which exist only inside the application. The scene is passed explicitly.

Geometry: MRML nodes are RAS, the library is LPS (see :mod:`.geometry`); arrays
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .classes import CLASSES, NUM_CLASSES, TissueClass
from .errors import CancelCheck, Cancelled, InputError, LungMaskError, is_cancelled
from .geometry import Geometry, canonical_view
from .report import class_volumes
from .terminology import terminology_entry

try:  # Slicer's MRML core: inside Slicer, or the slicer-core wheel outside it.
    import slicer
    import vtk
except ImportError:  # pragma: no cover - exercised only where slicer-core is absent
    slicer = None  # type: ignore[assignment]
    vtk = None  # type: ignore[assignment]

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

#: RAS <-> LPS: flip x and y.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Column names of the results table.
COL_SEGMENT = "Segment"
COL_SEGMENT_ID = "Segment ID"
COL_VOXELS = "Voxels"
COL_VOLUME = "Volume [mL]"
COL_PERCENT = "Percent of lung [%]"
TOTAL_ROW_NAME = "Lung (total)"
TOTAL_ROW_ID = "lung"


def _require_slicer() -> None:
    if slicer is None:
        raise ImportError("ILDSegmentationLib.mrml needs Slicer's MRML classes: run it inside 3D Slicer "
                          "or install the slicer-core wheel (pip install slicer-core)")


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
        _require_slicer()
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
# Geometry: MRML (RAS, IJKToRAS) <-> library (LPS Geometry)
# ---------------------------------------------------------------------------------
def _vtk_to_numpy_matrix(m: Any) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_vtk_matrix(a: np.ndarray) -> Any:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras_matrix(node: Any, world: bool = True) -> np.ndarray:
    """4x4 IJK -> RAS of a volume node; with ``world``, through its linear parent
    transforms (a CT moved by a registration is segmented where it is shown).
    Non-linear transforms are refused: the grid would no longer be a grid."""
    _require_slicer()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = _vtk_to_numpy_matrix(m)
    parent = node.GetParentTransformNode() if world else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"'{node.GetName()}' is under a non-linear transform; harden the transform "
                             "(Data module, right-click, Harden transform) and try again")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _vtk_to_numpy_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> Geometry:
    """The LPS :class:`Geometry` of an IJK -> RAS matrix (spacing = column lengths)."""
    lps = _RAS_LPS @ np.asarray(ijk_to_ras, dtype=float)
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume's IJK-to-RAS matrix is degenerate (zero spacing)")
    direction = axes / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError("the volume's grid is sheared (non-orthogonal axes, e.g. by a transform); "
                         "resample it onto a regular grid first")
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:3, 3]),
                    tuple(float(v) for v in direction.ravel()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`geometry_from_ijk_to_ras`."""
    lps = np.eye(4)
    lps[:3, :3] = geometry.direction_matrix * np.asarray(geometry.spacing, dtype=float)
    lps[:3, 3] = geometry.origin
    return _RAS_LPS @ lps


def set_volume_geometry(node: Any, geometry: Geometry) -> None:
    """Place a volume node's grid (spacing, origin, directions) from an LPS Geometry."""
    _require_slicer()
    node.SetIJKToRASMatrix(_numpy_to_vtk_matrix(ijk_to_ras_from_geometry(geometry)))


def volume_geometry(node: Any, world: bool = True) -> Geometry:
    return geometry_from_ijk_to_ras(ijk_to_ras_matrix(node, world=world))


def _check_scalar_volume(node: Any, what: str) -> None:
    if node is None:
        raise InputError(f"no {what} selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{node.GetName()}' ({node.GetClassName()}) is not a scalar volume; select a {what}")
    image = node.GetImageData()
    if image is None or 0 in image.GetDimensions():
        raise InputError(f"'{node.GetName()}' holds no image data")
    components = image.GetNumberOfScalarComponents()
    if components != 1 or node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputError(f"'{node.GetName()}' has {components} components per voxel (a colour, vector or "
                         f"multi-frame volume); select a scalar {what}")


def volume_array_and_geometry(ct_node: Any) -> Tuple[np.ndarray, Geometry]:
    """A copy of a CT node's voxels (K, J, I, HU) and its LPS geometry (world space).

    Refuses what the engine cannot segment with a one-line message: no node, a label
    map, a vector/colour/4D volume, no voxels, a single non-axial slice (2D
    sagittal or coronal image), non-finite values. A single axial slice is accepted.
    """
    _require_slicer()
    _check_scalar_volume(ct_node, "CT volume")
    if ct_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{ct_node.GetName()}' is a label map, not a CT; select the CT volume as input")
    geometry = volume_geometry(ct_node)
    array = np.array(slicer.util.arrayFromVolume(ct_node), copy=True)  # never a view on the input
    if array.ndim != 3:
        raise InputError(f"'{ct_node.GetName()}' is not a 3D volume (array of {array.ndim} dimensions)")
    view = canonical_view(geometry)
    rows, cols = array.shape[view.axes[1]], array.shape[view.axes[2]]
    if rows < 2 or cols < 2:
        raise InputError(f"'{ct_node.GetName()}' is a single sagittal or coronal slice ({array.shape[::-1]} "
                         "voxels I, J, K); ILD segmentation works on axial slices")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"'{ct_node.GetName()}' has {array.dtype} voxels; expected a CT in HU")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"'{ct_node.GetName()}' contains NaN or infinite values")
    return array, geometry


# ---------------------------------------------------------------------------------
# Lung mask from a label map or a segmentation node
# ---------------------------------------------------------------------------------
def resample_nearest(source: np.ndarray, source_ijk_to_ras: np.ndarray, target_shape: Sequence[int],
                     target_ijk_to_ras: np.ndarray, fill: int = 0) -> np.ndarray:
    """Nearest-neighbour resampling of a K, J, I array onto another grid.

    Both grids are given by their IJK -> RAS matrices (any orientation, spacing and
    extent). Target voxels outside the source get ``fill``. Works one target slice
    at a time so memory stays at a few slice-sized arrays.
    """
    source = np.asarray(source)
    target_shape = tuple(int(s) for s in target_shape)
    a = np.linalg.inv(np.asarray(source_ijk_to_ras, dtype=float)) @ np.asarray(target_ijk_to_ras, dtype=float)
    if source.shape == target_shape and np.allclose(a, np.eye(4), atol=1e-6):
        return source.copy()
    out = np.full(target_shape, fill, dtype=source.dtype)
    nk, nj, ni = target_shape
    sk, sj, si = source.shape
    jj, ii = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
    # Source index (i, j, k) of target voxel (i, j, k) is affine: a @ [i, j, k, 1].
    plane = [a[r, 0] * ii + a[r, 1] * jj + a[r, 3] for r in range(3)]
    for k in range(nk):
        idx = [np.floor(plane[r] + a[r, 2] * k + 0.5).astype(np.int64) for r in range(3)]
        valid = (idx[0] >= 0) & (idx[0] < si) & (idx[1] >= 0) & (idx[1] < sj) & (idx[2] >= 0) & (idx[2] < sk)
        if valid.any():
            out[k][valid] = source[idx[2][valid], idx[1][valid], idx[0][valid]]
    return out


def lung_mask_from_labelmap_node(mask_node: Any, ct_node: Any) -> np.ndarray:
    """uint8 0/1 lung mask (every non-zero voxel is lung) on the CT's grid.

    A mask on another grid (spacing, extent, orientation, linear transform) is
    resampled with nearest neighbour; a mask that does not reach the CT raises
    LungMaskError. The mask node is not modified.
    """
    _require_slicer()
    _check_scalar_volume(mask_node, "lung mask label map")
    _check_scalar_volume(ct_node, "CT volume")
    name = mask_node.GetName()
    mask = np.asarray(slicer.util.arrayFromVolume(mask_node)) != 0
    if not mask.any():
        raise LungMaskError(f"the lung mask '{name}' is empty")
    ct_shape = tuple(slicer.util.arrayFromVolume(ct_node).shape)
    out = resample_nearest(mask.astype(np.uint8), ijk_to_ras_matrix(mask_node), ct_shape, ijk_to_ras_matrix(ct_node))
    if not out.any():
        raise LungMaskError(f"the lung mask '{name}' does not overlap the CT '{ct_node.GetName()}' "
                            "(check that both come from the same scan)")
    return out


def _segment_ids(segmentation_node: Any) -> List[str]:
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segments_to_array(segmentation_node: Any, segment_ids: Sequence[str], reference_node: Any) -> np.ndarray:
    """K, J, I array on the reference volume's grid: segment ``segment_ids[n]`` has
    value n + 1 (0 elsewhere; where segments overlap, the later one wins).

    ``ExportSegmentsToLabelmapNode`` does the work, but on a private copy of the
    segmentation and a private stand-in for the reference grid, both in a private
    scene: exporting from the node itself would add a color table to the user's
    scene and a reference to the node, and the export of a segmentation that has
    only surfaces would add a labelmap representation to it. The input node is
    therefore never modified. Both nodes' own (untransformed) frames are used: the
    caller checks they are under the same transform.
    """
    _require_slicer()
    segment_ids = [str(s) for s in segment_ids]
    private = slicer.vtkMRMLScene()
    copy = slicer.vtkMRMLSegmentationNode()
    private.AddNode(copy)
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    grid = slicer.vtkMRMLScalarVolumeNode()  # the reference grid, without voxels
    private.AddNode(grid)
    grid.CopyOrientation(reference_node)
    extent = vtk.vtkImageData()
    extent.SetExtent(reference_node.GetImageData().GetExtent())
    grid.SetAndObserveImageData(extent)
    exported = slicer.vtkMRMLLabelMapVolumeNode()
    private.AddNode(exported)
    ids = vtk.vtkStringArray()
    for s in segment_ids:
        ids.InsertNextValue(s)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            copy, ids, exported, grid, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        raise InputError(f"could not export segments {', '.join(segment_ids)} of "
                         f"'{segmentation_node.GetName()}' onto the grid of '{reference_node.GetName()}'")
    if exported.GetImageData() is None:
        return np.zeros(tuple(slicer.util.arrayFromVolume(reference_node).shape), np.uint8)
    array = np.array(slicer.util.arrayFromVolume(exported), copy=True)
    reference_shape = tuple(slicer.util.arrayFromVolume(reference_node).shape)
    # The export uses the reference grid; resampling is a no-op unless it was cropped.
    return resample_nearest(array, ijk_to_ras_matrix(exported, world=False), reference_shape,
                            ijk_to_ras_matrix(reference_node, world=False))


def lung_mask_from_segmentation_node(segmentation_node: Any, ct_node: Any,
                                     lung_segment_ids: Optional[Sequence[str]] = None) -> np.ndarray:
    """uint8 0/1 lung mask on the CT's grid from the chosen segments (default: all).

    Exported with ``ExportSegmentsToLabelmapNode`` and the CT as reference geometry
    (see :func:`segments_to_array`): the user's scene gets no temporary nodes and the
    segmentation node is not modified.
    """
    _require_slicer()
    _check_scalar_volume(ct_node, "CT volume")
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("the lung mask must be a label map or a segmentation node")
    name = segmentation_node.GetName()
    available = _segment_ids(segmentation_node)
    if lung_segment_ids is None:
        chosen = available
    else:
        chosen = [str(s) for s in lung_segment_ids]
        if not chosen:
            raise InputError(f"no lung segment chosen in '{name}'")
        unknown = [s for s in chosen if s not in available]
        if unknown:
            raise InputError(f"segment(s) {', '.join(unknown)} not found in '{name}'")
    if not chosen:
        raise LungMaskError(f"the lung mask segmentation '{name}' has no segments")
    if segmentation_node.GetTransformNodeID() != ct_node.GetTransformNodeID():
        raise InputError(f"the lung mask '{name}' and the CT are under different transforms; "
                         "harden the transforms first")

    labels = segments_to_array(segmentation_node, chosen, ct_node)
    out = (labels != 0).astype(np.uint8)
    if not out.any():
        raise LungMaskError(f"the lung segments {', '.join(chosen)} of '{name}' are empty or do not overlap "
                            f"the CT '{ct_node.GetName()}'")
    return out


def lung_mask_from_node(mask_node: Any, ct_node: Any, lung_segment_ids: Optional[Sequence[str]] = None) -> np.ndarray:
    """Dispatch on the node type: segmentation node or label map (any scalar volume)."""
    _require_slicer()
    if mask_node is None:
        raise InputError("no lung mask node given")
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        return lung_mask_from_segmentation_node(mask_node, ct_node, lung_segment_ids)
    if mask_node.IsA("vtkMRMLScalarVolumeNode"):
        return lung_mask_from_labelmap_node(mask_node, ct_node)
    raise InputError(f"'{mask_node.GetName()}' ({mask_node.GetClassName()}) cannot be a lung mask; "
                     "use a label map or a segmentation")


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
    _require_slicer()
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
    node.SetIJKToRASMatrix(_numpy_to_vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(labels, dtype=np.uint8))
    return node


def write_labels_to_segmentation(labels: np.ndarray, ct_node: Any, segmentation_node: Any) -> None:
    """Replace the six class segments' content by the label map (1..6 -> class).

    Uses the ``ImportLabelmapToSegmentationNode`` overload that takes segment IDs, so
    label value v goes to segment ``CLASSES[v - 1].segment_id`` and classes absent
    from ``labels`` become (or stay) empty segments. The reference geometry is the
    CT's grid (in world space when the CT is transformed).
    """
    _require_slicer()
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
    _require_slicer()
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
    #: The decision rule that made the labels, in words (engine/decision.py).
    decision: str = ""
    #: Per region x class volumes (ILDSegmentationLib.regions.TABLE_COLUMNS), or None.
    regions_table_node: Any = None
    #: One line per input check that warns (ILDSegmentationLib.suitability), and the
    #: distribution descriptors, as text lines.
    warnings: List[str] = field(default_factory=list)
    distribution: List[str] = field(default_factory=list)


def panel_summary(labels: np.ndarray, geometry: Geometry, hu: Optional[np.ndarray] = None,
                  model_pixel_range: Optional[Sequence[float]] = None,
                  network_pixel_mm: Optional[Sequence[float]] = None,
                  report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the panel shows beyond the class volumes: the regions table rows, the
    distribution descriptors and the input-check warnings
    (:func:`~.report.panel_results`). From a run's ``report`` (ildseg segment's JSON)
    when given, else computed here from the labels (and the CT in HU for the input
    checks) as ``ildseg segment`` computes them."""
    from .report import class_volumes, panel_results

    if report is None:
        from .regions import regional_volumes
        from .suitability import input_checks

        report = {**class_volumes(labels, geometry), **regional_volumes(labels, geometry)}
        if hu is not None:
            report["input_checks"] = input_checks(hu, labels, geometry, model_pixel_range=model_pixel_range,
                                                  network_pixel_mm=network_pixel_mm)
    return panel_results(report)


def regions_vtk_table(panel: Dict[str, Any]) -> Any:
    """A vtkTable of :func:`panel_summary`'s ``columns`` and ``rows``: text columns as
    strings, counts as integers, volumes and percents as doubles (NaN where none)."""
    _require_slicer()
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
    from .modelfile import load_model
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
    when outside it), "native" at the CT's own (see :class:`~.inference.Inferer`).
    decision: "auto" (the model's rule for whole lungs), "paper" (the paper's argmax)
    or "prior" (:mod:`.engine.decision`).

    Nothing in the scene changes until everything is computed; on cancel
    (:class:`Cancelled`) or any error the scene is left exactly as it was. Input
    nodes are never modified. Returns a :class:`ProcessResult`.
    """
    _require_slicer()
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

    # -- lung mask -----------------------------------------------------------------
    t = time.perf_counter()
    if lung_mask_node is None:
        from .lungmask import compute_lung_mask
        stage(1.0, "Computing the lung mask")
        mask = compute_lung_mask(hu, geometry, progress=_stage(progress, cancel, 0.02, 0.08))
        source = "computed automatically"
    else:
        stage(1.0, f"Reading the lung mask '{lung_mask_node.GetName()}'")
        mask = lung_mask_from_node(lung_mask_node, ct_node, segment_ids)
        source = lung_mask_description(lung_mask_node, segment_ids)
    timings["lung_mask"] = time.perf_counter() - t

    # -- network -------------------------------------------------------------------
    t = time.perf_counter()
    from .inference import Inferer

    # Out of GPU memory the engine halves its batches, then finishes on the CPU or,
    # without cpu_fallback, raises DeviceError so that the caller can ask the user.
    inferer = Inferer(loaded, device=device, max_memory_mb=max_memory_mb, cpu_fallback=cpu_fallback,
                      pixel_spacing=pixel_spacing, decision=decision)
    result = inferer.segment(hu, mask, geometry, probabilities=probabilities,
                             progress=_stage(progress, cancel, 0.10, 0.85), cancel=cancel)
    timings["network"] = time.perf_counter() - t
    volumes = class_volumes(result.labels, geometry)
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user; the scene was not changed")

    _stage(progress, cancel, 0.96, 0.0)(0.0, "Creating the segmentation")
    if is_cancelled(cancel):  # clicked while the GUI processed that last message
        raise Cancelled("cancelled by the user; the scene was not changed")
    info = loaded.info
    t = time.perf_counter()
    panel = panel_summary(result.labels, geometry, hu, model_pixel_range=info.pixel_spacing_mm,
                          network_pixel_mm=result.network_pixel_spacing_mm)
    timings["regions"] = time.perf_counter() - t
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user; the scene was not changed")
    return commit_results(
        scene, ct_node, output_segmentation_node, result.labels, volumes,
        result.probabilities if probabilities else None,
        RunInfo(model_name=info.name, model_trained=bool(info.trained), model_sha256=getattr(loaded, "sha256", ""),
                device=result.device, lung_mask_source=source,
                network_pixel_spacing_mm=result.network_pixel_spacing_mm, resampled=result.resampled,
                decision=result.decision.describe()),
        t_start=t_start, timings=timings, progress=progress, panel=panel)


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


@dataclass
class RunInfo:
    """What a finished run records on its output segmentation (model, device, lung
    mask, pixel size the network ran at), wherever it ran: in this process or in a
    separate one (:mod:`.background`)."""

    model_name: str
    model_trained: bool
    model_sha256: str
    device: str
    lung_mask_source: str
    network_pixel_spacing_mm: Optional[Tuple[float, float]] = None
    resampled: bool = False
    decision: str = ""


def commit_results(scene: Any, ct_node: Any, output_segmentation_node: Any, labels: np.ndarray,
                   volumes: Dict[str, Any], probabilities: Optional[np.ndarray], run: RunInfo, *,
                   t_start: Optional[float] = None, timings: Optional[Dict[str, float]] = None,
                   progress: Optional[ProgressCallback] = None,
                   panel: Optional[Dict[str, Any]] = None) -> ProcessResult:
    """Write a finished run's results into the scene: the only step that changes it.

    labels: uint8 K, J, I on the CT's grid (0 outside the lung, 1..6); volumes: as
    :func:`~.report.class_volumes`; probabilities: float32 K, J, I, 6 or None.
    output_segmentation_node None creates a segmentation; an existing one is updated
    in place with the tables and probability maps it references. ``panel``
    (:func:`panel_summary`): the regions table (a second table node) and the input
    warnings to return. A failure here removes
    the nodes it created and restores the segmentation's previous content. Raises
    InputError, writing nothing, when the CT or the output left the scene meanwhile
    (the panel stays usable during a run)."""
    _require_slicer()
    t_start = time.perf_counter() if t_start is None else t_start
    timings = {} if timings is None else timings
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
            holder.SetIJKToRASMatrix(_numpy_to_vtk_matrix(ct_ijk_to_ras))
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
        spacing = run.network_pixel_spacing_mm
        for key, value in (("Model", run.model_name), ("ModelTrained", str(bool(run.model_trained)).lower()),
                           ("ModelSHA256", run.model_sha256), ("Device", run.device),
                           ("LungMask", run.lung_mask_source), ("InputVolume", ct_node.GetName()),
                           ("NetworkPixelSpacingMm", " x ".join(f"{v:.4g}" for v in spacing) if spacing else ""),
                           ("DecisionRule", run.decision)):
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
        lung_mask_source=run.lung_mask_source, model_name=run.model_name, model_trained=bool(run.model_trained),
        device=run.device, seconds=time.perf_counter() - t_start,
        created_node_ids=[n.GetID() for n in commit.created], timings=timings,
        network_pixel_spacing_mm=run.network_pixel_spacing_mm, resampled=run.resampled, decision=run.decision,
        regions_table_node=regions_node, warnings=list((panel or {}).get("warnings") or []),
        distribution=list((panel or {}).get("distribution") or []))


def segment_ids_of(segmentation_node: Any) -> List[str]:
    """All segment IDs of a segmentation node, in order."""
    return _segment_ids(segmentation_node)


def default_lung_segment_ids(segmentation_node: Any) -> List[str]:
    """The segments whose name mentions the lung, else all segments."""
    ids = _segment_ids(segmentation_node)
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
    available = set(_segment_ids(mask_node))
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
    "HeadlessMRML", "ProcessResult", "process", "load_terminology", "volume_array_and_geometry", "volume_geometry",
    "geometry_from_ijk_to_ras", "ijk_to_ras_from_geometry", "ijk_to_ras_matrix", "set_volume_geometry",
    "resample_nearest", "lung_mask_from_node", "lung_mask_from_labelmap_node", "lung_mask_from_segmentation_node",
    "ensure_class_segments", "write_labels_to_segmentation", "results_vtk_table", "results_from_table",
    "segment_ids_of", "segments_to_array", "segment_tag", "remove_node", "RESULTS_TABLE_ROLE", "PROBABILITY_ROLE",
    "RunInfo", "commit_results", "check_process_nodes", "lung_mask_description", "panel_summary",
    "regions_vtk_table", "REGIONS_TABLE_ROLE",
]
