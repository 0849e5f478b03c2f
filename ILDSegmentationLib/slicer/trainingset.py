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
  files are read with :func:`~ILDSegmentationLib.engine.modelfile.read_info` (JSON metadata, no torch, never
  unpickled). The bundled model's folder is refused: a fine-tuned model never
  replaces it.

Arrays are K, J, I; label values are those of :mod:`ILDSegmentationLib.classes` (0 = not annotated).
MRML functions need the ``slicer`` MRML classes (the application or slicer-core).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..classes import CLASSES
from ..errors import InputError
from ..imaging.paths import safe_name

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
        # Under the CT's transform: painted where the CT is shown, and exported onto the
        # CT's grid in the CT's own frame (annotation_labels requires the same transform).
        node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
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
    not modified.

    The segmentation must be under the same transform as the CT (as a lung mask
    segmentation, :func:`~.nodes.lung_mask_from_segmentation_node`): the segments are
    exported in the node's own frame onto the CT's grid in the CT's own frame, which
    only coincide then; otherwise the labels would be shifted against the CT that
    :func:`add_case` writes in world geometry."""
    from . import mrml, nodes
    from ..training.annotations import class_of_segment

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
    if annotation_node.GetTransformNodeID() != ct_node.GetTransformNodeID():
        raise InputError(f"the annotation segmentation '{annotation_node.GetName()}' and the CT "
                         f"'{ct_node.GetName()}' are under different transforms; harden the transforms first")
    labels = sorted(by_label)
    exported = nodes.segments_to_array(annotation_node, [by_label[v] for v in labels], ct_node)
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


def _safe_name(text: str) -> str:
    return safe_name(text, fill="-", max_length=48)


def _read_rows(manifest: Path) -> List[Dict[str, str]]:
    if not manifest.exists():
        return []
    from ..training.manifest import read_manifest

    read_manifest(manifest)  # refuses a manifest the training CLI could not read, naming the line
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _write_rows(manifest: Path, rows: Sequence[Dict[str, str]]) -> None:
    from ..imaging.atomicfile import atomic_path

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
    return f"{_safe_name(ct_name)}-{digest}"


def add_case(folder: PathLike, ct_node: Any, annotation_node: Any, lung_mask_node: Any = None,
             lung_segment_ids: Optional[Sequence[str]] = None, case_id: Optional[str] = None) -> AddedCase:
    """Store one annotated scan in the training folder ``folder`` (created if needed)
    and append it to its manifest.

    Written: ``cases/<case_id>/ct.nrrd`` (the CT's voxels in HU and its world
    geometry; uncompressed, so that the GUI does not wait on gzip), ``lung_mask.nrrd`` (0/1 on the CT's grid; without a lung mask node the
    manifest says ``auto``) and ``annotation.nrrd`` (0 = not annotated, 1..6). The
    case id is ``case_id`` or the CT's name, made unique against the manifest and the
    folder. Refuses (InputError, nothing written) an annotation with nothing painted.
    """
    from . import nodes
    from ..imaging.images import write_array

    root = Path(folder)
    if not str(folder).strip():
        raise InputError("choose a training folder first")
    if root.exists() and not root.is_dir():
        raise InputError(f"the training folder is a file: {root}")
    hu, geometry = nodes.volume_array_and_geometry(ct_node)
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
        mask = nodes.lung_mask_from_node(lung_mask_node, ct_node, lung_segment_ids)
    root.mkdir(parents=True, exist_ok=True)
    (root / CASES_FOLDER).mkdir(exist_ok=True)
    manifest = root / MANIFEST_NAME
    rows = _read_rows(manifest)
    taken = {r.get("case_id", "") for r in rows}
    base = _safe_name(case_id or ct_node.GetName())
    chosen, n = base, 1
    while chosen in taken or (root / CASES_FOLDER / chosen).exists():
        n += 1
        chosen = f"{base}-{n}"

    staging = Path(tempfile.mkdtemp(prefix=f".{chosen}.", suffix=".part", dir=str(root / CASES_FOLDER)))
    final = root / CASES_FOLDER / chosen
    try:
        # Uncompressed: add_case runs on Slicer's GUI thread, and a 512x512x261 int16 CT
        # took 4.1 s gzipped and 0.9 s uncompressed (137 MB), the uint8 mask and
        # annotation 0.15 s and 0.08 s gzipped (1.3 and 0.1 MB) on a 2-CPU VM
        # (bench/training_case_write.py, BENCHMARKS.md).
        write_array(hu, geometry, staging / "ct.nrrd", compress=False)
        if mask is not None:
            write_array(mask.astype(np.uint8), geometry, staging / "lung_mask.nrrd")
        write_array(labels, geometry, staging / "annotation.nrrd")
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


#: Annotated pixels per label of each annotation file read by :func:`summarize`, by
#: path, with the file's (mtime_ns, size) when read: a file not changed since is not
#: read again (the panel summarizes the set whenever the training folder changes).
_ANNOTATION_COUNTS: Dict[str, Any] = {}


def _annotation_counts(path: Path, where: str) -> np.ndarray:
    import SimpleITK as sitk

    key = os.path.abspath(path)
    try:
        stat = os.stat(key)
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = None
    cached = _ANNOTATION_COUNTS.get(key)
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # a copy: a view would outlive its image
    except RuntimeError as e:
        raise InputError(f"{where}: cannot read its annotation {path.name} "
                         f"({str(e).strip().splitlines()[-1]})") from None
    values = np.asarray(array).ravel()
    values = values[(values > 0) & (values <= len(CLASSES))].astype(np.int64)
    counts = np.bincount(values, minlength=len(CLASSES) + 1)
    if stamp is not None:
        _ANNOTATION_COUNTS[key] = (stamp, counts)
    return counts


def summarize(folder: PathLike) -> TrainingSetSummary:
    """Count the annotated pixels per class of every case in the folder's manifest
    (read as ``ildseg train`` reads it). An annotation file is read once and then
    only when its modification time or size changes (cached by path)."""
    from ..training.manifest import read_manifest

    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.exists():
        return TrainingSetSummary(0, {c.name: 0 for c in CLASSES})
    cases = read_manifest(manifest)
    total = np.zeros(len(CLASSES) + 1, np.int64)
    for case in cases:
        total += _annotation_counts(Path(case.annotation), case.where())
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
    from ..engine.modelfile import default_model_path

    try:
        return folder.resolve() == default_model_path().parent.resolve()
    except OSError:
        return False


def list_models(folder: PathLike) -> List[ModelEntry]:
    """Model files in ``folder`` (``*.safetensors``) and in its run folders
    (``*/model.safetensors``), newest first; checkpoints and files that are not model
    files are left out, and so is a run folder's model without its ``finetune.json``
    (a fine-tuning run writes that report last: without it, the run was killed before
    it finished). Metadata only: no torch, never unpickled."""
    import json

    from ..errors import ILDSegError
    from ..engine.modelfile import read_info

    root = Path(folder)
    if not str(folder).strip() or not root.is_dir():
        return []
    candidates = [p for p in root.glob("*.safetensors") if p.is_file()]
    candidates += [p for p in root.glob("*/model.safetensors")
                   if p.is_file() and (p.parent / "finetune.json").is_file()]
    entries: List[ModelEntry] = []
    for path in candidates:
        try:
            info = read_info(path)
        except ILDSegError:
            continue  # not a model file of this project (or a damaged one)
        report = None
        beside = path.parent / "finetune.json"
        if path.parent != root:
            try:
                report = json.loads(beside.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a damaged report: not a finished run either
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
