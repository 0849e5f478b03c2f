"""Property-based fuzzing of the engine and of the file path (``segment_file`` and the
CLI in-process) with odd shapes, masks, geometries and voxel types.

The one invariant, whatever hypothesis draws: either an error of the project's own
type (:class:`ILDSegError`) with a one-line message, or a result on the CT's own grid
with labels in 0..6 that are non-zero exactly on the lung mask (every lung voxel
labelled, nothing outside it). A crash of any other kind, a multi-line message, a
label outside the mask or an output on another grid fails the test.

Bounded on purpose (small volumes, few examples, no example database) so the file
runs in well under 90 s on two CPU cores; ``derandomize`` keeps CI reproducible.
Set ``ILDSEG_FUZZ_SCALE=20`` for a longer, non-deterministic search.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ILDSegmentationLib.commands import cli
from ILDSegmentationLib.classes import NUM_CLASSES
from ILDSegmentationLib.errors import ILDSegError, InputError, LungMaskError
from ILDSegmentationLib.imaging.geometry import Geometry, as_volume, canonical_view
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.analysis.pipeline import segment_file
from ILDSegmentationLib.imaging.plausibility import NotCTInHUError, check_ct_in_hu

from synthetic import random_model

#: ILDSEG_FUZZ_SCALE=20 runs twenty times as many examples, freshly random each run.
SCALE = max(1, int(os.environ.get("ILDSEG_FUZZ_SCALE", "1")))


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPES = ("int16", "uint16", "int32", "float32", "float64")
MASK_KINDS = ("empty", "full", "speckle", "one_lung", "two_lungs", "border", "single_voxel")


# -- strategies ---------------------------------------------------------------------------

def _rotation(axis: Tuple[float, float, float], angle: float) -> np.ndarray:
    """Rodrigues' rotation about ``axis`` (normalized here) by ``angle`` radians."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


@st.composite
def directions(draw) -> Tuple[float, ...]:
    """Identity, permuted and flipped axes (sagittal/coronal storage, feet first), or
    an oblique rotation, optionally with a reflection (determinant -1)."""
    kind = draw(st.sampled_from(("identity", "permuted", "oblique")))
    if kind == "identity":
        m = np.eye(3)
    elif kind == "permuted":
        perm = draw(st.permutations((0, 1, 2)))
        signs = draw(st.tuples(*[st.sampled_from((-1.0, 1.0))] * 3))
        m = np.eye(3)[:, perm] * np.asarray(signs)
    else:
        axis = draw(st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda v: np.linalg.norm(v) > 0.1))
        m = _rotation(axis, draw(st.floats(-np.pi, np.pi)))
        if draw(st.booleans()):
            m = m @ np.diag([1.0, 1.0, -1.0])
    return tuple(float(v) for v in m.ravel())


@st.composite
def geometries(draw) -> Geometry:
    spacing = draw(st.tuples(*[st.floats(0.05, 12.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-1e4, 1e4)] * 3))
    return Geometry(spacing, origin, draw(directions()))


def _values(rng: np.random.Generator, dtype: str, shape: Tuple[int, ...], extreme: bool) -> np.ndarray:
    """CT-like values, or the whole range of the type (padding, overflowed converters)."""
    dt = np.dtype(dtype)
    if extreme:
        if dt.kind in "iu":
            info = np.iinfo(dt)
            return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
        big = 1e30 if dt == np.float32 else 1e300
        return rng.choice(np.array([-big, -3024, -1000, 0, 3071, big], dt), shape)
    lo = 0 if dt.kind == "u" else -3024
    return rng.uniform(lo, 3071, shape).astype(dt)


