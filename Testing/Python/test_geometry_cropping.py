from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.engine.cropping import CROP_MARGIN, crop_boxes
from ILDSegmentationLib.imaging.lungsides import LEFT_LUNG, RIGHT_LUNG, split_left_right
from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.imaging.geometry import Geometry, axial_axis, canonical_view

from synthetic import array_and_geometry, sitk_volume, two_lungs


def _reoriented_images():
    hu, _ = two_lungs()
    base = sitk_volume(hu)
    yield base
    for order in itertools.permutations(range(3)):
        for flips in ((False, False, False), (True, False, True), (False, True, True)):
            yield sitk.Flip(sitk.PermuteAxes(base, order), flips)


def test_canonical_view_is_the_same_whatever_the_index_order():
    images = list(_reoriented_images())
    reference = canonical_view(Geometry.from_sitk(images[0])).to_canonical(sitk.GetArrayFromImage(images[0]))
    for image in images[1:]:
        arr, geo = array_and_geometry(image)
        view = canonical_view(geo)
        np.testing.assert_array_equal(view.to_canonical(arr), reference)
        np.testing.assert_array_equal(view.from_canonical(view.to_canonical(arr)), arr)


def test_axial_axis_follows_the_direction_cosines_not_k():
    # Index axes: I -> x, J -> z (tilted 20 degrees), K -> y: axial slices stack along J.
    t = np.deg2rad(20)
    d = np.array([[1, 0, 0], [0, np.sin(t), np.cos(t)], [0, np.cos(t), -np.sin(t)]])
    geo = Geometry((0.7, 2.5, 0.7), (0, 0, 0), tuple(d.ravel()))
    assert axial_axis(geo) == 1  # numpy axis of J in a K,J,I array
    assert axial_axis(Geometry((1, 1, 1))) == 0


def test_canonical_rows_run_anterior_to_posterior_and_columns_right_to_left():
    # LPS identity: I increases to patient left, J to posterior: already canonical,
    # except slices, which go head first.
    view = canonical_view(Geometry((1, 1, 1)))
    assert view.axes == (0, 1, 2) and view.flips == (True, False, False)
    # A RAS-like storage (I to the right, J anterior) is flipped in-plane.
    view = canonical_view(Geometry((1, 1, 1), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    assert view.flips[1:] == (True, True)


@pytest.mark.parametrize("spacing,direction", [((0, 1, 1), None), ((1, 1, float("nan")), None),
                                               ((1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 0))])
def test_invalid_geometry_is_refused(spacing, direction):
    with pytest.raises(InputError):
        Geometry(spacing, (0, 0, 0), direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_split_left_right_separate_and_touching_lungs():
    mask = np.zeros((3, 40, 60), np.uint8)
    mask[:, 5:35, 5:25] = 1
    mask[:, 5:35, 35:55] = 1
    sides = split_left_right(mask)
    assert (sides[:, :, :30][mask[:, :, :30] > 0] == RIGHT_LUNG).all()
    assert (sides[:, :, 30:][mask[:, :, 30:] > 0] == LEFT_LUNG).all()
    # Lungs touching at the anterior junction: one component, cut at the midline.
    mask[:, 5:8, 25:35] = 1
    sides = split_left_right(mask)
    assert set(np.unique(sides[:, :, :25][mask[:, :, :25] > 0])) == {RIGHT_LUNG}
    assert set(np.unique(sides[:, :, 36:][mask[:, :, 36:] > 0])) == {LEFT_LUNG}
    assert ((sides > 0) == (mask > 0)).all()


def _ellipsoid(shape, centre, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def test_a_mask_of_one_lung_is_never_cut_and_keeps_its_side():
    """After a pneumonectomy, or when a user's mask holds one lung, there is no
    mediastinum to cut at: the lung must be cropped whole, as in training."""
    right = _ellipsoid((20, 60, 120), (10, 30, 30), (9, 25, 22))
    for one, side in ((right, RIGHT_LUNG), (right[:, :, ::-1], LEFT_LUNG)):
        sides = split_left_right(one.astype(np.uint8))
        assert set(np.unique(sides[one])) == {side}
        assert (sides[~one] == 0).all()
    # The same lung with a deep notch (the heart's impression) is still one lung.
    notched = right & ~_ellipsoid(right.shape, (10, 30, 52), (12, 20, 10))
    assert set(np.unique(split_left_right(notched)[notched])) == {RIGHT_LUNG}


def test_two_lungs_are_split_however_unequal_their_sizes():
    """A small left lung (collapse, resection; down to under 1 % of the mask): the split
    is at the gap between the lungs, not inside the larger one, nor none at all."""
    right = _ellipsoid((20, 60, 120), (10, 30, 30), (9, 25, 22))
    for radii in ((4, 8, 8), (2, 3, 3)):
        left = _ellipsoid((20, 60, 120), (10, 30, 80), radii)
        sides = split_left_right((right | left).astype(np.uint8))
        assert set(np.unique(sides[right])) == {RIGHT_LUNG}
        assert set(np.unique(sides[left])) == {LEFT_LUNG}
    assert left.sum() < 0.005 * right.sum()


def test_crop_boxes_add_the_margin_and_clip_to_the_image():
    sides = np.zeros((200, 300), np.uint8)
    sides[50:150, 10:100] = RIGHT_LUNG
    sides[60:140, 200:280] = LEFT_LUNG
    boxes = {b.side: b for b in crop_boxes(sides, 7)}
    r, l = boxes[RIGHT_LUNG], boxes[LEFT_LUNG]
    # The paper's 32 px, written out (not CROP_MARGIN, which a test must not trust):
    # right 50..149 x 10..99 -> 18..182 x 0 (clipped)..132; left 60..139 x 200..279 -> 28..172 x 168..300 (clipped).
    assert (r.r0, r.r1, r.c0, r.c1) == (18, 182, 0, 132)
    assert (l.r0, l.r1, l.c0, l.c1) == (28, 172, 168, 300)
    assert CROP_MARGIN == 32
    assert r.slice_index == l.slice_index == 7
    assert crop_boxes(np.zeros((5, 5), np.uint8), 0) == []


def test_a_2d_image_is_one_axial_slice_with_its_in_plane_direction():
    """The 2 x 2 direction of a 2D image becomes the in-plane part of a 3 x 3 one,
    column by column (column c is the direction of index axis c)."""
    image = sitk.Image(7, 5, sitk.sitkInt16)
    image.SetSpacing((0.6, 0.9))
    image.SetOrigin((3.0, -4.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, s, c))  # row-major: I runs along (c, s), J along (-s, c)
    geo = Geometry.from_sitk(image)
    assert geo.spacing == (0.6, 0.9, 1.0) and geo.origin == (3.0, -4.0, 0.0)
    np.testing.assert_allclose(geo.direction_matrix, [[c, -s, 0], [s, c, 0], [0, 0, 1]])
