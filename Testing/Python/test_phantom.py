"""The synthetic chest CT of ``ildseg demo`` (ILDSegmentationLib.simulation.phantom).

The default phantom is built once per module (about 2 s); determinism is checked on
a coarser grid of the same anatomy so the tests stay fast.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view
from ILDSegmentationLib.simulation.grids import VoxelGrid, voxel_tube_coverage
from ILDSegmentationLib.simulation.phantom import Phantom, make_chest_phantom

SMALL = dict(size=96, n_slices=28, spacing=(3.8, 3.8, 10.0))  # same chest, coarse grid


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_chest_phantom(seed=0)


def _x_mm(p: Phantom) -> np.ndarray:
    """LPS x (mm) of each column I (identity direction): + is patient left."""
    return p.geometry.origin[0] + p.geometry.spacing[0] * np.arange(p.hu.shape[2])


def _body(hu: np.ndarray) -> np.ndarray:
    """The patient's cross-section per axial slice (tissue with its holes filled)."""
    return np.stack([ndimage.binary_fill_holes(s > -500) for s in hu])


def test_shape_dtype_geometry(phantom):
    p = phantom
    assert p.hu.shape == (56, 256, 256)
    assert p.hu.dtype == np.int16
    assert p.lung_labels.shape == p.hu.shape and p.lung_labels.dtype == np.uint8
    assert p.truth.shape == p.hu.shape and p.truth.dtype == np.uint8
    assert isinstance(p.geometry, Geometry)
    assert p.geometry.spacing == pytest.approx((1.4, 1.4, 5.0))
    np.testing.assert_allclose(p.geometry.direction_matrix, np.eye(3))
    # The volume is centred on the LPS origin.
    centre = np.asarray(p.geometry.origin) + np.asarray(p.geometry.spacing) * (np.array(p.hu.shape[::-1]) - 1) / 2
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)
    # Axial slices are stacked along K: the canonical view is the array itself.
    view = canonical_view(p.geometry)
    assert view.axes == (0, 1, 2) and view.flips == (True, False, False)


def test_arguments_set_the_grid():
    p = make_chest_phantom(seed=0, **SMALL)
    assert p.hu.shape == (28, 96, 96)
    assert p.geometry.spacing == pytest.approx((3.8, 3.8, 10.0))
    # The anatomy is in millimetres, so a coarse grid holds the same lungs.
    litres = (p.lung_labels > 0).sum() * p.geometry.voxel_volume_ml / 1000
    assert 2.0 < litres < 8.0


def test_deterministic_for_a_seed_and_different_for_another():
    a = make_chest_phantom(seed=3, **SMALL)
    b = make_chest_phantom(seed=3, **SMALL)
    c = make_chest_phantom(seed=4, **SMALL)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lung_labels, b.lung_labels)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert a.geometry == b.geometry
    assert not np.array_equal(a.hu, c.hu)
    # Not just the noise: the anatomy differs between patients too.
    assert not np.array_equal(a.lung_labels, c.lung_labels)


def test_air_outside_and_soft_tissue_inside(phantom):
    hu = phantom.hu
    corner = hu[:, :20, :20]
    assert -1030 < np.median(corner) < -970
    body = _body(hu)
    tissue = hu[body & (phantom.lung_labels == 0)]
    # Mostly fat (about -100) and muscle, blood, liver (+40..+60).
    assert np.mean((tissue > -150) & (tissue < 100)) > 0.8
    assert np.mean((tissue > -150) & (tissue < -50)) > 0.1  # there is fat
    assert np.mean((tissue > 0) & (tissue < 100)) > 0.3  # and soft tissue


def test_lungs_are_at_lung_hu_with_plausible_volume(phantom):
    p = phantom
    lung = p.lung_labels > 0
    assert -900 <= np.median(p.hu[lung]) <= -750
    litres = lung.sum() * p.geometry.voxel_volume_ml / 1000
    assert 2.0 <= litres <= 8.0
    # Each lung is one piece, and lungs are found over most of the scan's height.
    for label in (1, 2):
        _, n = ndimage.label(p.lung_labels == label)
        assert n == 1
    slices_with_lung = np.flatnonzero(lung.any(axis=(1, 2)))
    assert slices_with_lung.size * p.geometry.spacing[2] > 200  # mm: an adult lung is 20-30 cm tall


def test_right_lung_is_label_1_at_smaller_i(phantom):
    p = phantom
    assert set(np.unique(p.lung_labels)) == {0, 1, 2}
    cols_right = np.nonzero(p.lung_labels == 1)[2]
    cols_left = np.nonzero(p.lung_labels == 2)[2]
    # Patient right is -x in LPS; with the identity direction that is smaller I.
    assert cols_right.max() < cols_left.min()
    x = _x_mm(p)
    assert x[cols_right].mean() < -50 and x[cols_left].mean() > 50
    # The heart takes room from the left lung, not the right.
    assert (p.lung_labels == 1).sum() > (p.lung_labels == 2).sum()


