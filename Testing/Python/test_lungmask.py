"""Tests of the classical lung mask (ILDSegmentationLib.imaging.lungmask).

Real-CT tests read the shared data folder (../shared/data next to the repository,
or $ILDSEG_TEST_DATA) and skip when it is absent; the synthetic tests always run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ILDSegmentationLib.imaging.lungsides import split_left_right
from ILDSegmentationLib.errors import LungMaskError
from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view
from ILDSegmentationLib.imaging.lungmask import compute_lung_mask

DATA = Path(os.environ.get("ILDSEG_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
DICOM_DIR = DATA / "lung-pet-ct-dx-A0002"
RICORD = DATA / "ricord-000082" / "ricord-000082-5mm.nii.gz"

needs_dicom = pytest.mark.skipif(
    not DICOM_DIR.is_dir(), reason=f"real CT data not found at {DICOM_DIR} (set ILDSEG_TEST_DATA)"
)
needs_ricord = pytest.mark.skipif(
    not RICORD.is_file(), reason=f"real CT data not found at {RICORD} (set ILDSEG_TEST_DATA)"
)


def _load(image) -> Tuple[np.ndarray, Geometry]:
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


@pytest.fixture(scope="module")
def dicom_ct() -> Tuple[np.ndarray, Geometry]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(DICOM_DIR)))
    return _load(reader.Execute())


@pytest.fixture(scope="module")
def ricord_ct() -> Tuple[np.ndarray, Geometry]:
    return _load(sitk.ReadImage(str(RICORD)))


@pytest.fixture(scope="module")
def dicom_mask(dicom_ct) -> np.ndarray:
    return compute_lung_mask(*dicom_ct)


@pytest.fixture(scope="module")
def ricord_mask(ricord_ct) -> np.ndarray:
    return compute_lung_mask(*ricord_ct)


# --- helpers -------------------------------------------------------------------------

def _independent_body(canonical_hu: np.ndarray, spacing) -> np.ndarray:
    """An oracle for "inside the patient", built differently from the module: per
    slice, an opening with a 5 mm disk (cuts the table and sheets off), the largest
    2D component, holes filled."""
    r = int(round(5.0 / spacing[1]))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    disk = x ** 2 + y ** 2 <= r ** 2
    out = np.zeros(canonical_hu.shape, bool)
    for z in range(canonical_hu.shape[0]):
        tissue = ndimage.binary_opening(canonical_hu[z] > -500, disk)
        labels, n = ndimage.label(tissue)
        if n:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out[z] = ndimage.binary_fill_holes(labels == np.argmax(sizes))
    return ndimage.binary_dilation(out, np.ones((1, 3, 3), bool), iterations=max(1, int(2.0 / spacing[1])))


def _trachea_centre(canonical_hu: np.ndarray, body: np.ndarray, spacing) -> Tuple[int, int]:
    """Row, column of the trachea in the top slice (neck): of the air components
    inside the body of 50-600 mm^2 that fill at least half their bounding box (skin
    folds are slivers), the one nearest to the body's centre column."""
    air = (canonical_hu[0] < -400) & ndimage.binary_erosion(body[0], iterations=3)
    labels, n = ndimage.label(air)
    cols = np.flatnonzero(body[0].any(axis=0))
    centre = 0.5 * (cols[0] + cols[-1])
    candidates = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        pixels = np.count_nonzero(labels[sl] == lab)
        if 50 <= pixels * spacing[1] * spacing[2] <= 600 and pixels >= 0.5 * labels[sl].size:
            r, c = ndimage.center_of_mass(labels == lab)
            candidates.append((abs(c - centre), int(round(r)), int(round(c))))
    assert candidates, "no trachea in the top slice: the test needs the neck in the first slice"
    _, r, c = min(candidates)
    return r, c


