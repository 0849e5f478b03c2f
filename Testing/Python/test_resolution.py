"""Running the network at the model's pixel size (ILDSegmentationLib/engine/resolution.py)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.imaging.geometry import Geometry
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.engine.resolution import SPACING_TOLERANCE, InPlaneGrid, network_pixel_spacing

from synthetic import random_model, sitk_volume, two_lungs


def test_network_spacing_is_the_ct_own_inside_the_range_else_the_nearest_end():
    assert network_pixel_spacing((0.7, 0.7), None) == (0.7, 0.7)
    assert network_pixel_spacing((1.2, 1.3), (1.0, 1.4)) == (1.2, 1.3)
    assert network_pixel_spacing((1.4 * (1 + SPACING_TOLERANCE / 2),) * 2, (1.0, 1.4)) == \
        (1.4 * (1 + SPACING_TOLERANCE / 2),) * 2
    assert network_pixel_spacing((0.6, 0.6), (1.0, 1.4)) == (1.0, 1.0)
    assert network_pixel_spacing((2.0, 0.8), (1.0, 1.4)) == (1.4, 1.0)
    # A slice that resampling would shrink to one pixel stays as it is.
    assert network_pixel_spacing((0.2, 0.2), (1.0, 1.4), slice_shape=(2, 2)) == (0.2, 0.2)
    assert network_pixel_spacing((0.2, 0.2), (1.0, 1.4), slice_shape=(20, 20)) == (1.0, 1.0)


def _stripes(x_mm: np.ndarray, shape, width_mm=4.0):
    """Labels 1..6 in stripes of width_mm along the columns, by column centre (mm)."""
    return np.broadcast_to((np.floor(x_mm / width_mm) % 6 + 1).astype(np.uint8), shape).copy()


@pytest.mark.parametrize("fine, coarse", [(0.6, 1.0), (0.4, 1.4), (1.8, 1.4), (0.7, 1.0)])
def test_labels_come_back_to_the_right_place_and_every_lung_pixel_has_one(fine, coarse):
    shape = (3, 90, 123)
    lung = np.zeros(shape, bool)
    lung[:, 20:70, 10:110] = True
    lung[:, 40:45, 50:52] = False  # a hole in the lung keeps no label
    lung[1, 80, 3] = True  # a lone lung pixel
    grid = InPlaneGrid(shape, (fine, fine), (coarse, coarse))
    lung_r = grid.lung(lung)
    # The new grid is centred on the old one: column centres in mm from the old first.
    n_new = lung_r.shape[2]
    x_new = 0.5 * (shape[2] - 1) * fine + (np.arange(n_new) - 0.5 * (n_new - 1)) * coarse
    labels_r = _stripes(x_new, lung_r.shape) * lung_r
    back = grid.back(labels_r, lung)
    assert back.shape == shape and back.dtype == np.uint8
    assert (back[~lung] == 0).all()
    assert (back[lung] > 0).all(), "every lung pixel gets a label"
    # Each pixel takes the label of the stripe its centre lies in, except within a
    # coarse pixel of a stripe's edge (where the nearest coarse centre may lie across).
    x = np.arange(shape[2]) * fine
    truth = _stripes(x, shape)
    edge = np.abs(x / 4.0 - np.round(x / 4.0)) * 4.0 < coarse
    inner = lung & ~np.broadcast_to(edge, shape)
    assert inner.sum() > 0.3 * lung.sum()
    np.testing.assert_array_equal(back[inner], truth[inner])


def test_resampling_keeps_structures_in_place():
    """A bright square keeps its centre in millimetres (first pixels share their edge)."""
    fine, coarse = 0.5, 1.25
    hu = np.full((1, 200, 200), -800.0, np.float32)
    hu[0, 60:100, 120:150] = 40  # rows 30-50 mm, columns 60-75 mm
    out = InPlaneGrid(hu.shape, (fine, fine), (coarse, coarse)).ct(hu)
    assert out.shape == (1, 80, 80) and out.dtype == np.float32
    w = np.clip(out[0] + 800, 0, None)
    rows, cols = np.indices(w.shape)
    centre = ((rows * w).sum() / w.sum() + 0.5) * coarse, ((cols * w).sum() / w.sum() + 0.5) * coarse
    np.testing.assert_allclose(centre, (40.0, 67.5), atol=0.1)


@pytest.fixture(scope="module")
def case():
    hu, mask = two_lungs(n_slices=3, rows=96, cols=128)
    return hu, mask


def _model_with_range(tmp_path, spacing_range):
    model = random_model(tmp_path)
    model.info.pixel_spacing_mm = spacing_range
    return model


def test_inside_the_range_nothing_is_resampled(tmp_path, case):
    hu, mask = case
    geo = Geometry.from_sitk(sitk_volume(hu, spacing=(1.0, 1.0, 2.5)))
    native = Inferer(random_model(tmp_path), device="cpu").segment(hu, mask, geo)
    model = _model_with_range(tmp_path, (0.8, 0.97))  # 1 mm is within the 5 % tolerance
    got = Inferer(model, device="cpu").segment(hu, mask, geo)
    assert not got.resampled and got.network_pixel_spacing_mm == (1.0, 1.0)
    np.testing.assert_array_equal(got.labels, native.labels)


def test_outside_the_range_the_network_sees_the_ct_at_the_model_pixel_size(tmp_path, case):
    """A CT with 0.5 mm pixels, for a model trained at 1 mm: the network runs on the CT
    brought to 1 mm, as if it had been scanned so, and every lung voxel of the 0.5 mm
    grid gets the label of its place."""
    hu, mask = case
    image = sitk_volume(hu, spacing=(1.0, 1.0, 2.5))
    fine = sitk.Resample(image, [image.GetSize()[0] * 2, image.GetSize()[1] * 2, image.GetSize()[2]],
                         sitk.Transform(), sitk.sitkNearestNeighbor, (-0.25, -0.25, 0.0), (0.5, 0.5, 2.5),
                         image.GetDirection(), -1000, image.GetPixelID())
    fine_mask = sitk.Resample(sitk_volume(mask, spacing=(1.0, 1.0, 2.5)), fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    model = _model_with_range(tmp_path, (1.0, 1.0))
    coarse = Inferer(model, device="cpu").segment(hu, mask, Geometry.from_sitk(image), probabilities=True)
    fine_hu, fine_lung = sitk.GetArrayFromImage(fine), sitk.GetArrayFromImage(fine_mask)
    got = Inferer(model, device="cpu").segment(fine_hu, fine_lung, Geometry.from_sitk(fine), probabilities=True)
    assert got.resampled and got.network_pixel_spacing_mm == (1.0, 1.0) and got.ct_pixel_spacing_mm == (0.5, 0.5)
    # Each 1 mm pixel was split into 2 x 2 of 0.5 mm, so resampling back gives the
    # same CT: every fine voxel carries its coarse voxel's label and probabilities.
    expected = np.repeat(np.repeat(coarse.labels, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(got.labels, expected)
    expected_p = np.repeat(np.repeat(coarse.probabilities, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(got.probabilities, expected_p, atol=1e-5)
    native = Inferer(model, device="cpu", pixel_spacing="native").segment(fine_hu, fine_lung, Geometry.from_sitk(fine))
    assert not native.resampled and (native.labels != expected).mean() > 0.05


def test_an_unknown_choice_is_refused(tmp_path):
    with pytest.raises(ValueError):
        Inferer(random_model(tmp_path), device="cpu", pixel_spacing="auto")


def _bacc(model, image: sitk.Image, lung: np.ndarray, truth: np.ndarray, mode: str, slices=None) -> float:
    from ILDSegmentationLib.training.metrics import confusion_matrix, summarize
    roi = truth if slices is None else np.where(np.isin(np.arange(truth.shape[0]), slices)[:, None, None], truth, 0)
    r = Inferer(model, device="cpu", pixel_spacing=mode).segment(
        sitk.GetArrayFromImage(image), lung, Geometry.from_sitk(image), only_slices_of=roi)
    return summarize(confusion_matrix(roi, r.labels))["balanced_accuracy"]


def test_bundled_model_on_a_finer_grid_does_as_on_its_own(default_model):
    """The demo case brought to the upper end of the bundled model's pixel range, then
    upsampled 2x (pixels far below the range): run at the model's pixel size, it scores
    better than when the network meets the chest magnified twice (2026-12 model: 0.75
    against 0.67; 0.69 on the in-range grid itself)."""
    from ILDSegmentationLib.commands.demo import make_demo_case
    lo, hi = default_model.info.pixel_spacing_mm
    assert hi / 2 < lo / 1.05, "the finer grid must lie outside the model's range"
    image, truth = make_demo_case()
    truth_image = sitk.GetImageFromArray(truth)
    truth_image.CopyInformation(image)

    def at(spacing_xy):
        sp = image.GetSpacing()
        new_sp = (spacing_xy, spacing_xy, sp[2])
        size = [int(round(image.GetSize()[i] * sp[i] / new_sp[i])) for i in range(2)] + [image.GetSize()[2]]
        origin = tuple(o + 0.5 * (n - s) for o, s, n in zip(image.GetOrigin(), sp, new_sp))
        ct = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, new_sp, image.GetDirection(),
                           -1024, sitk.sitkInt16)
        lab = sitk.GetArrayFromImage(sitk.Resample(truth_image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        return ct, lab

    own_ct, own_truth = at(hi)
    fine_ct, fine_truth = at(hi / 2)
    annotated = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    slices = annotated[::3]  # a third of the slices keeps the test short
    own = _bacc(default_model, own_ct, own_truth > 0, own_truth, "model", slices)
    at_model = _bacc(default_model, fine_ct, fine_truth > 0, fine_truth, "model", slices)
    native = _bacc(default_model, fine_ct, fine_truth > 0, fine_truth, "native", slices)
    assert at_model > native + 0.03
    assert at_model > own - 0.03  # nothing is lost on the way to the model's grid and back
