"""Slicer logic of "Compare with an earlier scan", GUI-free: ``ildseg compare`` on two
CT volume nodes in a background child process, the way "Segment ILD" runs
(:class:`~ILDSegmentationLib.background.BackgroundJob`), and its results loaded into
the scene: the change map as a segmentation node on the baseline CT, and the change
table as a table node.

:class:`CompareJob` ``start()`` reads the scene only: it writes both CTs (world-space
geometry) and, when given, their ILD segmentations (the six class segments, as a label
map on each CT's grid, to reuse instead of segmenting again) into a temporary folder
and starts the child. ``poll()`` follows its progress lines; ``finish()``, after
SUCCEEDED, adds the nodes and returns a :class:`CompareResult`. Nodes given are never
modified: the follow-up is shown registered as a new volume node (the follow-up CT
moved onto the baseline grid by the child), not by moving the user's node.
:func:`link_views` shows both side by side with the change map, scrolling together.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..imaging.images import write_array
from .background import BackgroundJob

#: Columns of the change table node (whole lung and every region, per class).
TABLE_COLUMNS = ("Region", "Class", "Baseline [%]", "Follow-up [%]", "Change [pp]", "Baseline [mL]",
                 "Follow-up [mL]", "Change [mL]", "Significant")


@dataclass
class CompareResult:
    """What :meth:`CompareJob.finish` added: the change map segmentation node, the
    change table node, the follow-up CT on the baseline grid (a scalar volume node),
    and the summary (``change.json``); ``baseline_node``: the CT they lie on."""

    segmentation_node: Any
    table_node: Any
    summary: Dict[str, Any]
    registered_followup_node: Any = None
    baseline_node: Any = None


class CompareJob(BackgroundJob):
    """``ildseg compare`` on two CT volume nodes in a separate process.

    ``baseline_segmentation`` / ``followup_segmentation``: optional ILD segmentation
    nodes (from "Segment ILD") to reuse; ``*_mask_node``: optional lung masks (label
    map or segmentation nodes), used when the scan is segmented. Other parameters as
    :class:`~ILDSegmentationLib.background.SegmentationJob`; ``force`` compares scans
    that look like different patients (with a warning)."""

    what = "the comparison process"

    def __init__(self, scene: Any, baseline_node: Any, followup_node: Any, *, baseline_segmentation: Any = None,
                 followup_segmentation: Any = None, baseline_mask_node: Any = None, followup_mask_node: Any = None,
                 model: Optional[str] = None, device: str = "auto", force: bool = False,
                 python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 temp_root: Optional[str] = None, library: Optional[str] = None) -> None:
        super().__init__(python=python, env=env, temp_root=temp_root, library=library)
        self.scene = scene
        self.nodes = {"baseline": (baseline_node, baseline_segmentation, baseline_mask_node),
                      "followup": (followup_node, followup_segmentation, followup_mask_node)}
        self.model = None if model in (None, "") else str(model)
        self.device = device
        self.force = force

    def start(self) -> "CompareJob":
        """Check and write the inputs, start the child (InputError in one line, nothing
        started, when the nodes do not fit)."""
        from . import nodes
        from ..classes import CLASSES
        from ..errors import InputError

        base_node, foll_node = self.nodes["baseline"][0], self.nodes["followup"][0]
        if base_node is None or foll_node is None:
            raise InputError("choose a baseline and a follow-up CT volume")
        if base_node is foll_node:
            raise InputError("the baseline and the follow-up are the same volume")
        self._check_model(self.model)
        inputs = {}
        for k, (ct_node, seg_node, mask_node) in self.nodes.items():
            hu, geometry = nodes.volume_array_and_geometry(ct_node)
            labels = None
            if seg_node is not None:
                ids = [c.segment_id for c in CLASSES]
                missing = [i for i in ids if seg_node.GetSegmentation().GetSegment(i) is None]
                if missing:
                    raise InputError(f"the {k} segmentation '{seg_node.GetName()}' is not an ILD segmentation "
                                     f"(no segment {missing[0]}): run Segment ILD on it, or leave it out")
                # Segment n of CLASSES gets value n + 1: the class label.
                labels = nodes.segments_to_array(seg_node, ids, ct_node)
            mask = None if mask_node is None or labels is not None else nodes.lung_mask_from_node(mask_node, ct_node)
            inputs[k] = (hu, geometry, labels, mask)
        def write_inputs(folder: Path) -> List[str]:
            args = ["compare"]
            options: List[str] = []
            for k, (hu, geometry, labels, mask) in inputs.items():
                write_array(hu, geometry, folder / f"{k}.nrrd", compress=False)
                args.append(str(folder / f"{k}.nrrd"))
                if labels is not None:
                    write_array(labels, geometry, folder / f"{k}_labels.nrrd", compress=False)
                    options += [f"--{k}-labels", str(folder / f"{k}_labels.nrrd")]
                elif mask is not None:
                    write_array(mask, geometry, folder / f"{k}_mask.nrrd", compress=False)
                    options += [f"--{k}-mask", str(folder / f"{k}_mask.nrrd")]
            args += ["--out", str(folder / "out"), "--progress-lines", "--no-visual-report", "--registered-followup",
                     "--device", self.device, *options]
            return args + (["--force"] if self.force else [])

        self._start_child(write_inputs, self.model, "Starting PyTorch and loading the model")
        return self

    def finish(self) -> CompareResult:
        """After SUCCEEDED: the change map as a segmentation node referencing the
        baseline CT, the change table as a table node, the follow-up CT on the
        baseline grid as a volume node; the temporary folder removed. Nothing is added
        when one of them cannot be read."""
        out = self._require_success() / "out"
        added: List[Any] = []
        try:
            summary = json.loads((out / "change.json").read_text(encoding="utf-8"))
            base, follow = self.nodes["baseline"][0], self.nodes["followup"][0]
            added.append(load_change_map(self.scene, str(out / "change_map.seg.nrrd"), base))
            added.append(load_registered_followup(self.scene, str(out / "followup_on_baseline.nrrd"), follow, base))
            added.append(change_table_node(self.scene, summary))
            return CompareResult(added[0], added[2], summary, added[1], base)
        except BaseException:
            from .mrml import remove_node
            for node in added:
                remove_node(self.scene, node)  # with its display node
            raise
        finally:
            self.cleanup()


def _read_new_node(scene: Any, class_name: str, name: str, storage: Any, path: str, what: str) -> Any:
    """A new node of ``class_name`` read from ``path`` by ``storage``, left without a
    storage node: the file lives in a temporary folder that goes away, so the node is
    unsaved data now. Nothing stays in the scene when Slicer cannot read the file."""
    from ..errors import InputError
    from .mrml import remove_node
    node = scene.AddNewNodeByClass(class_name, _unique(scene, name))
    scene.AddNode(storage)
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    read = storage.ReadData(node)
    node.SetAndObserveStorageNodeID(None)
    scene.RemoveNode(storage)
    if not read:
        remove_node(scene, node)  # with any display node the reader made
        raise InputError(f"Slicer could not read the {what} {path}")
    return node


def load_change_map(scene: Any, path: str, baseline_node: Any) -> Any:
    """Read a ``change_map.seg.nrrd`` into a new segmentation node (its segments named
    and coloured by the file) referencing ``baseline_node``."""
    import slicer
    node = _read_new_node(scene, "vtkMRMLSegmentationNode", f"{baseline_node.GetName()} change",
                          slicer.vtkMRMLSegmentationStorageNode(), path, "change map")
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), baseline_node.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def load_registered_followup(scene: Any, path: str, followup_node: Any, baseline_node: Any) -> Any:
    """Read the follow-up CT moved onto the baseline grid (``followup_on_baseline.nrrd``)
    into a new scalar volume node named after the follow-up, displayed with the
    follow-up's window and level. Its geometry is the baseline's world grid (the
    file's), so it needs no transform."""
    import slicer
    node = _read_new_node(scene, "vtkMRMLScalarVolumeNode", f"{followup_node.GetName()} on {baseline_node.GetName()}",
                          slicer.vtkMRMLVolumeArchetypeStorageNode(), path, "registered follow-up")
    node.CreateDefaultDisplayNodes()
    shown, display = followup_node.GetDisplayNode(), node.GetDisplayNode()
    if shown is not None and display is not None:
        display.SetAndObserveColorNodeID(shown.GetColorNodeID())
        display.SetAutoWindowLevel(shown.GetAutoWindowLevel())
        if not shown.GetAutoWindowLevel():
            display.SetWindowLevel(shown.GetWindow(), shown.GetLevel())
    return node


#: The two slice views of Slicer's side-by-side layout (vtkMRMLLayoutLogic: "Red" and
#: "Yellow", both axial).
SIDE_BY_SIDE_VIEWS = ("Red", "Yellow")


def link_views(scene: Any, result: CompareResult) -> None:
    """Baseline left, follow-up (registered) right, the change map over both, the two
    views linked so they scroll and zoom together: the same anatomy at the same place,
    since both are on the baseline grid. Sets the side-by-side layout when the scene
    has a layout node (in the application), and the views' composite nodes it has."""
    import slicer
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    # The layout asks for two axial views only when it creates them; Yellow already
    # exists (sagittal in the conventional layout), and linked views follow each other
    # only when their orientations match.
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        view = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if view.GetLayoutName() in SIDE_BY_SIDE_VIEWS:
            view.SetOrientationToAxial()
    follow = result.registered_followup_node
    shown = {SIDE_BY_SIDE_VIEWS[0]: result.baseline_node, SIDE_BY_SIDE_VIEWS[1]: follow}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        volume = shown.get(composite.GetLayoutName())
        if volume is None:
            continue
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)
    display = result.segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)