def _check_plausible(hu: np.ndarray, geometry: Geometry, mask: np.ndarray) -> None:
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2}
    voxel_l = geometry.voxel_volume_ml / 1000.0
    right = np.count_nonzero(mask == 1) * voxel_l
    left = np.count_nonzero(mask == 2) * voxel_l
    total = right + left
    assert 2.0 <= total <= 8.0, f"lung volume {total:.2f} L"
    assert right > 0.25 * total and left > 0.25 * total, f"right {right:.2f} L, left {left:.2f} L"

    # Lung, not soft tissue: mostly air-density voxels (vessels and filled holes aside).
    values = hu[mask > 0]
    assert np.mean(values < -400) > 0.85
    assert -950 < values.mean() < -550
    assert not np.any(values < -1500), "mask reaches the padding outside the field of view"

    view = canonical_view(geometry)
    spacing = view.canonical_spacing(geometry)
    c_hu = view.to_canonical(hu)
    c_mask = view.to_canonical(mask)
    body = _independent_body(c_hu, spacing)
    outside = (c_mask > 0) & ~body
    assert np.count_nonzero(outside) < 1e-3 * np.count_nonzero(c_mask), "mask outside the patient"

    # Right lung on the patient's right (small canonical columns), left on the left.
    cols = np.arange(c_mask.shape[2])
    assert cols[(c_mask == 1).any(axis=(0, 1))].mean() < cols[(c_mask == 2).any(axis=(0, 1))].mean()

    # No trachea: where the trachea runs in the neck, no lung in the upper part of
    # the lungs (it runs straight down there), and the top lung slice is not one
    # central blob.
    row, col = _trachea_centre(c_hu, body, spacing)
    mask_slices = np.flatnonzero(c_mask.any(axis=(1, 2)))
    upper = mask_slices[mask_slices < mask_slices[0] + 0.3 * (mask_slices[-1] - mask_slices[0] + 1)]
    r_px, c_px = max(1, int(4.0 / spacing[1])), max(1, int(4.0 / spacing[2]))
    assert not c_mask[upper, row - r_px:row + r_px + 1, col - c_px:col + c_px + 1].any(), "trachea in the mask"
    top = c_mask[mask_slices[0]] > 0
    labels, n = ndimage.label(top)
    if n == 1:
        _, c_centre = ndimage.center_of_mass(top)
        assert abs(c_centre - col) * spacing[2] > 20.0, "top lung slice is a single central blob"


def _physical_point(geometry: Geometry, kji) -> np.ndarray:
    ijk = np.array(kji[::-1], float)
    return np.asarray(geometry.origin) + geometry.direction_matrix @ (np.asarray(geometry.spacing) * ijk)


def _reorient(hu: np.ndarray, geometry: Geometry, perm: Tuple[int, int, int], flips: Tuple[int, ...]):
    """The same CT stored with numpy axes permuted by perm and then flipped, with the
    geometry that keeps every voxel at its physical place."""
    out = np.transpose(hu, perm)
    d = geometry.direction_matrix
    sp = geometry.spacing
    # New index axis c (numpy axis 2 - c) is old numpy axis perm[2 - c], i.e. old
    # index axis 2 - perm[2 - c].
    old_index = [2 - perm[2 - c] for c in range(3)]
    new_d = np.stack([d[:, old_index[c]] for c in range(3)], axis=1)
    first = [0, 0, 0]  # old K, J, I index of the new first voxel
    for axis in flips:
        out = np.flip(out, axis=axis)
        new_d[:, 2 - axis] *= -1
        first[perm[axis]] = hu.shape[perm[axis]] - 1
    new_geometry = Geometry(
        tuple(sp[i] for i in old_index), tuple(_physical_point(geometry, first)), tuple(new_d.ravel())
    )
    return out, new_geometry


def _undo_reorient(mask: np.ndarray, perm: Tuple[int, int, int], flips: Tuple[int, ...]) -> np.ndarray:
    for axis in reversed(flips):
        mask = np.flip(mask, axis=axis)
    return np.transpose(mask, np.argsort(perm))


# --- real CT ---------------------------------------------------------------------

@needs_dicom
def test_dicom_series_gives_plausible_lungs(dicom_ct, dicom_mask):
    _check_plausible(*dicom_ct, dicom_mask)


@needs_ricord
def test_covid_ct_gives_plausible_lungs(ricord_ct, ricord_mask):
    _check_plausible(*ricord_ct, ricord_mask)


