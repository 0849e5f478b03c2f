"""The local training set and the model folder behind the Slicer panel's "Teach it
your site's disease" section (issue 16).

- :func:`create_annotation_segmentation`: a segmentation for painting examples, with
  the six class segments (the result's IDs, names, colors and terminology), empty.
  Only painted voxels are labels; the rest of the lung is unlabelled (the paper's
  sparse annotation).
- :func:`add_case`: the CT, its lung mask and the painted labels of one scan go into
  a training folder the user chooses, as a case of a manifest in the training CLI's
  format (``case_id,ct,lung_mask,annotation,scan``; training/manifest.py), read by
  ``ildseg finetune`` and ``ildseg train``. A case is written into a folder of its
  own under a temporary name and renamed into place; the manifest is rewritten
  through a temporary file: nothing is ever half-written, and no case overwrites
  another.
- :func:`summarize`: annotated pixels per class over the whole set, and the classes
  that have no example yet.
- :func:`list_models` / :func:`new_run_folder`: the user's model folder, where
  fine-tuned models go (one run folder each: ``model.safetensors`` with its
  provenance in the file's metadata, ``finetune.json`` with before/after). Model
  files are read with :func:`~.modelfile.read_info` (JSON metadata, no torch, never
  unpickled). The bundled model's folder is refused: a fine-tuned model never
  replaces it.

Arrays are K, J, I; label values are those of :mod:`.classes` (0 = not annotated).
MRML functions need the ``slicer`` MRML classes (the application or slicer-core).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .classes import CLASSES
from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: File name of the manifest in a training folder.
MANIFEST_NAME = "manifest.csv"
#: Sub-folder of a training folder holding one folder per case.
CASES_FOLDER = "cases"
#: The columns written (training/manifest.py reads them; ``scan`` keeps cases of one
#: CT in one fold and on one side of the held-out split).
MANIFEST_COLUMNS = ["case_id", "ct", "lung_mask", "annotation", "scan"]
#: Attribute marking an annotation segmentation, and the reference to its CT.
ANNOTATION_ATTRIBUTE = "ILDSegmentation.Annotation"
ANNOTATED_VOLUME_ROLE = "ildsegAnnotatedVolume"


# ---------------------------------------------------------------------------------
# The annotation segmentation (MRML)
# ---------------------------------------------------------------------------------
def create_annotation_segmentation(scene: Any, ct_node: Any, name: Optional[str] = None) -> Any:
    """A new segmentation node over ``ct_node`` with the six class segments, empty,
    to paint examples in with the Segment Editor. Same segment IDs, names, colors and
    terminology as the result's (so a region of the result can be copied in as a
    verified example)."""
    from . import mrml

    if ct_node is None or not ct_node.IsA("vtkMRMLScalarVolumeNode") or ct_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError("select the CT to annotate first")
    node_name = name or f"{ct_node.GetName()} ILD annotations"
    if scene.GetFirstNodeByName(node_name) is not None:
        node_name = scene.GenerateUniqueName(node_name)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
    try:
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
        mrml.ensure_class_segments(node)
        node.SetAttribute(ANNOTATION_ATTRIBUTE, "true")
        node.SetNodeReferenceID(ANNOTATED_VOLUME_ROLE, ct_node.GetID())
    except BaseException:
        mrml.remove_node(scene, node)
        raise
    return node


def annotated_volume(annotation_node: Any) -> Any:
    """The CT an annotation segmentation was made for, or None."""
    return annotation_node.GetNodeReference(ANNOTATED_VOLUME_ROLE) if annotation_node is not None else None


def annotation_fits_input(annotation_node: Any, ct_node: Any) -> bool:
    """False when ``annotation_node`` was made for another CT than ``ct_node`` (its
    painted voxels describe that CT, not this one). A segmentation made elsewhere
    (no recorded CT) fits any CT."""
    made_for = annotated_volume(annotation_node)
    return made_for is None or ct_node is None or made_for.GetID() == ct_node.GetID()


def annotation_labels(annotation_node: Any, ct_node: Any) -> np.ndarray:
    """uint8 K, J, I labels on the CT's grid: class label where a class segment is
    painted, 0 elsewhere (not annotated). Segments are matched to classes by ID, else
    by name or terminology (as ``ildseg train`` reads a .seg.nrrd); other segments
    are ignored. Where two class segments overlap, the later class wins. The node is
    not modified."""
    from . import mrml
    from .training.annotations import class_of_segment

    if annotation_node is None or not annotation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("select the annotation segmentation (with the six class segments) first")
    segmentation = annotation_node.GetSegmentation()
    by_label: Dict[int, str] = {}
    for segment_id in mrml.segment_ids_of(annotation_node):
        segment = segmentation.GetSegment(segment_id)
        known = {c.segment_id: c for c in CLASSES}.get(segment_id)
        if known is None:
            tag = mrml.segment_tag(segment, mrml.slicer.vtkSegment.GetTerminologyEntryTagName())
            known = class_of_segment(segment.GetName() or "", tag)
        if known is not None and known.label not in by_label:
            by_label[known.label] = segment_id
    if not by_label:
        raise InputError(f"'{annotation_node.GetName()}' has no segment of the six classes: create the annotation "
                         "segmentation with the panel's button")
    labels = sorted(by_label)
    exported = mrml.segments_to_array(annotation_node, [by_label[v] for v in labels], ct_node)
    out = np.zeros(exported.shape, np.uint8)
    for index, value in enumerate(labels, start=1):
        out[exported == index] = value
    return out


# ---------------------------------------------------------------------------------
# The training folder
# ---------------------------------------------------------------------------------
@dataclass
class AddedCase:
    """A case written by :func:`add_case` (paths relative to the training folder)."""

    case_id: str
    folder: Path
    pixels: Dict[str, int]


def _safe_id(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return (cleaned or "case")[:48]


def _read_rows(manifest: Path) -> List[Dict[str, str]]:
    if not manifest.exists():
        return []
    from .training.manifest import read_manifest

    read_manifest(manifest)  # refuses a manifest the training CLI could not read, naming the line
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _write_rows(manifest: Path, rows: Sequence[Dict[str, str]]) -> None:
    from .atomicfile import atomic_path

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in MANIFEST_COLUMNS})
    with atomic_path(manifest) as tmp:
        Path(tmp).write_text(text.getvalue(), encoding="utf-8")


def _scan_key(ct_name: str, hu: np.ndarray) -> str:
    """The same CT gives the same scan name, whatever its node is called later: cases
    of one scan stay on one side of the held-out split."""
    digest = hashlib.sha256(np.ascontiguousarray(hu).tobytes()).hexdigest()[:10]
    return f"{_safe_id(ct_name)}-{digest}"


def _write_volume(array: np.ndarray, geometry: Any, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    sitk.WriteImage(image, str(path), True)


def add_case(folder: PathLike, ct_node: Any, annotation_node: Any, lung_mask_node: Any = None,
             lung_segment_ids: Optional[Sequence[str]] = None, case_id: Optional[str] = None) -> AddedCase:
    """Store one annotated scan in the training folder ``folder`` (created if needed)
    and append it to its manifest.

    Written: ``cases/<case_id>/ct.nrrd`` (the CT's voxels in HU and its world
    geometry), ``lung_mask.nrrd`` (0/1 on the CT's grid; without a lung mask node the
    manifest says ``auto``) and ``annotation.nrrd`` (0 = not annotated, 1..6). The
    case id is ``case_id`` or the CT's name, made unique against the manifest and the
    folder. Refuses (InputError, nothing written) an annotation with nothing painted.
    """
    from . import mrml

    root = Path(folder)
    if not str(folder).strip():
        raise InputError("choose a training folder first")
    if root.exists() and not root.is_dir():
        raise InputError(f"the training folder is a file: {root}")
    hu, geometry = mrml.volume_array_and_geometry(ct_node)
    if annotation_node is not None and not annotation_fits_input(annotation_node, ct_node):
        raise InputError(f"'{annotation_node.GetName()}' holds annotations of the CT "
                         f"'{annotated_volume(annotation_node).GetName()}', not of '{ct_node.GetName()}': choose "
                         "that CT as input, or create an annotation segmentation for this one")
    labels = annotation_labels(annotation_node, ct_node)
    if not labels.any():
        raise InputError(f"nothing is painted in '{annotation_node.GetName()}': paint a few regions of the classes "
                         "you see on a few slices (Segment Editor), then add the case")
    mask = None
    if lung_mask_node is not None:
        mask = mrml.lung_mask_from_node(lung_mask_node, ct_node, lung_segment_ids)
    root.mkdir(parents=True, exist_ok=True)
    (root / CASES_FOLDER).mkdir(exist_ok=True)
    manifest = root / MANIFEST_NAME
    rows = _read_rows(manifest)
    taken = {r.get("case_id", "") for r in rows}
    base = _safe_id(case_id or ct_node.GetName())
    chosen, n = base, 1
    while chosen in taken or (root / CASES_FOLDER / chosen).exists():
        n += 1
        chosen = f"{base}-{n}"

    staging = Path(tempfile.mkdtemp(prefix=f".{chosen}.", suffix=".part", dir=str(root / CASES_FOLDER)))
    final = root / CASES_FOLDER / chosen
    try:
        _write_volume(hu, geometry, staging / "ct.nrrd")
        if mask is not None:
            _write_volume(mask.astype(np.uint8), geometry, staging / "lung_mask.nrrd")
        _write_volume(labels, geometry, staging / "annotation.nrrd")
        os.chmod(staging, 0o777 & ~_umask())
        # A rename never replaces a non-empty folder: a case that appeared meanwhile stays.
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    relative = f"{CASES_FOLDER}/{chosen}"
    row = {"case_id": chosen, "ct": f"{relative}/ct.nrrd",
           "lung_mask": f"{relative}/lung_mask.nrrd" if mask is not None else "auto",
           "annotation": f"{relative}/annotation.nrrd", "scan": _scan_key(ct_node.GetName(), hu)}
    try:
        _write_rows(manifest, rows + [row])
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # not in the manifest: not part of the set
        raise
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)
    return AddedCase(chosen, final, {c.name: int(counts[c.label]) for c in CLASSES})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class TrainingSetSummary:
    """Annotated pixels per class name over the set, and the case count."""

    cases: int
    pixels: Dict[str, int] = field(default_factory=dict)

    @property
    def lacking(self) -> List[str]:
        """Classes with no annotated pixel: fine-tuning cannot teach them."""
        return [c.name for c in CLASSES if self.pixels.get(c.name, 0) == 0]

    def message(self) -> str:
        """One paragraph for the panel."""
        if not self.cases:
            return "The training set is empty."
        counts = ", ".join(f"{c.name} {self.pixels.get(c.name, 0):,}" for c in CLASSES)
        text = f"The training set holds {self.cases} case{'s' if self.cases != 1 else ''}; annotated pixels: {counts}."
        if self.lacking:
            text += (f" No examples yet of {', '.join(self.lacking)}: fine-tuning cannot teach "
                     f"{'it' if len(self.lacking) == 1 else 'them'}, and the model may predict "
                     f"{'it' if len(self.lacking) == 1 else 'them'} less; paint a few regions of each.")
        return text


def summarize(folder: PathLike) -> TrainingSetSummary:
    """Count the annotated pixels per class of every case in the folder's manifest
    (read as ``ildseg train`` reads it)."""
    import SimpleITK as sitk

    from .training.manifest import read_manifest

    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.exists():
        return TrainingSetSummary(0, {c.name: 0 for c in CLASSES})
    cases = read_manifest(manifest)
    total = np.zeros(len(CLASSES) + 1, np.int64)
    for case in cases:
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(case.annotation)))  # a copy: a view would outlive its image
        except RuntimeError as e:
            raise InputError(f"{case.where()}: cannot read its annotation {case.annotation.name} "
                             f"({str(e).strip().splitlines()[-1]})") from None
        values = np.asarray(array).ravel()
        values = values[(values > 0) & (values <= len(CLASSES))].astype(np.int64)
        total += np.bincount(values, minlength=len(CLASSES) + 1)
    return TrainingSetSummary(len(cases), {c.name: int(total[c.label]) for c in CLASSES})


# ---------------------------------------------------------------------------------
# The user's model folder
# ---------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """A model file of the user's folder: path, name, provenance (from the file's
    metadata), and the fine-tuning report beside it when there is one."""

    path: Path
    name: str
    trained: bool
    provenance: Dict[str, Any]
    finetune: Optional[Dict[str, Any]] = None

    def label(self) -> str:
        """A line for a model list: run folder (or file) name and, for a fine-tuned
        model, its held-out balanced accuracy before and after."""
        where = self.path.parent.name if self.path.name == "model.safetensors" else self.path.stem
        text = f"{where}: {self.name}"
        if self.finetune:
            before = (self.finetune.get("before") or {}).get("balanced_accuracy")
            after = (self.finetune.get("after") or {}).get("balanced_accuracy")
            if before is not None and after is not None:
                text += f" (held-out BACC {before:.3f} -> {after:.3f})"
        return text


def _is_bundled_folder(folder: Path) -> bool:
    from .modelfile import default_model_path

    try:
        return folder.resolve() == default_model_path().parent.resolve()
    except OSError:
        return False


def list_models(folder: PathLike) -> List[ModelEntry]:
    """Model files in ``folder`` (``*.safetensors``) and in its run folders
    (``*/model.safetensors``), newest first; checkpoints and files that are not model
    files are left out. Metadata only: no torch, never unpickled."""
    import json

    from .errors import ILDSegError
    from .modelfile import read_info

    root = Path(folder)
    if not str(folder).strip() or not root.is_dir():
        return []
    candidates = [p for p in root.glob("*.safetensors") if p.is_file()]
    candidates += [p for p in root.glob("*/model.safetensors") if p.is_file()]
    entries: List[ModelEntry] = []
    for path in candidates:
        try:
            info = read_info(path)
        except ILDSegError:
            continue  # not a model file of this project (or a damaged one)
        report = None
        beside = path.parent / "finetune.json"
        if path.name == "model.safetensors" and beside.is_file():
            try:
                report = json.loads(beside.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                report = None
        entries.append(ModelEntry(path, info.name, bool(info.trained), dict(info.provenance or {}), report))
    entries.sort(key=lambda e: e.path.stat().st_mtime, reverse=True)
    return entries


def describe_finetune(report: Dict[str, Any]) -> List[str]:
    """Lines for the panel from a fine-tuning report (finetune.json): the held-out
    balanced accuracy before and after (first: whether the start model was kept),
    how the annotations were held out (with one scan: that the figure does not
    estimate the next patient), then per class (n/a: no held-out pixel of that
    class), then the classes the training set did not teach."""
    before, after = report.get("before") or {}, report.get("after") or {}

    def share(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{100.0 * value:.1f} %"

    held = report.get("held_out") or {}
    lines = []
    if report.get("kept_start_model"):
        lines.append(f"Not better than the start model on the held-out annotations (by at least "
                     f"{share(report.get('min_gain'))}): the start model stays selected; no new model is offered.")
    lines.append(f"Held-out balanced accuracy: {share(before.get('balanced_accuracy'))} before, "
                 f"{share(after.get('balanced_accuracy'))} after"
                 + (f" (held out: {held.get('unit')} {', '.join(map(str, held.get('items') or []))})" if held else ""))
    if held.get("note"):
        lines.append(("Warning: " if held.get("estimates_next_patient") is False else "") + held["note"])
    per_before = before.get("per_class_accuracy") or {}
    per_after = after.get("per_class_accuracy") or {}
    for c in CLASSES:
        if c.name in per_before or c.name in per_after:
            lines.append(f"{c.name}: {share(per_before.get(c.name))} -> {share(per_after.get(c.name))}")
    lacking = report.get("classes_without_examples") or []
    if lacking:
        lines.append("Not taught (no examples): " + ", ".join(lacking))
    if report.get("model"):
        lines.append(f"Model: {report['model']}")
    return lines


def new_run_folder(model_folder: PathLike, prefix: str = "finetune") -> Path:
    """A new, not yet existing run folder path in the user's model folder (created
    if needed), named by date and time. The bundled model's folder is refused."""
    root = Path(model_folder)
    if not str(model_folder).strip():
        raise InputError("choose a folder for your models first")
    if root.exists() and not root.is_dir():
        raise InputError(f"the model folder is a file: {root}")
    if _is_bundled_folder(root):
        raise InputError("the model folder is the bundled model's folder: a fine-tuned model never replaces the "
                         "bundled one; choose a folder of your own")
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    chosen, n = root / f"{prefix}-{stamp}", 1
    while chosen.exists():
        n += 1
        chosen = root / f"{prefix}-{stamp}-{n}"
    return chosen


__all__ = ["create_annotation_segmentation", "annotated_volume", "annotation_fits_input", "annotation_labels", "add_case", "AddedCase",
           "summarize", "TrainingSetSummary", "list_models", "ModelEntry", "new_run_folder", "describe_finetune",
           "MANIFEST_NAME"]