def _mask(rng: np.random.Generator, kind: str, shape: Tuple[int, int, int]) -> np.ndarray:
    k, j, i = shape
    m = np.zeros(shape, np.uint8)
    if kind == "full":
        m[:] = 1
    elif kind == "speckle":
        m[rng.random(shape) < rng.uniform(0.01, 0.5)] = 1
    elif kind == "one_lung":
        m[:, j // 4: max(j // 4 + 1, 3 * j // 4), : max(1, i // 3)] = 1
    elif kind == "two_lungs":
        m[:, j // 4: max(j // 4 + 1, 3 * j // 4), : max(1, i // 3)] = 1
        m[:, j // 4: max(j // 4 + 1, 3 * j // 4), min(i - 1, 2 * i // 3):] = 1
    elif kind == "border":  # lung against every edge of the image
        m[:, 0, :] = 1
        m[:, :, -1] = 1
        m[rng.random(shape) < 0.2] = 1
    elif kind == "single_voxel":
        m[rng.integers(k), rng.integers(j), rng.integers(i)] = 1
    # Any non-zero value is lung (lobe maps, 255 masks).
    return m * rng.choice(np.array([1, 2, 5, 255], np.uint8))


@st.composite
def cases(draw, max_side: int = 40, max_slices: int = 4) -> Dict:
    two_d = draw(st.booleans()) and draw(st.booleans())  # a 2D image is ~1 in 4
    shape3 = (1 if two_d else draw(st.integers(1, max_slices)),
              draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(DTYPES))
    hu = _values(rng, dtype, shape3, extreme=draw(st.integers(0, 5)) == 0)
    mask = _mask(rng, draw(st.sampled_from(MASK_KINDS)), shape3)
    if two_d:
        hu, mask = hu[0], mask[0]
    return {"hu": hu, "mask": mask, "geometry": draw(geometries()), "two_d": two_d}


# -- invariants ---------------------------------------------------------------------------

def _check_error(e: BaseException) -> None:
    assert isinstance(e, ILDSegError), f"not the project's error type: {type(e).__name__}: {e}"
    message = str(e)
    assert message and "\n" not in message, f"message is not one line: {message!r}"


def _single_pixel_slices(hu: np.ndarray, geo: Geometry) -> bool:
    """Axial slices of one pixel: refused (instance normalization needs two)."""
    c = canonical_view(geo).to_canonical(as_volume(np.asarray(hu)))
    return c.shape[1] * c.shape[2] < 2


def _check_expected_error(e: BaseException, mask: np.ndarray, hu: np.ndarray, geo: Geometry) -> None:
    """The only refusals a finite CT may get: values that cannot be a CT in HU (the check
    of plausibility.py refuses that very array), an empty mask, one-pixel slices."""
    _check_error(e)
    if isinstance(e, NotCTInHUError):
        assert _not_hu(hu), repr(e)
        return
    if not np.asarray(mask).any():
        assert isinstance(e, LungMaskError), repr(e)
    elif _single_pixel_slices(hu, geo):
        assert isinstance(e, InputError) and "too small" in str(e), repr(e)
    else:
        raise AssertionError(f"a non-empty mask on a finite CT must segment, got {e!r}")


def _not_hu(hu: np.ndarray) -> bool:
    """Random values are often no CT in HU (all >= 0, say): segment refuses them."""
    try:
        check_ct_in_hu(hu, "ct")
    except NotCTInHUError:
        return True
    return False


def _check_labels(labels: np.ndarray, mask: np.ndarray) -> None:
    mask = as_volume(np.asarray(mask))
    labels = as_volume(np.asarray(labels))
    assert labels.shape == mask.shape
    assert labels.dtype == np.uint8 and int(labels.max(initial=0)) <= NUM_CLASSES
    np.testing.assert_array_equal(labels != 0, mask != 0, err_msg="labels must be non-zero exactly on the lung")


def _fixed(hu: np.ndarray, mask: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Dict:
    """An explicit case, so the corners that once broke stay covered whatever is drawn."""
    return {"hu": hu, "mask": mask, "geometry": Geometry((0.7, 0.7, 2.0), (0, 0, 0), direction), "two_d": hu.ndim == 2}


SAGITTAL = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # I runs A->P, J runs S->I, K runs R->L
CORNER_CASES = [
    _fixed(np.full((2, 1, 1), -800, np.int16), np.ones((2, 1, 1), np.uint8)),        # 1 x 1 pixel slices
    _fixed(np.full((3, 1, 1), -800, np.int16), np.ones((3, 1, 1), np.uint8), SAGITTAL),  # same array, 3 x 1 slices
    _fixed(np.full((12, 20), -800.0), np.pad(np.ones((4, 6), np.uint8), ((4, 4), (4, 10)))),        # a 2D image
    _fixed(np.full((1, 1, 40), -700, np.int32), np.ones((1, 1, 40), np.uint8)),       # one row of one slice
    _fixed(np.full((2, 5, 7), 3071, np.uint16), np.zeros((2, 5, 7), np.uint8)),        # empty mask
]


# -- the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random-weight models fed HU/1000 and raw HU (the paper-faithful default), so
    both intensity paths meet extreme values; "range" knows its training pixel sizes,
    so that CTs outside 1.0-1.4 mm go through the resampled path."""
    folder = tmp_path_factory.mktemp("fuzz-model")
    ranged = random_model(folder, seed=8)
    ranged.info.pixel_spacing_mm = (1.0, 1.4)
    return {"hu1000": random_model(folder), "hu": random_model(folder, intensity="hu"), "range": ranged}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 -> float32 inf, clipped
@fuzz_settings(30)
@given(case=cases(), which=st.sampled_from(("hu1000", "hu", "range")), want_probabilities=st.booleans(),
       max_memory_mb=st.sampled_from((0.001, 1.0, 1024.0)))
@example(case=CORNER_CASES[0], which="hu", want_probabilities=True, max_memory_mb=1024.0)
@example(case=CORNER_CASES[1], which="hu", want_probabilities=False, max_memory_mb=0.001)
@example(case=CORNER_CASES[2], which="hu1000", want_probabilities=True, max_memory_mb=1.0)
@example(case=CORNER_CASES[3], which="hu", want_probabilities=True, max_memory_mb=1.0)
@example(case=CORNER_CASES[4], which="hu", want_probabilities=False, max_memory_mb=1.0)
def test_engine_gives_own_error_or_labels_exactly_on_the_mask(models, case, which, want_probabilities, max_memory_mb):
    hu, mask, geo = case["hu"], case["mask"], case["geometry"]
    hu_before, mask_before = hu.copy(), mask.copy()
    inferer = Inferer(models[which], device="cpu", max_memory_mb=max_memory_mb)
    try:
        result = inferer.segment(hu, mask, geo, probabilities=want_probabilities)
    except Exception as e:  # noqa: BLE001 - the point is to see which kind it is
        _check_expected_error(e, mask, hu, geo)
        return
    assert mask.any(), "an empty mask must be refused"
    # A 2D image is one axial slice: the engine answers (1, J, I).
    assert result.labels.shape == as_volume(hu).shape
    _check_labels(result.labels, mask)
    np.testing.assert_array_equal(hu, hu_before)
    np.testing.assert_array_equal(mask, mask_before)
    if want_probabilities:
        p = result.probabilities
        assert p.shape == as_volume(hu).shape + (NUM_CLASSES,) and np.isfinite(p).all()
        lung = as_volume(mask) != 0
        np.testing.assert_allclose(p[lung].sum(axis=-1), 1.0, atol=1e-4)
        assert (p[~lung] == 0).all()
        np.testing.assert_array_equal(p[lung].argmax(axis=-1) + 1, result.labels[lung])


@fuzz_settings(10)
@given(case=cases(max_side=12, max_slices=2), bad=st.sampled_from(("nan", "inf", "-inf")))
def test_engine_refuses_non_finite_ct(models, case, bad):
    with np.errstate(over="ignore"):  # float64 extremes become inf in float32: fine, it is refused
        hu = case["hu"].astype(np.float32)
    hu.flat[hu.size // 2] = float(bad)
    try:
        Inferer(models["hu1000"], device="cpu").segment(hu, case["mask"], case["geometry"])
    except Exception as e:  # noqa: BLE001
        _check_error(e)
        # The refusal this case is about, whatever else is odd in it (an empty mask, a
        # one-pixel slice): the values are checked first.
        assert isinstance(e, InputError) and str(e) == "the CT contains NaN or infinite values", repr(e)
        return
    raise AssertionError("a CT with NaN or infinite values was segmented")


# -- the file path ------------------------------------------------------------------------

def _image(array: np.ndarray, geo: Geometry, two_d: bool) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if two_d:
        d = geo.direction_matrix[:2, :2]
        # A 2D image needs a 2x2 direction of its own: keep it orthonormal.
        u, _, vt = np.linalg.svd(d if abs(np.linalg.det(d)) > 1e-3 else np.eye(2))
        image.SetSpacing(geo.spacing[:2])
        image.SetOrigin(geo.origin[:2])
        image.SetDirection(tuple((u @ vt).ravel()))
    else:
        image.SetSpacing(geo.spacing)
        image.SetOrigin(geo.origin)
        image.SetDirection(geo.direction)
    return image


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetDimension() == b.GetDimension() and a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


def _fresh(workdir: Path) -> Path:
    n = len(list(workdir.iterdir()))
    d = workdir / f"ex{n}"
    d.mkdir()
    return d


OUTPUTS = ("labels.nrrd", "labels.nii.gz", "labels.mha", "labels.seg.nrrd")
INPUTS = ("ct.nrrd", "ct.mha", "ct.nii.gz")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@fuzz_settings(20)
@given(case=cases(max_side=36, max_slices=3), ct_name=st.sampled_from(INPUTS), out_name=st.sampled_from(OUTPUTS),
       with_probabilities=st.booleans())
@example(case=CORNER_CASES[0], ct_name="ct.nrrd", out_name="labels.nii.gz", with_probabilities=True)
@example(case=CORNER_CASES[2], ct_name="ct.nrrd", out_name="labels.nrrd", with_probabilities=True)
@example(case=CORNER_CASES[2], ct_name="ct.nii.gz", out_name="labels.seg.nrrd", with_probabilities=False)
def test_segment_file_keeps_the_ct_grid_or_raises_own_error(models, workdir, case, ct_name, out_name,
                                                           with_probabilities):
    d = _fresh(workdir)
    sitk.WriteImage(_image(case["hu"], case["geometry"], case["two_d"]), str(d / ct_name))
    ct_back = sitk.ReadImage(str(d / ct_name))  # NIfTI rounds the geometry: compare with what was stored
    mask_image = sitk.GetImageFromArray(case["mask"])
    mask_image.CopyInformation(ct_back)
    sitk.WriteImage(mask_image, str(d / "mask.nrrd"))
    out = d / out_name
    probabilities: Optional[Path] = d / "p.nrrd" if with_probabilities else None
    try:
        segment_file(d / ct_name, out, lung_mask=d / "mask.nrrd", model=models["hu1000"].path, device="cpu",
                     probabilities=probabilities, report=d / "report.json")
    except Exception as e:  # noqa: BLE001
        _check_expected_error(e, case["mask"], case["hu"], Geometry.from_sitk(ct_back))
        assert sorted(p.name for p in d.iterdir()) == sorted([ct_name, "mask.nrrd"]), "nothing may be left"
        return
    assert case["mask"].any()
    labels_image = sitk.ReadImage(str(out))
    if out_name.endswith(".seg.nrrd") and case["two_d"]:
        labels_image = labels_image[:, :, 0]  # Slicer segmentations are 3D: one slice
    _same_grid(labels_image, ct_back)
    _check_labels(sitk.GetArrayFromImage(labels_image), case["mask"])
    if probabilities is not None:
        p = sitk.ReadImage(str(probabilities))
        _same_grid(p, ct_back)
        assert p.GetNumberOfComponentsPerPixel() == NUM_CLASSES
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@fuzz_settings(12)
@given(case=cases(max_side=30, max_slices=3), auto_mask=st.booleans(), out_name=st.sampled_from(OUTPUTS))
@example(case=CORNER_CASES[2], auto_mask=False, out_name="labels.mha")
@example(case=CORNER_CASES[0], auto_mask=False, out_name="labels.nrrd")
def test_cli_exits_0_or_2_with_one_error_line(models, workdir, case, auto_mask, out_name):
    d = _fresh(workdir)
    ct_image = _image(case["hu"], case["geometry"], case["two_d"])
    sitk.WriteImage(ct_image, str(d / "ct.nrrd"))
    mask_image = sitk.GetImageFromArray(case["mask"])
    mask_image.CopyInformation(ct_image)
    sitk.WriteImage(mask_image, str(d / "mask.nrrd"))
    args = ["segment", str(d / "ct.nrrd"), "-o", str(d / out_name), "--model", str(models["hu1000"].path),
            "--device", "cpu", "--quiet", "--report", str(d / "r.json")]
    args += ["--lung-mask", "auto"] if auto_mask else ["--lung-mask", str(d / "mask.nrrd")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(args)
    stderr = err.getvalue()
    assert rc in (0, 2), f"exit {rc} (internal error?): {stderr}"
    assert "Traceback" not in stderr
    if rc == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("ildseg: error: "), stderr
        assert not (d / out_name).exists() and not (d / "r.json").exists()
        assert not [p.name for p in d.iterdir() if p.name.startswith(".")]
        if not auto_mask:
            assert not case["mask"].any() or _single_pixel_slices(case["hu"], Geometry.from_sitk(ct_image)) \
                or _not_hu(case["hu"]), stderr
        return
    labels_image = sitk.ReadImage(str(d / out_name))
    if out_name.endswith(".seg.nrrd") and case["two_d"]:
        labels_image = labels_image[:, :, 0]
    _same_grid(labels_image, sitk.ReadImage(str(d / "ct.nrrd")))
    labels = sitk.GetArrayFromImage(labels_image)
    assert labels.dtype == np.uint8 and labels.max() <= NUM_CLASSES
    if not auto_mask:
        _check_labels(labels, case["mask"])