@needs_ricord
@pytest.mark.parametrize("perm, flips", [((2, 0, 1), (0,)), ((1, 0, 2), (1, 2)), ((0, 1, 2), (0, 1, 2))])
def test_mask_does_not_depend_on_index_order(ricord_ct, ricord_mask, perm, flips):
    hu, geometry = ricord_ct
    expected = ricord_mask
    moved, moved_geometry = _reorient(hu, geometry, perm, flips)
    # The helper is right: a voxel keeps its value and its physical place.
    for new_kji in [(0, 0, 0), (3, 50, 7), tuple(n - 1 for n in moved.shape)]:
        old_kji = [0, 0, 0]
        for axis, n in enumerate(new_kji):
            old_kji[perm[axis]] = moved.shape[axis] - 1 - n if axis in flips else n
        old_kji = tuple(old_kji)
        assert moved[new_kji] == hu[old_kji]
        np.testing.assert_allclose(_physical_point(moved_geometry, new_kji), _physical_point(geometry, old_kji))
    got = compute_lung_mask(moved, moved_geometry)
    assert got.shape == moved.shape
    np.testing.assert_array_equal(_undo_reorient(got, perm, flips), expected)


@pytest.mark.parametrize("which", [pytest.param("dicom", marks=needs_dicom), pytest.param("ricord", marks=needs_ricord)])
def test_right_left_split_of_real_lungs_and_of_each_lung_alone(which, request):
    """On real lungs (touching at the anterior junction in the DICOM series), the
    split of the mask's union gives back its two lungs, and each lung alone, as a
    user's one-lung mask would be, stays whole with its own side."""
    ct = request.getfixturevalue(f"{which}_ct")
    mask = canonical_view(ct[1]).to_canonical(request.getfixturevalue(f"{which}_mask"))
    assert set(np.unique(mask)) == {0, 1, 2}
    np.testing.assert_array_equal(split_left_right(mask != 0), mask)
    for side in (1, 2):
        alone = split_left_right(mask == side)
        assert set(np.unique(alone[mask == side])) == {side}
        assert (alone[mask != side] == 0).all()


