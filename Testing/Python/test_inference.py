from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ILDSegmentationLib.engine.cropping import crop_boxes
from ILDSegmentationLib.imaging.lungsides import split_left_right
from ILDSegmentationLib.errors import Cancelled, InputError, LungMaskError
from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view
from ILDSegmentationLib.engine.inference import Inferer

from synthetic import array_and_geometry, random_model, sitk_volume, two_lungs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def case():
    hu, mask = two_lungs()
    image = sitk_volume(hu)
    return hu, mask, Geometry.from_sitk(image)


@pytest.fixture(scope="module")
def result(model, case):
    hu, mask, geo = case
    return Inferer(model, device="cpu").segment(hu, mask, geo, probabilities=True)


def test_labels_only_inside_the_mask_and_all_lung_labelled(result, case):
    _, mask, _ = case
    labels = result.labels
    assert labels.dtype == np.uint8 and labels.shape == mask.shape
    assert (labels[mask == 0] == 0).all()
    assert ((labels[mask > 0] >= 1) & (labels[mask > 0] <= 6)).all()
    assert len(np.unique(labels[mask > 0])) > 1, "test model should predict several classes"


def test_probabilities_sum_to_one_in_lung_and_match_labels(result, case):
    _, mask, _ = case
    p = result.probabilities
    assert p.shape == mask.shape + (6,)
    np.testing.assert_allclose(p[mask > 0].sum(axis=1), 1, atol=1e-5)
    assert (p[mask == 0] == 0).all()
    np.testing.assert_array_equal(p[mask > 0].argmax(axis=1) + 1, result.labels[mask > 0])


def test_slices_without_lung_are_skipped(result, case):
    _, mask, _ = case
    assert result.slices_with_lung == int(mask.reshape(mask.shape[0], -1).any(axis=1).sum()) == mask.shape[0] - 1
    assert result.crops == 2 * result.slices_with_lung


def test_each_lung_is_cropped_with_its_margin_and_stitched_back(model, case, result):
    """Reference: crop one slice by hand, run the network on each crop alone."""
    hu, mask, geo = case
    view = canonical_view(geo)
    hu_c, sides = view.to_canonical(hu), split_left_right(view.to_canonical(mask))
    labels_c = view.to_canonical(result.labels)
    z = int(np.flatnonzero(sides.reshape(sides.shape[0], -1).any(axis=1))[2])
    expected = np.zeros(sides.shape[1:], np.uint8)
    for b in crop_boxes(sides[z], z):
        x = model.info.intensity.apply(hu_c[z, b.r0:b.r1, b.c0:b.c1])
        with torch.inference_mode():
            pred = model.network(torch.from_numpy(x)[None, None]).argmax(dim=1)[0].numpy() + 1
        inside = sides[z, b.r0:b.r1, b.c0:b.c1] == b.side
        expected[b.r0:b.r1, b.c0:b.c1][inside] = pred[inside]
    np.testing.assert_array_equal(labels_c[z], expected)


def test_batched_equals_one_crop_at_a_time(model, case, result):
    hu, mask, geo = case
    one_by_one = Inferer(model, device="cpu", max_memory_mb=0.001).segment(hu, mask, geo, probabilities=True)
    np.testing.assert_array_equal(one_by_one.labels, result.labels)
    np.testing.assert_allclose(one_by_one.probabilities, result.probabilities, atol=1e-4)


def test_cpu_results_are_deterministic(model, case, result):
    hu, mask, geo = case
    again = Inferer(model, device="cpu").segment(hu, mask, geo)
    np.testing.assert_array_equal(again.labels, result.labels)


def test_same_labels_whatever_the_storage_order(model, case, result):
    hu, mask, _ = case
    image, mask_image = sitk_volume(hu), sitk_volume(mask)
    for order, flips in (((2, 0, 1), (True, False, False)), ((1, 2, 0), (False, True, True))):
        arr, geo = array_and_geometry(sitk.Flip(sitk.PermuteAxes(image, order), flips))
        m = sitk.GetArrayFromImage(sitk.Flip(sitk.PermuteAxes(mask_image, order), flips))
        out = Inferer(model, device="cpu").segment(arr, m, geo)
        back = sitk.GetImageFromArray(out.labels)
        back.CopyInformation(sitk.Flip(sitk.PermuteAxes(image, order), flips))
        # Undo the permutation/flip by resampling onto the original grid (exact: nearest, same voxels).
        restored = sitk.GetArrayFromImage(sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor))
        np.testing.assert_array_equal(restored, result.labels)