def test_lungs_are_narrow_at_the_apex_and_wide_at_the_base(phantom):
    for label in (1, 2):
        lung = phantom.lung_labels == label
        width = lung.any(axis=1).sum(axis=1)  # columns spanned, per slice
        ks = np.flatnonzero(width)
        top, bottom = ks[-1], ks[0]  # K increases towards the head
        height = top - bottom
        assert width[top - height // 10] < 0.75 * width.max()
        widest = np.flatnonzero(width >= 0.98 * width.max())
        assert widest.mean() < bottom + height / 2  # the widest slices are in the lower half


def test_bone_posteriorly(phantom):
    hu = phantom.hu
    size = hu.shape[1]
    bone = hu > 300
    assert bone.any()
    posterior = bone[:, size // 2:, :]
    # The spine runs through every slice, behind the centre of the body.
    assert np.all(posterior.sum(axis=(1, 2)) > 20)
    centre = slice(size // 2 - 20, size // 2 + 20)
    assert np.all(bone[:, size // 2:, centre].any(axis=(1, 2)))
    # Ribs: bone round the chest wall, just outside each lung, on both sides, in the
    # lower chest too (below the scapulae and clavicles).
    z = phantom.geometry.origin[2] + phantom.geometry.spacing[2] * np.arange(hu.shape[0])
    x = _x_mm(phantom)
    area = (phantom.lung_labels > 0).sum(axis=(1, 2))
    lower = (z < 0) & (area > 0.3 * area.max())
    shell = ndimage.binary_dilation(phantom.lung_labels > 0, structure=np.ones((1, 11, 11), bool))
    rib_bone = bone & shell
    for side in (x < -60, x > 60):  # mm from the midline, clear of the spine
        per_slice = rib_bone[lower][:, :, side].sum(axis=(1, 2))
        assert np.all(per_slice > 5)
    # No bone inside the lungs.
    assert not (bone & (phantom.lung_labels > 0)).any()


def test_trachea_is_air_in_the_mediastinum_not_lung(phantom):
    p = phantom
    hu = p.hu
    body = _body(hu)
    x = _x_mm(p)
    midline = np.abs(x) < 30.0  # mm
    voxel_mm2 = p.geometry.spacing[0] * p.geometry.spacing[1]
    for k in range(hu.shape[0] - 3, hu.shape[0]):  # the top slices
        air = (hu[k] < -900) & body[k] & (p.lung_labels[k] == 0)
        area = air[:, midline].sum() * voxel_mm2
        assert 100 < area < 600, f"slice {k}: {area} mm^2 of air in the mediastinum"  # an 18 mm trachea: ~250
    # The airway goes on inside the lungs as bronchi: air lumens among the vessels.
    lung = p.lung_labels > 0
    assert (hu[lung] < -950).sum() > 100


def test_lung_labels_only_where_hu_is_low_or_vessel(phantom):
    p = phantom
    lung = p.lung_labels > 0
    hu = p.hu[lung]
    dense = hu > -500
    # Vessels and bronchial walls (soft tissue, about +40) are a small part of the lung ...
    assert 0.005 < dense.mean() < 0.10
    # ... and no denser than blood (no bone, no contrast), nor do they touch the
    # outside of the lung except at the hilum: most dense lung voxels are enclosed.
    assert hu.max() < 250
    # Dense lung voxels are tubes: thin in plane, so each is next to aerated lung
    # within a few mm (a blob of tissue labelled lung would not be).
    aerated = (p.hu < -700) & lung
    near_air = ndimage.binary_dilation(aerated, structure=np.ones((1, 9, 9), bool))
    dense_mask = lung & (p.hu > -500)
    assert (dense_mask & ~near_air).sum() < 0.02 * dense_mask.sum()
    # The converse: aerated voxels inside the body that are not lung are only the
    # trachea and main bronchi.
    body = _body(p.hu)
    unlabelled_air = body & ~lung & (p.hu < -700)
    assert unlabelled_air.sum() < 0.02 * lung.sum()


def test_truth_is_healthy_exactly_in_the_lungs(phantom):
    p = phantom
    assert set(np.unique(p.truth)) == {0, 1}
    np.testing.assert_array_equal(p.truth == 1, p.lung_labels > 0)


def test_tube_coverage_is_a_partial_volume_cylinder():
    grid = VoxelGrid((10, 40, 40), (1.0, 1.0, 5.0), (-19.5, -19.5, -22.5))
    # A horizontal tube of radius 4 mm and length 20 mm, along x at y = 0, z = 0.
    cov = voxel_tube_coverage(grid, np.array([[-10.0, 0.0, 0.0]]), np.array([[10.0, 0.0, 0.0]]),
                              np.array([4.0]), np.array([4.0]))
    assert cov.dtype == np.float32 and cov.shape == (10, 40, 40)
    assert 0.0 <= cov.min() and cov.max() <= 1.0
    # Volume (with round caps) = pi r^2 L + 4/3 pi r^3.
    expected = np.pi * 16 * 20 + 4 / 3 * np.pi * 64
    assert cov.sum() * 5.0 == pytest.approx(expected, rel=0.1)
    # A 4 mm tube between two 5 mm slices fills neither: each holds part of it (about
    # 2 of its 5 mm), as in a real thick-slice CT; the slices beyond hold nothing.
    thin = voxel_tube_coverage(grid, np.array([[-10.0, 0.0, 0.0]]), np.array([[10.0, 0.0, 0.0]]),
                               np.array([2.0]), np.array([2.0]))
    k_below, k_above = 4, 5  # slice centres at z = -2.5 and +2.5 mm
    for k in (k_below, k_above):
        assert 0.2 < thin[k, 19, 20] < 0.6
    assert thin[k_below, 19, 20] + thin[k_above, 19, 20] == pytest.approx(0.8, abs=0.15)
    assert thin[k_above + 1].max() == 0 and thin[k_below - 1].max() == 0
    assert cov[:, 19, 35].max() == 0 and thin[:, 19, 35].max() == 0