def _thin_wall_and_blanket(hu: np.ndarray, geometry: Geometry, mask: np.ndarray, wall_mm: float = 3.0):
    """A real CT made into a thin patient under a blanket (canonical view, a copy):
    on the lower half of the right lung's slices, everything lateral to the right
    lung further than ``wall_mm`` from it becomes air (a chest wall of ``wall_mm``,
    thinner than the body's erosion), and a 3 mm blanket of -200 HU runs round the
    whole patient 6 mm off its former skin. Returns the CT, the right lung's slices changed,
    the air made lateral to the wall and the air under the blanket."""
    view = canonical_view(geometry)
    spacing = view.canonical_spacing(geometry)
    out = view.to_canonical(hu).copy()
    lung = view.to_canonical(mask)
    zs = np.flatnonzero((lung == 1).any(axis=(1, 2)))
    lower = zs[len(zs) // 2:]
    carved = np.zeros(out.shape, bool)
    gap = np.zeros(out.shape, bool)
    for z in lower:
        # The wall keeps its thickness from the lung of the slices above and below as
        # well: closed in 3D, as a real chest wall is.
        right = (lung[max(z - 1, 0):z + 2] == 1).any(axis=0)
        distance = ndimage.distance_transform_edt(~right, sampling=spacing[1:])
        lateral = np.zeros(right.shape, bool)
        for r in np.flatnonzero(right.any(axis=1)):
            lateral[r, :np.flatnonzero(right[r])[0]] = True  # right lung: small columns
        # The blanket follows the skin of the CT as it was (an opening would cut
        # the thinned wall off and run the blanket through the lung).
        patient = _independent_body(out[z:z + 1], spacing)[0]
        carved[z] = lateral & (distance > wall_mm)
        out[z][carved[z]] = -1000
        off_skin = ndimage.distance_transform_edt(~patient, sampling=spacing[1:])
        blanket = (off_skin > 6.0) & (off_skin <= 9.0)
        out[z][blanket] = -200
        carved[z] &= ~blanket
        gap[z] = (off_skin > 0.5) & (off_skin < 5.5) & (out[z] < -900)  # air, not the table
    assert (out[carved] == -1000).all() and gap.sum() > 0.5 * carved.sum()
    return out, lower, carved, gap


@needs_dicom
def test_lung_behind_a_thin_chest_wall_under_a_blanket_stays_in(dicom_ct, dicom_mask):
    """Issue 24 item 5: a chest wall thinner than the body's per-slice erosion at the
    base opened the body, and the whole right lung on those slices was left out. The
    lung behind it is in the mask; the air outside the thin wall and under the
    blanket is not."""
    hu, geometry = dicom_ct
    view = canonical_view(geometry)
    thin, lower, carved, gap = _thin_wall_and_blanket(hu, geometry, dicom_mask)
    # Back to the CT's own order, as a reader gives it.
    thin_kji = np.ascontiguousarray(view.from_canonical(thin))
    got = view.to_canonical(compute_lung_mask(thin_kji, geometry))
    before = view.to_canonical(dicom_mask)
    aerated = (before == 1) & (view.to_canonical(hu) < -500)
    aerated_lower = aerated[lower]
    assert aerated_lower.sum() * geometry.voxel_volume_ml > 100, "the test needs basal right lung to lose"
    kept = np.mean(got[lower][aerated_lower] == 1)
    assert kept >= 0.99, f"{100 * (1 - kept):.1f} % of the basal right lung behind the thin wall is left out"
    assert not got[carved].any(), "air outside the thinned chest wall is in the mask"
    assert not got[gap].any(), "air between the patient and the blanket is in the mask"
    # The left lung, whose wall is untouched, is as it was.
    assert np.mean(got[lower][before[lower] == 2] == 2) > 0.99


@needs_dicom
def test_input_is_not_modified_and_read_only_input_works(dicom_ct):
    hu, geometry = dicom_ct
    sample = np.ascontiguousarray(hu[8:20])  # a thorax block, fast
    before = sample.copy()
    sample.flags.writeable = False
    mask = compute_lung_mask(sample, geometry)
    np.testing.assert_array_equal(sample, before)
    assert mask.shape == sample.shape and mask.any()


@needs_dicom
def test_single_slices_give_a_mask_or_lung_mask_error(dicom_ct):
    hu, geometry = dicom_ct
    view = canonical_view(geometry)
    k_mid = hu.shape[0] // 2  # K is the axial axis of this series
    assert view.axes[0] == 0
    for k in (0, 5, k_mid, hu.shape[0] - 1):
        for single in (hu[k:k + 1], hu[k]):  # 3D with one slice, and a 2D image
            try:
                mask = compute_lung_mask(single, geometry)
            except LungMaskError as exc:
                assert "no lung" in str(exc)
                continue
            assert mask.shape == single.shape and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1, 2}
    # Mid-thorax: a single slice holds both lungs and they are found.
    mask = compute_lung_mask(hu[k_mid], geometry)
    assert np.count_nonzero(mask == 1) * np.prod(geometry.spacing[:2]) > 2000  # mm^2
    assert np.count_nonzero(mask == 2) * np.prod(geometry.spacing[:2]) > 2000


# --- synthetic -------------------------------------------------------------------