def test_a_mask_of_one_lung_gives_that_lung_the_same_labels(model, case, result):
    """A user who segments one lung (or a patient with one) gets, in that lung, what
    the mask of both lungs gives: the lung is cropped whole, not cut at its middle."""
    hu, mask, geo = case
    cols = mask.shape[2]
    for half in (slice(0, cols // 2), slice(cols // 2, cols)):
        one = np.zeros_like(mask)
        one[:, :, half] = mask[:, :, half]
        out = Inferer(model, device="cpu").segment(hu, one, geo)
        np.testing.assert_array_equal(out.labels[one > 0], result.labels[one > 0])
        assert (out.labels[one == 0] == 0).all()


def test_inputs_are_not_modified(model, case):
    hu, mask, geo = case
    hu0, mask0 = hu.copy(), mask.copy()
    Inferer(model, device="cpu").segment(hu, mask, geo)
    np.testing.assert_array_equal(hu, hu0)
    np.testing.assert_array_equal(mask, mask0)


def test_progress_and_cancellation(model, case):
    hu, mask, geo = case
    seen = []
    Inferer(model, device="cpu", max_memory_mb=0.001).segment(hu, mask, geo, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) == 8
    assert "slice" in seen[0][1]

    stop = threading.Event()

    def cancel_after_first(f, m):
        stop.set()

    with pytest.raises(Cancelled):
        Inferer(model, device="cpu", max_memory_mb=0.001).segment(hu, mask, geo, progress=cancel_after_first,
                                                                  cancel=stop)
    with pytest.raises(Cancelled):
        Inferer(model, device="cpu").segment(hu, mask, geo, cancel=lambda: True)


def test_a_2d_image_is_one_axial_slice(model, case):
    hu, mask, _ = case
    out = Inferer(model, device="cpu").segment(hu[2], mask[2], Geometry((0.8, 0.8, 1.0)))
    assert out.labels.shape == (1,) + hu[2].shape
    assert (out.labels[0][mask[2] == 0] == 0).all() and (out.labels[0][mask[2] > 0] > 0).all()


def test_slices_smaller_than_the_margin(model):
    hu = np.full((2, 9, 12), -800, np.int16)
    mask = np.zeros_like(hu, np.uint8)
    mask[:, 2:7, 2:10] = 1
    out = Inferer(model, device="cpu").segment(hu, mask, Geometry((1, 1, 1)))
    assert (out.labels[mask > 0] > 0).all() and (out.labels[mask == 0] == 0).all()


def test_bad_inputs(model, case):
    hu, mask, geo = case
    inferer = Inferer(model, device="cpu")
    with pytest.raises(LungMaskError, match="empty"):
        inferer.segment(hu, np.zeros_like(mask), geo)
    with pytest.raises(InputError, match="shape"):
        inferer.segment(hu, mask[:-1], geo)
    bad = hu.astype(np.float32)
    bad[2, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        inferer.segment(bad, mask, geo)
    with pytest.raises(InputError, match="2D or 3D"):
        inferer.segment(hu[None], mask[None], geo)


class _SmallGPU(Inferer):
    """An inferer whose accelerator holds `capacity` crops (simulated out-of-memory;
    the network itself runs on the CPU)."""

    capacity = 1

    def _predict(self, crops):
        if self.device.type == "cuda" and len(crops) > self.capacity:
            raise torch.cuda.OutOfMemoryError("simulated")
        saved, self.device = self.device, torch.device("cpu")
        try:
            return super()._predict(crops)
        finally:
            self.device = saved if saved.type == "cuda" else self.device


def test_out_of_gpu_memory_halves_the_batch_then_falls_back_to_cpu(model, case, result, caplog):
    hu, mask, geo = case
    # Identical crops so they share batches.
    hu2 = np.repeat(hu[2:3], 6, axis=0)
    mask2 = np.repeat(mask[2:3], 6, axis=0)
    reference = Inferer(model, device="cpu").segment(hu2, mask2, geo)
    small = _SmallGPU(model, device="cpu")
    small.device = torch.device("cuda")
    out = small.segment(hu2, mask2, geo)
    np.testing.assert_array_equal(out.labels, reference.labels)
    assert "retrying with batches" in caplog.text
    none = _SmallGPU(model, device="cpu")
    none.capacity = 0
    none.device = torch.device("cuda")
    out = none.segment(hu2, mask2, geo)
    np.testing.assert_array_equal(out.labels, reference.labels)
    assert none.device.type == "cpu" and "continuing on the CPU" in caplog.text


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "float32", "float64"])
def test_intensity_clips_any_storage_type_without_overflow(dtype):
    """Values beyond the clip range, even float64 ones float32 cannot hold, become
    the clip limits, with no overflow on the way."""
    import warnings
    from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    hu = np.array([info.min, -3024, -1000, 0, 40, info.max]).astype(dtype)
    for name, intensity in INTENSITY_PRESETS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = intensity.apply(hu)
        assert x.dtype == np.float32 and np.isfinite(x).all(), name
        clipped = np.clip(hu.astype(np.float64), intensity.clip_min, intensity.clip_max)
        np.testing.assert_allclose(x, (clipped - intensity.offset) * intensity.scale, rtol=1e-6, err_msg=name)
