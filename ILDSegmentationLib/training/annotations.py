"""Annotations as class labels 0..6 (0 = not annotated) on the CT's grid.

A plain label map uses the values of SPEC section 2. A Slicer ``.seg.nrrd`` (from the
Segment Editor) is matched segment by segment to the classes by name (case and
punctuation ignored, abbreviations accepted) or by terminology code, so a
radiologist can annotate in Slicer and train.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

from ..classes import CLASSES, TissueClass
from ..errors import InputError
from ..imaging.geometry import Geometry, as_volume, same_grid
from ..imaging.io import read_image
from ..terminology import parse_terminology_entry


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES: Dict[str, int] = {}
for _c in CLASSES:
    for _n in (_c.name, _c.abbreviation, _c.segment_id, _c.type_code[2]):
        _ALIASES[_norm(_n)] = _c.label
_ALIASES.update({_norm(n): 1 for n in ("normal", "healthy lung", "normal lung")})
_ALIASES.update({_norm(n): 2 for n in ("ground glass", "ground-glass opacity", "ggo")})
_ALIASES.update({_norm(n): 3 for n in ("micronodule", "nodules")})
_ALIASES.update({_norm(n): 5 for n in ("reticular", "reticular pattern")})
_ALIASES.update({_norm(n): 6 for n in ("honeycomb", "honeycomb pattern")})
_ALIASES[_norm("Infiltrate")] = 4  # DCM 112121, SPEC's fallback code for consolidation


def class_of_segment(name: str, terminology: Optional[str]) -> Optional[TissueClass]:
    """The class a Slicer segment stands for, from its terminology or its name."""
    if terminology:
        try:
            codes = parse_terminology_entry(terminology.split("TerminologyEntry:")[-1])
        except ValueError:
            codes = {}
        t = codes.get("type")
        if t:
            for c in CLASSES:
                if (t[0], t[1]) == c.type_code[:2]:
                    return c
            if t[1] == "112121":
                return CLASSES[3]
            modifier = codes.get("type_modifier")
            if t[1] == "39607008" and modifier and modifier[1] == "17621005":
                return CLASSES[0]  # healthy as written before issue 29: type Lung, modifier Normal
    label = _ALIASES.get(_norm(name))
    return CLASSES[label - 1] if label else None


def read_annotation(path, ct_geometry: Geometry, ct_shape, where: str) -> np.ndarray:
    """uint8 K,J,I labels 0..6 on the CT's grid; InputError naming ``where`` otherwise."""
    try:
        image, _ = read_image(path)
    except InputError as e:
        raise InputError(f"{where}: annotation: {e}") from None
    geometry = Geometry.from_sitk(image)
    keys = set(image.GetMetaDataKeys())
    is_seg = any(k.startswith("Segment0_") for k in keys)
    array = sitk.GetArrayFromImage(image)
    if is_seg:
        labels = _from_segmentation(image, array, keys, where)
    else:
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{where}: annotation {path} is a vector image; expected a label map")
        labels = np.asarray(array)
        bad = np.setdiff1d(np.unique(labels), np.arange(len(CLASSES) + 1))
        if bad.size:
            raise InputError(f"{where}: annotation has label values {bad.tolist()[:5]} outside 0..6")
        labels = labels.astype(np.uint8)
    labels = as_volume(labels)
    if is_seg:
        # Slicer crops segmentations to their extent plus keeps the reference geometry:
        # place the file's voxels on the CT grid by physical position.
        if not same_grid(geometry, labels.shape, ct_geometry, ct_shape):
            labels = _resample_to(labels, image, ct_geometry, ct_shape)
    elif not same_grid(geometry, labels.shape, ct_geometry, ct_shape):
        raise InputError(f"{where}: annotation geometry (size, spacing, origin or direction) differs from the CT's")
    if not labels.any():
        raise InputError(f"{where}: the annotation is empty")
    return labels


def _from_segmentation(image, array, keys, where) -> np.ndarray:
    vector = image.GetNumberOfComponentsPerPixel() > 1
    out = np.zeros(array.shape[:-1] if vector else array.shape, np.uint8)
    i = 0
    while f"Segment{i}_ID" in keys:
        name = image.GetMetaData(f"Segment{i}_Name") if f"Segment{i}_Name" in keys else ""
        tags = image.GetMetaData(f"Segment{i}_Tags") if f"Segment{i}_Tags" in keys else ""
        entry = next((t for t in tags.split("|") if t.startswith("TerminologyEntry:")), None)
        cls = class_of_segment(name, entry)
        if cls is None:
            raise InputError(f"{where}: segment '{name}' matches none of the classes "
                             f"({', '.join(c.name for c in CLASSES)})")
        value = int(image.GetMetaData(f"Segment{i}_LabelValue")) if f"Segment{i}_LabelValue" in keys else 1
        # Without a Layer key, a file of several layers is one from Slicer before shared
        # labelmaps (one layer per segment), and Slicer reads segment i from layer i; so
        # do we. A one-layer file (other tools write them) has every segment in it.
        layer = int(image.GetMetaData(f"Segment{i}_Layer")) if f"Segment{i}_Layer" in keys else (i if vector else 0)
        layers = image.GetNumberOfComponentsPerPixel()
        if not 0 <= layer < layers:
            raise InputError(f"{where}: segment '{name}' is in layer {layer}, but the file has "
                             f"{layers} layer{'s' if layers > 1 else ''}")
        voxels = (array[..., layer] if vector else array) == value
        out[voxels] = cls.label
        i += 1
    return out


def _resample_to(labels: np.ndarray, image: sitk.Image, ct_geometry: Geometry, ct_shape) -> np.ndarray:
    src = sitk.GetImageFromArray(labels)
    src.SetSpacing(image.GetSpacing()[:3] if image.GetDimension() >= 3 else ct_geometry.spacing)
    src.SetOrigin(image.GetOrigin()[:3] if image.GetDimension() >= 3 else ct_geometry.origin)
    src.SetDirection(image.GetDirection() if image.GetDimension() == 3 else ct_geometry.direction)
    ref = sitk.Image([int(s) for s in ct_shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing(ct_geometry.spacing)
    ref.SetOrigin(ct_geometry.origin)
    ref.SetDirection(ct_geometry.direction)
    return sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