def _phantom(
    with_trachea: bool = True, with_bubble: bool = True, with_sheets: bool = False
) -> Tuple[np.ndarray, Geometry, dict]:
    """A 2 mm-voxel chest: elliptic body of soft tissue, two lung ellipsoids (-850
    HU) with a nodule in the right one, a trachea (air) from the top that branches
    into both lungs, a small air pocket between the lungs, a gas bubble under them, a table under the body, air
    around; identity direction, so K runs inferior -> superior and I runs patient
    right -> left. with_sheets: 2 mm sheets hang from the body's sides to the table,
    closing the air gap between them in every axial slice."""
    shape = (70, 100, 110)  # K, J, I
    sp = 2.0
    k, j, i = np.meshgrid(*(np.arange(n) * sp for n in shape), indexing="ij")
    hu = np.full(shape, -1000, np.int16)
    body = ((j - 95) / 75) ** 2 + ((i - 110) / 95) ** 2 <= 1
    hu[body] = 40
    hu[(j >= 178) & (j <= 184) & (np.abs(i - 110) < 100)] = 200  # table, 8 mm below the back
    right = ((k - 60) / 50) ** 2 + ((j - 95) / 45) ** 2 + ((i - 70) / 28) ** 2 <= 1
    left = ((k - 60) / 50) ** 2 + ((j - 95) / 45) ** 2 + ((i - 150) / 28) ** 2 <= 1
    hu[right | left] = -850
    nodule = (k - 60) ** 2 + (j - 95) ** 2 + (i - 70) ** 2 <= 7 ** 2  # 14 mm, inside the right lung
    hu[nodule] = 40
    # A 7 mL pocket of air in the upper mediastinum, behind the trachea (oesophagus).
    pocket = (k - 100) ** 2 + (j - 110) ** 2 + (i - 110) ** 2 <= 12 ** 2
    hu[pocket] = -1000
    parts = {"right": right, "left": left, "nodule": nodule, "pocket": pocket}
    if with_sheets:
        sheets = ((np.abs(i - 40) < 1) | (np.abs(i - 180) < 1)) & (j >= 120) & (j < 178)
        hu[sheets & (hu < -500)] = 0
        parts["gap"] = (j > 172) & (j < 176) & (np.abs(i - 110) < 60)
    if with_trachea:
        trachea = ((j - 70) ** 2 + (i - 110) ** 2 <= 8 ** 2) & (k >= 80)
        bronchi = (np.abs(k - 80) <= 3) & (np.abs(j - 70) <= 4) & (np.abs(i - 110) <= 45)
        hu[trachea | bronchi] = -1000
        parts["trachea"] = trachea & (k >= 100)
    if with_bubble:
        # About 39 mL, below the lungs: big enough to pass the size threshold.
        bubble = (k - 10) ** 2 + (j - 100) ** 2 + (i - 110) ** 2 <= 22 ** 2
        hu[bubble] = -1000
        parts["bubble"] = bubble
    return hu, Geometry((sp, sp, sp)), parts


def test_phantom_lungs_labelled_right_and_left_without_trachea_and_gas():
    hu, geometry, parts = _phantom()
    mask = compute_lung_mask(hu, geometry)
    right, left = parts["right"], parts["left"]
    assert np.mean(mask[right] == 1) > 0.97
    assert np.mean(mask[left] == 2) > 0.97
    assert not mask[parts["trachea"]].any()
    assert not mask[parts["bubble"]].any()
    assert not mask[parts["pocket"]].any()
    assert np.all(mask[parts["nodule"]] == 1), "a nodule enclosed by the lung is lung"
    extra = (mask > 0) & ~right & ~left
    assert np.count_nonzero(extra) < 0.03 * np.count_nonzero(right | left)


def test_phantom_air_between_body_and_table_is_not_lung():
    hu, geometry, parts = _phantom(with_trachea=False, with_bubble=False, with_sheets=True)
    gap = parts["gap"]
    assert np.all(hu[gap] == -1000)
    mask = compute_lung_mask(hu, geometry)
    assert not mask[gap].any()
    assert np.mean(mask[parts["right"]] == 1) > 0.97 and np.mean(mask[parts["left"]] == 2) > 0.97


def test_phantom_progress_is_reported_in_order():
    hu, geometry, _ = _phantom(with_trachea=False)
    calls = []
    compute_lung_mask(hu, geometry, progress=lambda f, m: calls.append((f, m)))
    fractions = [f for f, _ in calls]
    assert len(calls) >= 4 and fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(isinstance(m, str) and m for _, m in calls)


@pytest.mark.parametrize("value", [40, 1000, -1000, -3024])
def test_volume_without_lungs_raises_lung_mask_error(value):
    hu = np.full((20, 80, 80), value, np.int16)
    with pytest.raises(LungMaskError, match="no lung was found.*lung mask"):
        compute_lung_mask(hu, Geometry((1.5, 1.5, 5.0)))


def test_body_with_small_air_pockets_only_raises():
    hu, geometry, parts = _phantom(with_trachea=False)
    hu[parts["right"] | parts["left"]] = 40  # lungs fully consolidated: only the gas bubble is air
    with pytest.raises(LungMaskError, match="no lung was found"):
        compute_lung_mask(hu, geometry)


