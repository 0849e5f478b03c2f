"""Batches of training crops: which crops go together, in which shape, prepared ahead.

The paper trains on one crop at a time; larger batches are a speed option. Crops of one
batch have different shapes (each is a lung's bounding box), and the network's instance
norm makes zero padding exact only through its ``valid``-mask path (network.py), which
costs 1.38x the unpadded forward on a CPU. So:

- on a CPU a batch is split into groups of equal shape, each run unpadded, and their
  gradients are accumulated with the weight of their share of the batch: the same loss
  (the mean over the batch's crops) and the same gradient as the padded batch;
- on a GPU the batch is padded to a *bucket*: its largest height and width rounded up
  to a multiple of :data:`BUCKET`, so that few distinct shapes reach cuDNN (its
  benchmark mode picks kernels once per shape) and batches of 16-32 stay exact under
  the mask.

Preparing a batch (the scanner augmentation, the flip/rotation, padding) runs in a
worker thread one batch ahead (:func:`prefetch`), so the device does not wait for it.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from .dataset import Crop, dihedral

#: Pixels a GPU bucket's height and width are rounded up to.
BUCKET = 64

T = TypeVar("T")


@dataclass
class Batch:
    """Arrays of one forward pass: ``x`` (n, 1, h, w) float32 intensities, ``target``
    (n, h, w) int64 class index or -1, ``lung`` (n, h, w) bool, ``valid`` (n, 1, h, w)
    float32 1 on real pixels or None when no crop is padded, and ``share``: this pass's
    share of its optimizer step (its crops / the step's crops)."""

    x: torch.Tensor
    target: torch.Tensor
    lung: torch.Tensor
    valid: Optional[torch.Tensor]
    share: float

    def to(self, device: torch.device) -> "Batch":
        pin = device.type == "cuda"
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if pin else (lambda t: t.to(device))
        return Batch(move(self.x), move(self.target), move(self.lung),
                     None if self.valid is None else move(self.valid), self.share)


def pad_batch(items: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], shape: Optional[Tuple[int, int]] = None,
              share: float = 1.0) -> Batch:
    """Stack (image, target, lung) arrays zero-padded to ``shape`` (default: the
    largest); ``valid`` marks real pixels so padding changes nothing (network.py)."""
    h = max(i[0].shape[0] for i in items) if shape is None else shape[0]
    w = max(i[0].shape[1] for i in items) if shape is None else shape[1]
    n = len(items)
    x = np.zeros((n, 1, h, w), np.float32)
    t = np.full((n, h, w), -1, np.int64)
    lung = np.zeros((n, h, w), bool)
    valid = np.zeros((n, 1, h, w), np.float32)
    for i, (a, b, c) in enumerate(items):
        x[i, 0, :a.shape[0], :a.shape[1]] = a
        t[i, :a.shape[0], :a.shape[1]] = b
        lung[i, :a.shape[0], :a.shape[1]] = c
        valid[i, 0, :a.shape[0], :a.shape[1]] = 1
    exact = all(i[0].shape == (h, w) for i in items)
    return Batch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(lung),
                 None if exact else torch.from_numpy(valid), share)


def transformed(crops: Sequence[Crop], ks: Sequence[int]) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each crop's (image, target, lung) under its flip/rotation ``k`` (0..7)."""
    return [(dihedral(c.image, k), dihedral(c.target, k), dihedral(c.lung, k)) for c, k in zip(crops, ks)]


def bucket_shape(items: Sequence[Tuple[np.ndarray, ...]]) -> Tuple[int, int]:
    """The batch's largest height and width, each rounded up to a multiple of :data:`BUCKET`."""
    h = max(i[0].shape[0] for i in items)
    w = max(i[0].shape[1] for i in items)
    return -(-h // BUCKET) * BUCKET, -(-w // BUCKET) * BUCKET


def passes(items: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], layout: str) -> List[Batch]:
    """The forward passes of one optimizer step over ``items``.

    ``layout``: ``"padded"`` one pass padded to the largest crop (the reference);
    ``"bucket"`` one pass padded to the bucket shape (GPUs); ``"grouped"`` one
    unpadded pass per distinct shape, weighted by its share of the step (CPUs)."""
    if layout == "padded":
        return [pad_batch(items)]
    if layout == "bucket":
        return [pad_batch(items, bucket_shape(items))]
    groups: dict = {}
    for item in items:
        groups.setdefault(item[0].shape, []).append(item)
    return [pad_batch(g, share=len(g) / len(items)) for g in groups.values()]


def prefetch(source: Iterable[T], make: Callable[[T], object]) -> Iterator[object]:
    """``make(s)`` for each ``s`` of ``source``, computed one item ahead in a worker
    thread (numpy releases the GIL in its copies), in order."""
    items = iter(source)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ildseg-batches") as pool:
        ahead = None
        for s in items:
            nxt = pool.submit(make, s)
            if ahead is not None:
                yield ahead.result()
            ahead = nxt
        if ahead is not None:
            yield ahead.result()