def describe_change(summary: Dict[str, Any]) -> List[str]:
    """The panel's lines: the fibrotic extent at both scans and its change (against
    the minimum detectable change), every significant class change, the registration's
    quality, and the warnings."""
    fe = summary["fibrotic_extent"]
    lines = [f"Fibrotic extent (reticulation + honeycombing): {fe['baseline']:.1f} % -> {fe['followup']:.1f} % of "
             f"the lung, {fe['change']:+.1f} percentage points: "
             + ("beyond" if fe["significant"] else "within")
             + f" what the tool measures when nothing changed ({fe['mdc_percent_points']:g} pp)."]
    changed = [c for c in summary["classes"] if c["significant"]]
    lines += [f"{c['name']}: {c['baseline_percent']:.1f} % -> {c['followup_percent']:.1f} % "
              f"({c['change_percent_points']:+.1f} pp, {c['change_ml']:+.0f} mL), significant" for c in changed]
    if not changed:
        lines.append("No class changed beyond its minimum detectable change.")
    reg = summary["registration"]
    lines.append(f"Registration: lung overlap (Dice) {reg['lung_dice']:.3f}; lung {summary['lung']['baseline_ml']:.0f} "
                 f"-> {summary['lung']['followup_ml']:.0f} mL.")
    lines += [f"Warning: {w}" for w in summary.get("warnings", [])]
    return lines


