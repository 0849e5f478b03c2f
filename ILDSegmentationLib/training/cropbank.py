"""Training crops saved as one compressed NumPy file, so a training run can move to a
machine that has torch but none of the CT files or readers (a rented GPU).

A crop bank holds exactly what :class:`~.dataset.Crop` holds, cut by the same
function (:func:`~.dataset.crops_from_arrays`) from the manifest's cases, with the
image kept in HU (int16) so that any intensity handling can be applied on loading.
Each crop also carries a free-text ``group`` (for example "train" or "val", or the
scan it came from) that the user chooses when saving.

The file is a plain ``.npz`` read with ``allow_pickle=False``: data, never code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from ..imaging.atomicfile import atomic_path
from ..errors import InputError
from ..engine.preprocessing import Intensity
from .dataset import Crop

FORMAT = "ildseg-crop-bank-1"


def save_crop_bank(path: Path, crops_hu: Sequence[Crop], groups: Sequence[str]) -> Path:
    """Write crops whose ``image`` is in HU (cut with :data:`AS_HU`, as :func:`hu_crops`
    does), with one group name each."""
    if len(crops_hu) != len(groups):
        raise ValueError("one group per crop")
    shapes = np.array([c.image.shape for c in crops_hu], np.int32).reshape(-1, 2)
    image = np.concatenate([np.clip(np.rint(c.image), -32768, 32767).astype(np.int16).ravel() for c in crops_hu]) \
        if crops_hu else np.zeros(0, np.int16)
    target = np.concatenate([c.target.astype(np.int8).ravel() for c in crops_hu]) if crops_hu else np.zeros(0, np.int8)
    lung = np.packbits(np.concatenate([c.lung.ravel() for c in crops_hu])) if crops_hu else np.zeros(0, np.uint8)
    meta = [{"case_id": c.case_id, "slice": c.slice_index, "side": c.side, "group": g,
             "pixel_spacing_mm": list(c.pixel_spacing_mm) if c.pixel_spacing_mm else None}
            for c, g in zip(crops_hu, groups)]
    header = json.dumps({"format": FORMAT, "crops": meta})
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, shapes=shapes, image=image, target=target, lung=lung,
                                header=np.frombuffer(header.encode(), np.uint8))
    return Path(path)


def load_crop_bank(path: Path, intensity: Intensity) -> Tuple[List[Crop], List[str]]:
    """(crops with ``intensity`` applied, their groups)."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            shapes, image, target = z["shapes"], z["image"], z["target"]
            lung = np.unpackbits(z["lung"]).astype(bool)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not a crop bank ({type(e).__name__})") from None
    if header.get("format") != FORMAT or len(header["crops"]) != len(shapes):
        raise InputError(f"{path} is not a crop bank of format {FORMAT}")
    crops, groups, at = [], [], 0
    for (h, w), m in zip(shapes, header["crops"]):
        n = int(h) * int(w)
        sp = m["pixel_spacing_mm"]
        crops.append(Crop(m["case_id"], int(m["slice"]), int(m["side"]),
                          intensity.apply(image[at:at + n].reshape(h, w).astype(np.float32)),
                          target[at:at + n].reshape(h, w).astype(np.int64), lung[at:at + n].reshape(h, w),
                          None if sp is None else (float(sp[0]), float(sp[1]))))
        groups.append(m["group"])
        at += n
    return crops, groups


#: The identity on int16 HU: crops are saved in HU and the bank applies the model's
#: intensity handling when it is loaded. Cut crops with it to save them.
AS_HU = Intensity(name="as-is", clip_min=-32768.0, clip_max=32767.0)


def hu_crops(case, max_slices: int = 0, seed: int = 0) -> List[Crop]:
    """The crops of one manifest case with their image in HU; ``max_slices`` > 0
    keeps that many annotated slices, evenly spread (a thin-slice scan annotated on
    every slice would otherwise outweigh the rest), chosen reproducibly."""
    from .dataset import load_case_crops
    crops = load_case_crops(case, AS_HU)
    slices = sorted({c.slice_index for c in crops})
    if max_slices and len(slices) > max_slices:
        keep = {slices[int(i)] for i in np.linspace(0, len(slices) - 1, max_slices).round()}
        crops = [c for c in crops if c.slice_index in keep]
    return crops