def test_one_slice_of_soft_tissue_raises_lung_mask_error():
    with pytest.raises(LungMaskError):
        compute_lung_mask(np.full((1, 64, 64), 40, np.int16), Geometry((0.7, 0.7, 1.0)))


def test_phantom_dense_disease_at_the_pleura_is_lung_and_the_heart_is_not():
    hu, geometry, parts = _phantom(with_trachea=False, with_bubble=False)
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in hu.shape), indexing="ij")
    # Subpleural consolidation: the lateral 8 mm of the right lung over 30 mm, soft
    # tissue like the chest wall it touches, so no aerated lung encloses it.
    plaque = parts["right"] & (i < 50) & (np.abs(j - 95) < 15) & (np.abs(k - 60) < 20)
    hu[plaque] = 40
    # The heart's impression: a soft-tissue dent 16 mm into the left lung's medial
    # side, continuous with the mediastinum.
    heart = parts["left"] & ((k - 60) ** 2 + (j - 95) ** 2 + (i - 118) ** 2 <= 20 ** 2)
    hu[heart] = 40
    mask = compute_lung_mask(hu, geometry)
    # The part of the plaque inside the chord between the aerated lung's edges
    # (i >= 45 mm here) is bridged by the right lung's hull; beyond it, the lateral
    # 1-3 mm against the curved chest wall cannot be told from the wall.
    assert np.all(mask[plaque & (i >= 45)] == 1)
    assert np.mean(mask[plaque] == 1) > 0.7
    assert np.mean(mask[heart] > 0) < 0.02  # at most the rim that step 6's 3 mm closing takes
    # Elsewhere the lungs are what they were.
    rest = (parts["right"] | parts["left"]) & ~plaque & ~heart
    assert np.mean(mask[rest] > 0) > 0.97
    assert np.count_nonzero((mask > 0) & ~parts["right"] & ~parts["left"]) < 0.03 * np.count_nonzero(rest)


@pytest.mark.parametrize("enhanced_vessel", [False, True])
def test_phantom_dense_region_deeper_than_the_limit_stays_out(enhanced_vessel):
    hu, geometry, parts = _phantom(with_trachea=False, with_bubble=False)
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in hu.shape), indexing="ij")
    # Soft tissue filling the right lung's lateral half over 64 mm (rows) and 20 mm
    # (slices), about 23 mm deep from the aerated lung left on its three sides:
    # deeper than DENSE_MAX_DEPTH_MM, like a liver dome inside a crescent of lung.
    deep = parts["right"] & (i < 74) & (np.abs(j - 95) < 32) & (np.abs(k - 60) < 10)
    hu[deep] = 40
    if enhanced_vessel:
        # A contrast-filled vessel across it must not cut it into shallow pieces.
        hu[deep & (np.abs(i - 60) < 1.5)] = 250
    mask = compute_lung_mask(hu, geometry)
    assert np.mean(mask[deep] > 0) < 0.1  # at most the rim of step 6's closing


# --- trachea and main bronchi ----------------------------------------------------

def _phantom_with_airway_against_the_lung() -> Tuple[np.ndarray, Geometry, dict]:
    """The 2 mm phantom's body and lungs (no bubble, no trachea of its own) with a
    trachea of 16 mm whose wall against the right lung leaks (a one-voxel air
    channel over 24 mm of its height, as a wall thinner than a pixel does at -400
    HU), a carina at 80 mm and two 10 mm main bronchi that run 45 degrees down and
    out into the lungs, with a 2 mm wall inside them."""
    hu, geometry, parts = _phantom(with_trachea=False, with_bubble=False)
    k, j, i = np.meshgrid(*(np.arange(n) * 2.0 for n in hu.shape), indexing="ij")
    lungs = parts["right"] | parts["left"]
    trachea = ((j - 70) ** 2 + (i - 110) ** 2 <= 8 ** 2) & (k >= 80)
    bronchi = np.zeros(hu.shape, bool)
    walls = np.zeros(hu.shape, bool)
    for side in (-1, 1):  # -1: patient right (small I)
        # Axis from the carina (80, 70, 110) down and out to (58, 76, 110 + 22 side).
        p0, p1 = np.array([80.0, 70.0, 110.0]), np.array([58.0, 76.0, 110.0 + 22 * side])
        d = p1 - p0
        t = np.clip(((k - p0[0]) * d[0] + (j - p0[1]) * d[1] + (i - p0[2]) * d[2]) / (d @ d), 0, 1)
        dist2 = (k - p0[0] - t * d[0]) ** 2 + (j - p0[1] - t * d[1]) ** 2 + (i - p0[2] - t * d[2]) ** 2
        bronchi |= dist2 <= 5 ** 2
        walls |= dist2 <= 7 ** 2
    hu[walls & lungs] = 40  # inside the lung a bronchus has its wall (2 mm)
    hu[trachea | bronchi] = -1000
    # The leak: a one-voxel channel from the trachea's right wall to the right lung.
    leak = (np.abs(j - 70) < 1) & (i > 60) & (i < 103) & (k >= 86) & (k <= 110) & ~lungs
    hu[leak] = -1000
    parts.update(trachea=trachea & ~lungs, bronchi=bronchi & ~lungs & ~trachea, leak=leak)
    return hu, geometry, parts