def _unique(scene: Any, name: str) -> str:
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def change_table_node(scene: Any, summary: Dict[str, Any]) -> Any:
    """A table node of the change: the whole lung per class and fibrotic extent first,
    then every region (columns :data:`TABLE_COLUMNS`)."""
    import vtk
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", _unique(scene, "ILD change"))
    table = node.GetTable()
    string_cols = {"Region", "Class", "Significant"}
    arrays = []
    for name in TABLE_COLUMNS:
        a = vtk.vtkStringArray() if name in string_cols else vtk.vtkDoubleArray()
        a.SetName(name)
        table.AddColumn(a)
        arrays.append(a)
    whole = {"region": "lung", "classes": summary["classes"], "fibrotic_extent": summary["fibrotic_extent"]}
    for r in [whole] + summary["regions"]:
        rows = [(c["name"], c["baseline_percent"], c["followup_percent"], c["change_percent_points"],
                 c["baseline_ml"], c["followup_ml"], c["change_ml"], c["significant"]) for c in r["classes"]]
        fe = r["fibrotic_extent"]
        rows.append(("Fibrotic (Ret + HC)", fe["baseline"], fe["followup"], fe["change"], fe.get("baseline_ml", float("nan")),
                     fe.get("followup_ml", float("nan")), fe.get("change_ml", float("nan")), fe.get("significant")))
        for row in rows:
            values = (r["region"],) + row
            for a, v in zip(arrays, values):
                if isinstance(a, vtk.vtkStringArray):
                    a.InsertNextValue("" if v is None else ("yes" if v is True else "no" if v is False else str(v)))
                else:
                    a.InsertNextValue(float(v))
    node.Modified()
    node.SetLocked(True)
    return node


__all__ = ["CompareJob", "CompareResult", "load_change_map", "load_registered_followup", "change_table_node",
           "link_views", "describe_change", "TABLE_COLUMNS", "SIDE_BY_SIDE_VIEWS"]
