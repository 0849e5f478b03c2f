"""The slice-by-slice inference engine.

Data flow: (HU array K,J,I + lung mask + geometry) -> canonical axial view ->
per-slice, per-lung crops with a 32-pixel margin (exactly as in training) ->
batches of crops -> network -> softmax -> labels written back only inside the lung
mask of the lung each crop was made for -> label map in the CT's own K,J,I order.

Memory is bounded by the batch (``max_batch_pixels``), not by volume x classes,
unless per-class probabilities are asked for. Slices without lung are skipped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..classes import NUM_CLASSES
from ..imaging.lungsides import split_left_right
from .cropping import CROP_BOX_CHOICES, CropBox, crop_boxes, crop_boxes_aerated
from .device import describe_device, select_device
from .decision import DecisionRule, resolve_decision
from ..errors import CancelCheck, Cancelled, DeviceError, InputError, LungMaskError, is_cancelled
from .fastpath import FastCPUForward, supports as fast_cpu_supported, trim_heap
from ..imaging.geometry import CanonicalView, Geometry, as_volume, canonical_view
from .modelfile import LoadedModel
from .resolution import PIXEL_SPACING_CHOICES, InPlaneGrid, network_pixel_spacing

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
#: Places the crop boxes of one slice: (sides 0/1/2, HU slice, slice index) -> boxes,
#: in the canonical view; for benchmarks that try other placements than the named ones.
BoxFunction = Callable[[np.ndarray, np.ndarray, int], List[CropBox]]

#: Crops are padded up to a multiple of this (pixels) so that crops of similar size
#: share a batch; the padding is masked out, so results equal unpadded crops.
BUCKET = 32
#: Activation bytes per pixel of the paper's network in inference with mixed
#: precision on CUDA (input, 10 x 32 features kept for the concatenation, the
#: concatenation itself, the head and a transient layer), ~2.9 kB; sizes batches.
BYTES_PER_PIXEL = 3000
#: The same in float32 (CPU, or CUDA without mixed precision): the peak resident
#: memory of CPU batches grew by 4.2-4.9 kB per pixel (VmHWM, torch 2.x, oneDNN), so
#: 3000 let a batch overrun --max-memory by ~60 % (Testing/Python/test_reliability.py).
BYTES_PER_PIXEL_FLOAT32 = 5000
#: LPS direction whose canonical view is the array itself: I to patient left, J to
#: posterior, K to inferior (resampled volumes are made in canonical order).
_CANONICAL_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@dataclass
class SegmentationResult:
    """labels: uint8 K,J,I (0 outside the lung, 1..6 classes). probabilities:
    float32 K,J,I,C (C = 6, class label - 1) or None; zero outside the lung."""

    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    device: str
    slices_total: int
    slices_with_lung: int
    crops: int
    seconds: float
    timings: Dict[str, float] = field(default_factory=dict)
    #: (row, column) pixel spacing in mm the network ran at, and the CT's own.
    network_pixel_spacing_mm: Optional[Tuple[float, float]] = None
    ct_pixel_spacing_mm: Optional[Tuple[float, float]] = None
    #: The decision rule that made the labels (:mod:`.engine.decision`).
    decision: DecisionRule = field(default_factory=DecisionRule)

    @property
    def resampled(self) -> bool:
        return self.network_pixel_spacing_mm != self.ct_pixel_spacing_mm


class Inferer:
    """Runs a loaded model over whole CT volumes.

    device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "mps".
    max_memory_mb: activation memory one batch may use; bounds the batch size.
    mixed_precision: autocast on CUDA (bfloat16 where supported, else float16).
    cpu_fallback: when even one crop does not fit in GPU memory, finish on the CPU.
    fast_cpu: on the CPU, run the network through :class:`FastCPUForward`
        (channels-last, no concatenation copy, fused norm; same results up to float
        rounding, 1.6-2x faster). False runs ``network.forward`` (the reference).
    pixel_spacing: "model" runs the network at a pixel size within the range the
        model was trained at, resampling CTs outside it in-plane and bringing the
        labels back (:mod:`.resolution`); "native" runs at the CT's own pixel size,
        as the paper did. Models that do not record their range run natively.
    crop_box: how each lung's crop box is placed (:data:`~.cropping.CROP_BOX_CHOICES`):
        "mask" (default, the paper's) boxes each lung's mask plus 32 pixels; "aerated"
        boxes the aerated lung the mask outlines, found in the CT
        (:func:`~.cropping.crop_boxes_aerated`), so that a mask border drawn a few
        pixels wider or narrower does not move the box and change the labels. Labels
        are written inside the mask either way. A callable (:data:`BoxFunction`) is
        used as given (benchmarks).
    decision: how probabilities become labels (:mod:`.engine.decision`): "paper"
        (default here, the paper's argmax, as evaluation on annotated regions needs),
        "prior" (the model file's logit adjustment for whole lungs), "auto" (the
        model's recommended rule), or a :class:`~.engine.decision.DecisionRule`.
        Probabilities returned are the network's either way.
    """

    def __init__(self, model: LoadedModel, device: str = "auto", max_memory_mb: float = 1024,
                 mixed_precision: bool = True, cpu_fallback: bool = True, fast_cpu: bool = True,
                 pixel_spacing: str = "model", crop_box: Union[str, BoxFunction] = "mask",
                 decision: Union[str, DecisionRule] = "paper") -> None:
        if not (isinstance(max_memory_mb, (int, float)) and math.isfinite(max_memory_mb) and max_memory_mb > 0):
            raise InputError(f"the memory for a batch (--max-memory) must be a number of MB above 0, "
                             f"not {max_memory_mb}")
        if pixel_spacing not in PIXEL_SPACING_CHOICES:
            raise ValueError(f"pixel_spacing must be one of {PIXEL_SPACING_CHOICES}, not {pixel_spacing!r}")
        if not callable(crop_box) and crop_box not in CROP_BOX_CHOICES:
            raise ValueError(f"crop_box must be one of {CROP_BOX_CHOICES} or a function, not {crop_box!r}")
        try:
            self.decision = resolve_decision(decision, model.info.decision)
        except ValueError as e:
            raise InputError(f"decision rule: {e}") from None
        #: What was asked for ("auto", "paper", "prior"; "rule" for a DecisionRule given
        #: as is): the report names it beside the rule that ran.
        self.decision_choice = decision if isinstance(decision, str) else "rule"
        self.crop_box = crop_box
        self.pixel_spacing = pixel_spacing
        self.cpu_fallback = cpu_fallback
        self.model = model
        self.device = select_device(device)
        self.device_name = describe_device(self.device)
        self.model.network.to(self.device).eval()
        self.mixed_precision = mixed_precision
        self.fast_cpu = fast_cpu
        self._fast: Optional[FastCPUForward] = None
        self._largest_crop = 0  # pixels, for FastCPUForward.reserve
        self.bytes_per_pixel = BYTES_PER_PIXEL if mixed_precision and self.device.type == "cuda" \
            else BYTES_PER_PIXEL_FLOAT32
        self.max_batch_pixels = max(int(max_memory_mb * 2**20 / self.bytes_per_pixel), 1)

    # -- public -------------------------------------------------------------------
    def segment(self, hu: np.ndarray, lung_mask: np.ndarray, geometry: Geometry, *,
                probabilities: bool = False, progress: Optional[ProgressCallback] = None,
                cancel: CancelCheck = None, only_slices_of: Optional[np.ndarray] = None) -> SegmentationResult:
        """Segment a CT. hu: K,J,I (or J,I for one slice) in HU; lung_mask: same
        shape, every non-zero voxel is lung. Neither input is modified.

        only_slices_of: optional K,J,I array; axial slices where it has no non-zero
        voxel are skipped (evaluation runs only the annotated slices)."""
        t_start = time.perf_counter()
        hu = as_volume(np.asarray(hu))
        mask = as_volume(np.asarray(lung_mask))
        if hu.shape != mask.shape:
            raise InputError(f"lung mask shape {mask.shape[::-1]} differs from the CT's {hu.shape[::-1]} (I, J, K)")
        if not np.issubdtype(hu.dtype, np.number) or np.issubdtype(hu.dtype, np.complexfloating):
            raise InputError(f"CT voxels must be real numbers, not {hu.dtype}")
        if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
            raise InputError("the CT contains NaN or infinite values")

        view = canonical_view(geometry)
        wanted = None
        if only_slices_of is not None:
            roi = view.to_canonical(as_volume(np.asarray(only_slices_of)))
            wanted = roi.reshape(roi.shape[0], -1).any(axis=1)
        spacing = view.canonical_spacing(geometry)[1:]
        slice_shape = (hu.shape[view.axes[1]], hu.shape[view.axes[2]])
        target = spacing if self.pixel_spacing == "native" else \
            network_pixel_spacing(spacing, self.model.info.pixel_spacing_mm, slice_shape)
        if target != spacing:
            return self._segment_resampled(hu, mask, view, spacing, target, wanted, probabilities, progress,
                                           cancel, t_start)
        result = self._segment_canonical(hu, mask, view, wanted, probabilities, progress, cancel, t_start)
        result.network_pixel_spacing_mm = result.ct_pixel_spacing_mm = spacing
        return result

    def _segment_resampled(self, hu: np.ndarray, mask: np.ndarray, view: CanonicalView, spacing, target,
                           wanted: Optional[np.ndarray], probabilities: bool, progress, cancel,
                           t_start: float) -> SegmentationResult:
        """Resample in-plane to ``target`` (row, column mm), segment there, bring the
        labels (and probabilities) back to the CT's grid, inside its lung mask."""
        hu_c, lung_c = view.to_canonical(hu), view.to_canonical(mask) != 0
        grid = InPlaneGrid(hu_c.shape, spacing, target)
        intensity = self.model.info.intensity
        hu_r = grid.ct(hu_c, clip=(intensity.clip_min, intensity.clip_max))
        lung_r = grid.lung(lung_c).view(np.uint8)
        t_resampled = time.perf_counter()
        identity = canonical_view(Geometry(spacing=(1.0, 1.0, 1.0), direction=_CANONICAL_DIRECTION))
        r = self._segment_canonical(hu_r, lung_r, identity, wanted, probabilities, progress, cancel, t_resampled)
        del hu_r
        t_back = time.perf_counter()
        labels = np.zeros(hu.shape, np.uint8)
        view.to_canonical(labels)[...] = grid.back(r.labels, lung_c)
        probs = None
        if r.probabilities is not None:
            # Written class by class into the one output array, through views: a
            # whole K,J,I,6 intermediate would triple the peak memory of this path.
            probs = np.zeros(hu.shape + (NUM_CLASSES,), np.float32)
            for c in range(NUM_CLASSES):
                view.to_canonical(probs[..., c])[...] = grid.back(r.probabilities[..., c], lung_c)
            r.probabilities = None
        t_end = time.perf_counter()
        timings = {"resample": (t_resampled - t_start) + (t_end - t_back), **r.timings}
        return SegmentationResult(
            labels=labels, probabilities=probs, device=r.device, slices_total=r.slices_total,
            slices_with_lung=r.slices_with_lung, crops=r.crops, seconds=t_end - t_start, timings=timings,
            network_pixel_spacing_mm=target, ct_pixel_spacing_mm=spacing, decision=self.decision)

    def _segment_canonical(self, hu: np.ndarray, mask: np.ndarray, view: CanonicalView,
                           wanted: Optional[np.ndarray], probabilities: bool, progress, cancel,
                           t_start: float) -> SegmentationResult:
        """The engine proper: per-lung crops of the wanted slices, in ``view``."""
        hu_c = view.to_canonical(hu)
        sides = split_left_right(view.to_canonical(mask))
        if wanted is None:
            wanted = np.ones(sides.shape[0], bool)
        boxes: List[CropBox] = []
        for z in range(sides.shape[0]):
            if wanted[z] and sides[z].any():
                boxes.extend(self._boxes(sides[z], hu_c[z], z))
        if not boxes:
            raise LungMaskError("the lung mask is empty: nothing to segment")
        if hu_c.shape[1] * hu_c.shape[2] < 2:
            # Instance normalization needs two pixels for its statistics (torch raises a
            # ValueError on one); a 1 x 1 pixel slice is no image of a lung anyway.
            raise InputError(f"axial slices of {hu_c.shape[2]} x {hu_c.shape[1]} pixel are too small to segment")
        t_prep = time.perf_counter()
        self._largest_crop = max(b.pixels for b in boxes)

        labels = np.zeros(hu.shape, np.uint8)
        labels_c = view.to_canonical(labels)  # a view: writing it fills `labels`
        probs = np.zeros(hu.shape + (NUM_CLASSES,), np.float32) if probabilities else None
        intensity = self.model.info.intensity
        n_slices = int(len({b.slice_index for b in boxes}))
        done = 0
        batches = 0
        for batch in self._batches(boxes):
            if is_cancelled(cancel):
                raise Cancelled("cancelled by the user; nothing was written")
            crops = [intensity.apply(hu_c[b.slice_index, b.r0:b.r1, b.c0:b.c1]) for b in batch]
            p = self._predict_within_memory(crops)
            for b, pb in zip(batch, p):
                inside = sides[b.slice_index, b.r0:b.r1, b.c0:b.c1] == b.side
                region = labels_c[b.slice_index, b.r0:b.r1, b.c0:b.c1]
                region[inside] = (self.decision.argmax(pb) + 1).astype(np.uint8)[inside]
                if probs is not None:
                    self._store_probabilities(probs, view, b, pb, inside)
            done += len(batch)
            batches += 1
            if self.device.type == "cpu" and batches % 4 == 0:
                # Crops of new shapes leave holes in the C heap; trimming every 4th
                # batch halves peak memory on a CT for ~3 % time (BENCHMARKS.md).
                trim_heap()
            if progress is not None:
                z = batch[-1].slice_index
                progress(done / len(boxes), f"slice {z + 1} of {sides.shape[0]} ({done}/{len(boxes)} lung crops)")
        t_end = time.perf_counter()
        if self._fast is not None:
            self._fast.release()  # its workspace (up to a few hundred MB) is not kept between CTs
        if self.device.type == "cpu":
            trim_heap()  # what the crops' buffers left in the C heap (~1 GB for a CT): see trim_heap
        return SegmentationResult(
            labels=labels, probabilities=probs, device=self.device_name,
            slices_total=int(sides.shape[0]), slices_with_lung=n_slices, crops=len(boxes),
            seconds=t_end - t_start, timings={"prepare": t_prep - t_start, "network": t_end - t_prep},
            decision=self.decision)

    # -- internals ----------------------------------------------------------------
    def _boxes(self, sides: np.ndarray, hu: np.ndarray, z: int) -> List[CropBox]:
        if callable(self.crop_box):
            return self.crop_box(sides, hu, z)
        if self.crop_box == "aerated":
            return crop_boxes_aerated(sides, hu, z)
        return crop_boxes(sides, z)

    def _batches(self, boxes: Sequence[CropBox]) -> Iterator[List[CropBox]]:
        """Group crops of the same padded size, in slice order within a group, each
        batch within the pixel budget."""
        # On a CPU the network is compute bound: padding only adds work (measured 2x
        # slower), so only crops of identical shape share a batch. Accelerators
        # gain from large batches, so there crops are padded to shared buckets.
        step = 1 if self.device.type == "cpu" else BUCKET

        def bucket(b: CropBox):
            return (-(-b.shape[0] // step) * step, -(-b.shape[1] // step) * step)
        groups: Dict[tuple, List[CropBox]] = {}
        for b in boxes:
            groups.setdefault(bucket(b), []).append(b)
        for key in sorted(groups, key=lambda k: min(b.slice_index for b in groups[k])):
            per_batch = max(1, self.max_batch_pixels // (key[0] * key[1]))
            members = groups[key]
            for i in range(0, len(members), per_batch):
                yield members[i:i + per_batch]

    def _predict_within_memory(self, crops: List[np.ndarray]) -> List[np.ndarray]:
        """Out of accelerator memory: halve the batch (and later batches) and retry;
        a single crop that still does not fit runs on the CPU, with a warning."""
        try:
            return self._predict(crops)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if len(crops) > 1:
                self.max_batch_pixels = max(1, self.max_batch_pixels // 2)
                half = len(crops) // 2
                log.warning("out of GPU memory: retrying with batches of %d crops", half)
                return self._predict_within_memory(crops[:half]) + self._predict_within_memory(crops[half:])
            if not self.cpu_fallback:
                raise DeviceError("out of GPU memory even for a single lung crop; run with --device cpu") from None
            log.warning("out of GPU memory even for a single lung crop: continuing on the CPU (slower)")
            self.device = torch.device("cpu")
            self.device_name = describe_device(self.device) + " (fallback: out of GPU memory)"
            self.model.network.to(self.device)
            return self._predict(crops)

    def _autocast(self):
        if self.mixed_precision and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of unpadded crops: the fast CPU path where it applies
        (checked per call: an out-of-GPU-memory fallback may have moved to the CPU)."""
        if self.fast_cpu and fast_cpu_supported(self.model.network, self.device):
            if self._fast is None or self._fast.network is not self.model.network:
                self._fast = FastCPUForward(self.model.network)
            self._fast.reserve(self._largest_crop)
            return self._fast(x)
        return self.model.network(x)

    def _predict(self, crops: List[np.ndarray]) -> List[np.ndarray]:
        """Softmax probabilities (C, h, w) float32 for each crop."""
        shapes = {c.shape for c in crops}
        with torch.inference_mode(), self._autocast():
            if len(shapes) == 1:
                x = torch.from_numpy(np.stack(crops)[:, None]).to(self.device)
                out = torch.softmax(self._network(x).float(), dim=1).cpu().numpy()
                return list(out)
            h = max(s[0] for s in shapes)
            w = max(s[1] for s in shapes)
            x = np.zeros((len(crops), 1, h, w), np.float32)
            valid = np.zeros((len(crops), 1, h, w), np.float32)
            for i, c in enumerate(crops):
                x[i, 0, :c.shape[0], :c.shape[1]] = c
                valid[i, 0, :c.shape[0], :c.shape[1]] = 1
            logits = self.model.network(torch.from_numpy(x).to(self.device), torch.from_numpy(valid).to(self.device))
            out = torch.softmax(logits.float(), dim=1).cpu().numpy()
            return [out[i, :, :c.shape[0], :c.shape[1]] for i, c in enumerate(crops)]

    @staticmethod
    def _store_probabilities(probs: np.ndarray, view, b: CropBox, pb: np.ndarray, inside: np.ndarray) -> None:
        for c in range(pb.shape[0]):
            region = view.to_canonical(probs[..., c])[b.slice_index, b.r0:b.r1, b.c0:b.c1]
            region[inside] = pb[c][inside]