def test_phantom_trachea_leaking_into_a_lung_and_main_bronchi_are_not_lung():
    hu, geometry, parts = _phantom_with_airway_against_the_lung()
    lungs = parts["right"] | parts["left"]
    # The leak does join the trachea to the right lung at -400 HU: without the split
    # (step 3) the following stopped at the leak's first slice.
    labels, _ = ndimage.label(hu < -400)
    assert labels[parts["trachea"]].max() == labels[parts["right"]].max()
    mask = compute_lung_mask(hu, geometry)
    assert not mask[parts["trachea"]].any(), "trachea in the mask"
    # The main bronchi's last voxels before the lung stay in it where the branch's 2D
    # section already merges with the lung; 3 mm from the lung they are out.
    spacing = geometry.spacing[::-1]
    from_lung = ndimage.distance_transform_edt(~lungs, sampling=spacing)
    assert not mask[parts["bronchi"] & (from_lung > 3.0)].any(), "main bronchi in the mask"
    # The lungs are whole: no real lung goes with the airway.
    assert np.mean(mask[parts["right"]] == 1) > 0.97 and np.mean(mask[parts["left"]] == 2) > 0.97


# Canonical (slice, row, column) of the trachea's lumen (below -900 HU there) on
# slices where the mask took it in before step 3 split it off a lung: lidc-idri-0001
# 10 to 58 mm above its carina, cptac-lscc-c3n-00247 6 to 33 mm above it. Read off
# the images once; the files are fixed (their sha256 is in the .nrrd.json beside them).
TRACHEA_LANDMARKS = {
    "lidc-idri-0001": [(27, 248, 230), (36, 261, 230), (46, 287, 259)],
    "cptac-lscc-c3n-00247": [(22, 240, 240), (27, 252, 240), (31, 258, 243)],
}


@pytest.mark.parametrize("name", sorted(TRACHEA_LANDMARKS))
def test_real_ct_trachea_is_not_lung_where_it_used_to_be(name):
    from ILDSegmentationLib.imaging.io import read_ct
    path = DATA / name / f"{name}.nrrd"
    if not path.is_file():
        pytest.skip(f"real CT not found at {path} (set ILDSEG_TEST_DATA to the shared data folder)")
    ct = read_ct(path)
    view = canonical_view(ct.geometry)
    hu_c = view.to_canonical(ct.array)
    mask_c = view.to_canonical(compute_lung_mask(ct.array, ct.geometry))
    _, row_mm, col_mm = view.canonical_spacing(ct.geometry)
    r, c = int(round(4.0 / row_mm)), int(round(4.0 / col_mm))
    for z, row, col in TRACHEA_LANDMARKS[name]:
        assert hu_c[z, row, col] < -900, "the landmark is not in an air lumen: wrong file?"
        assert not mask_c[z, row - r:row + r + 1, col - c:col + c + 1].any(), f"trachea in the mask on slice {z}"
        # Lung on that slice is still found on both sides.
        assert np.count_nonzero(mask_c[z] == 1) > 1000 and np.count_nonzero(mask_c[z] == 2) > 1000
