"""MRML volumes and segmentations <-> arrays with their LPS geometry, without Qt.

- Geometry: a volume node's IJK -> RAS matrix (in world space when transformed) <->
  the library's :class:`~ILDSegmentationLib.imaging.geometry.Geometry` (LPS).
- A CT node's array in HU (K, J, I, as ``slicer.util.arrayFromVolume`` returns it),
  checked: a scalar volume, finite values.
- A lung mask from a label map or from segments of a segmentation node, on any grid,
  resampled (nearest neighbour) onto the CT's.

Only ``slicer`` MRML classes and ``vtk`` are used (the application or the slicer-core
wheel); this module imports without them, and :func:`require_slicer` says what is
missing when they are needed.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, LungMaskError
from ..imaging.geometry import Geometry, canonical_view

try:  # Slicer's MRML core: inside Slicer, or the slicer-core wheel outside it.
    import slicer
    import vtk
except ImportError:  # pragma: no cover - exercised only where slicer-core is absent
    slicer = None  # type: ignore[assignment]
    vtk = None  # type: ignore[assignment]

#: RAS <-> LPS: flip x and y.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require_slicer() -> None:
    if slicer is None:
        raise ImportError("ILDSegmentationLib.slicer needs Slicer's MRML classes: run it inside 3D Slicer "
                          "or install the slicer-core wheel (pip install slicer-core)")


# ---------------------------------------------------------------------------------
# Geometry: MRML (RAS, IJKToRAS) <-> library (LPS Geometry)
# ---------------------------------------------------------------------------------
def _vtk_to_numpy_matrix(m: Any) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_vtk_matrix(a: np.ndarray) -> Any:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras_matrix(node: Any, world: bool = True) -> np.ndarray:
    """4x4 IJK -> RAS of a volume node; with ``world``, through its linear parent
    transforms (a CT moved by a registration is segmented where it is shown).
    Non-linear transforms are refused: the grid would no longer be a grid."""
    require_slicer()
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
    require_slicer()
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(ijk_to_ras_from_geometry(geometry)))


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
    require_slicer()
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
    require_slicer()
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


def list_segment_ids(segmentation_node: Any) -> List[str]:
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
    require_slicer()
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
    require_slicer()
    _check_scalar_volume(ct_node, "CT volume")
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("the lung mask must be a label map or a segmentation node")
    name = segmentation_node.GetName()
    available = list_segment_ids(segmentation_node)
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
    require_slicer()
    if mask_node is None:
        raise InputError("no lung mask node given")
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        return lung_mask_from_segmentation_node(mask_node, ct_node, lung_segment_ids)
    if mask_node.IsA("vtkMRMLScalarVolumeNode"):
        return lung_mask_from_labelmap_node(mask_node, ct_node)
    raise InputError(f"'{mask_node.GetName()}' ({mask_node.GetClassName()}) cannot be a lung mask; "
                     "use a label map or a segmentation")


__all__ = [
    "require_slicer", "list_segment_ids", "numpy_to_vtk_matrix", "volume_array_and_geometry", "volume_geometry",
    "geometry_from_ijk_to_ras", "ijk_to_ras_from_geometry", "ijk_to_ras_matrix", "set_volume_geometry",
    "resample_nearest", "lung_mask_from_node", "lung_mask_from_labelmap_node", "lung_mask_from_segmentation_node",
    "segments_to_array",
]
