"""``ildseg compare BASELINE FOLLOWUP --out DIR``: disease change between two scans
of one patient, files in, files out.

Each scan is segmented with :func:`~ILDSegmentationLib.pipeline.segment_file` (its
labels and report kept in DIR as ``baseline.seg.nrrd``/``baseline_report.json`` and
the same for the follow-up), or an earlier ``ildseg segment`` output is reused (a
labels file, or the folder holding it with its ``report.json``). The follow-up is
registered to the baseline (:mod:`ILDSegmentationLib.imaging.registration`); two scans
whose lungs do not overlap after the affine stage (different patients) are refused
unless ``force``. The change (:mod:`ILDSegmentationLib.analysis.change`) is written as:

* ``DIR/change.json``: everything (per class, per region, fibrotic extent, the
  registration's quality, the input checks of both scans and of the pair);
* ``DIR/change.csv``: one row per region x class;
* ``DIR/change_map.seg.nrrd``: the change map on the baseline grid (label values in
  :mod:`ILDSegmentationLib.analysis.change`);
* ``DIR/change_report.png``: one page, matched slices side by side and the fibrotic
  extent per zone (needs matplotlib; skipped with a warning without it);
* with ``registered_followup``, ``DIR/followup_on_baseline.nrrd``: the follow-up CT
  (HU) resampled through the registration onto the baseline grid, so that a viewer
  shows the same anatomy at the same position in both (Slicer's linked views).
* with ``dicom_seg`` (a ``.dcm`` path), the change map as a DICOM Segmentation over the
  baseline's DICOM series (one segment per change map value, numbered as
  :data:`~ILDSegmentationLib.analysis.change.CHANGE_SEGMENT_VALUES`; needs highdicom). A
  baseline that is not a DICOM series is refused before any work.

Every file is written under a temporary name and renamed; when a step fails, the files
this run wrote are removed again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..analysis.change import (change_map, change_map_image, change_summary, change_table_csv, scan_measures,
                               voxel_changes, write_change_dicom_seg)
from ..imaging.atomicfile import atomic_path, check_writable
from ..errors import InputError
from ..imaging.geometry import Geometry, as_volume, same_grid
from ..imaging.registration import mismatch, register_lungs, warp_ct, warp_labels
from ..imaging.images import image_like, write_image
from ..imaging.io import Volume, check_ct_plausible, read_ct, read_image
from ..analysis.regions import DEFAULT_BAND_MM
from ..analysis.suitability import dicom_tags, input_checks, warning_lines

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]
SCANS = ("baseline", "followup")
#: Slice thicknesses (mm) further apart than this are warned about: thin and thick
#: slices show fine patterns differently (partial volume).
THICKNESS_TOLERANCE_MM = 0.5


def _labels_path(given: PathLike) -> Tuple[Path, Optional[Dict[str, Any]]]:
    """An earlier segmentation: a label file, or an ``ildseg segment`` output folder
    (its ``report.json`` names the labels; else the one ``.seg.nrrd`` in it)."""
    p = Path(given)
    if not p.is_dir():
        return p, None
    report_path = p / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        labels = Path(report.get("outputs", {}).get("labels", ""))
        for candidate in (labels, p / labels.name):
            if str(labels) and candidate.is_file():
                return candidate, report
    found = sorted(p.glob("*.seg.nrrd"))
    if len(found) != 1:
        raise InputError(f"{p}: no labels found (a folder of 'ildseg segment' output holds report.json and its "
                         "labels; or give the labels file itself)")
    return found[0], None


def read_labels(path: PathLike, ct: Volume, what: str) -> np.ndarray:
    """A label map 0..6 on the CT's grid (K, J, I, uint8), or InputError."""
    image, _ = read_image(path)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    if not same_grid(geometry, as_volume(array).shape, ct.geometry, as_volume(ct.array).shape):
        raise InputError(f"{what} labels {Path(path).name} are not on the {what} CT's grid (another scan?)")
    if array.size and (array.min() < 0 or array.max() > 6):
        raise InputError(f"{what} labels {Path(path).name} hold values outside 0..6: not an ildseg label map")
    if not array.any():
        raise InputError(f"{what} labels {Path(path).name} are empty (no lung)")
    return array.astype(np.uint8)


def pair_checks(cts: Dict[str, Volume]) -> List[Dict[str, str]]:
    """Checks of the pair: the same scanner, slice thickness and kernel at both scans
    (a change of any of them changes the texture the model reads)."""
    tags = {k: dicom_tags(v.dicom_files) for k, v in cts.items()}
    out = []

    def check(name: str, a: Optional[str], b: Optional[str], differ: bool) -> None:
        if a is None or b is None:
            out.append({"check": name, "status": "ok", "detail": "not recorded for both scans (not DICOM)"})
        else:
            out.append({"check": name, "status": "warning" if differ else "ok",
                        "detail": f"baseline {a}, follow-up {b}" + (": the change may partly be the scanner's"
                                                                      if differ else "")})
    b, f = tags["baseline"], tags["followup"]
    scanner = [" ".join(filter(None, (t.get("manufacturer"), t.get("model")))) or None for t in (b, f)]
    check("scanner", scanner[0], scanner[1], scanner[0] != scanner[1])
    check("reconstruction_kernel", b.get("kernel"), f.get("kernel"),
          (b.get("kernel") or "").strip().upper() != (f.get("kernel") or "").strip().upper())
    thick = []
    for k in SCANS:
        t = tags[k].get("slice_thickness")
        try:
            thick.append(float(str(t).split("\\")[0]) if t else float(cts[k].geometry.spacing[2]))
        except ValueError:
            thick.append(float(cts[k].geometry.spacing[2]))
    out.append({"check": "slice_thickness", "status": "warning" if abs(thick[0] - thick[1]) > THICKNESS_TOLERANCE_MM
                else "ok", "detail": f"baseline {thick[0]:g} mm, follow-up {thick[1]:g} mm"})
    return out


def labelling_warnings(models: Dict[str, Dict[str, Any]], rules: Dict[str, Optional[str]]) -> List[str]:
    """What makes the change partly the labelling's, not the disease's: the two scans
    labelled by different models or decision rules, or a rule other than the paper's
    argmax, the one the minimum detectable change was measured with (unknown for
    labels reused without their report: nothing said)."""
    out = []
    sha = {k: m.get("sha256") for k, m in models.items()}
    if sha.get("baseline") and sha.get("followup") and sha["baseline"] != sha["followup"]:
        out.append("pair: the two scans were labelled by different models: the change is partly the models'")
    known = {k: r for k, r in rules.items() if r}
    if len(known) == 2 and known["baseline"] != known["followup"]:
        out.append(f"pair: the two scans were labelled with different decision rules ({known['baseline']}, "
                   f"{known['followup']}): the change is partly the rules'")
    other = sorted({r for r in known.values() if r != "paper"})
    if other:
        out.append(f"pair: labels made with the '{other[0]}' decision rule; the minimum detectable change behind "
                   "'significant' was measured with the paper's argmax (--decision paper)")
    return out


def _position_check(checks: Dict[str, List[Dict[str, str]]]) -> Dict[str, str]:
    prone = {k: any(c["check"] == "patient_position" and "prone" in c["detail"] for c in v) for k, v in checks.items()}
    differ = prone["baseline"] != prone["followup"]
    detail = ", ".join(f"{'follow-up' if k == 'followup' else k} {'prone' if v else 'supine'}" for k, v in prone.items())
    return {"check": "patient_position", "status": "warning" if differ else "ok",
            "detail": detail + (": dependent density differs between prone and supine; compare scans taken in the "
                                "same position" if differ else "")}


def compare_files(
    baseline: PathLike,
    followup: PathLike,
    out_dir: PathLike,
    *,
    baseline_mask: Optional[PathLike] = None,
    followup_mask: Optional[PathLike] = None,
    baseline_labels: Optional[PathLike] = None,
    followup_labels: Optional[PathLike] = None,
    model: Any = None,
    device: str = "auto",
    max_memory_mb: float = 1024,
    pixel_spacing: str = "model",
    crop_box: str = "mask",
    decision: str = "paper",
    subpleural_band_mm: float = DEFAULT_BAND_MM,
    visual_report: bool = True,
    registered_followup: bool = False,
    deformable: bool = True,
    force: bool = False,
    dicom_seg: Optional[PathLike] = None,
    progress: Any = None,
) -> Dict[str, Any]:
    """Compare two scans (module docstring). ``baseline``/``followup``: CT paths as
    ``ildseg segment`` takes them; ``*_mask``: lung masks (None: computed);
    ``*_labels``: an earlier segmentation to reuse (file or ``segment`` output folder);
    the other options are ``segment``'s. ``force``: go on, with a loud warning, when the
    lungs do not overlap after the affine registration. ``dicom_seg``: also write the
    change map there as a DICOM SEG (a ``.dcm`` name; the baseline must be a DICOM
    series). Returns the change summary (what ``change.json`` holds)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if not out.parent.is_dir():
        raise InputError(f"the folder for --out does not exist: {out.parent}")
    inputs = {"baseline": (baseline, baseline_mask, baseline_labels), "followup": (followup, followup_mask, followup_labels)}
    for k, (ct, mask, labels) in inputs.items():
        if labels is not None and mask is not None:
            raise InputError(f"give the {k} lung mask or earlier labels, not both (the labels are the lung)")
    if Path(baseline).resolve() == Path(followup).resolve():
        raise InputError("the baseline and the follow-up are the same file")
    if dicom_seg is not None:
        _check_dicom_seg(dicom_seg, inputs)
    names = {"json": out / "change.json", "csv": out / "change.csv", "map": out / "change_map.seg.nrrd",
             "png": out / "change_report.png"}
    for k in SCANS:
        if inputs[k][2] is None:
            names[f"{k}_labels"] = out / f"{k}.seg.nrrd"
            names[f"{k}_report"] = out / f"{k}_report.json"
    if visual_report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("no visual report: it needs matplotlib (pip install 'ildsegmentation[report]')")
            visual_report = False
    if not visual_report:
        names.pop("png")
    if registered_followup:
        names["registered"] = out / "followup_on_baseline.nrrd"
    if dicom_seg is not None:
        names["dicom_seg"] = Path(dicom_seg)
    created = not out.exists()
    if created:
        out.mkdir()
    written: List[Path] = []
    try:
        for p in names.values():
            check_writable(p)
        summary = _compare(inputs, names, written, model=model, device=device, max_memory_mb=max_memory_mb,
                           pixel_spacing=pixel_spacing, crop_box=crop_box, decision=decision,
                           band_mm=subpleural_band_mm, visual_report=visual_report, deformable=deformable,
                           force=force, progress=progress)
        summary["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
        with atomic_path(names["json"]) as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=2))
        written.append(names["json"])
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return summary


def _check_dicom_seg(path: PathLike, inputs: Dict[str, Tuple[Any, Any, Any]]) -> None:
    """Before any work: the change map's DICOM SEG ``path`` is a ``.dcm`` name, outside
    every input (a DICOM series folder included), over a baseline read from DICOM."""
    from ..imaging.dicomseg import check_dicom_source, is_dicom_seg_path
    p = Path(path)
    if not is_dicom_seg_path(p):
        raise InputError(f"the DICOM SEG output is a DICOM file: name it .dcm, not {p.name}")
    for k, given in inputs.items():
        for q in (Path(v) for v in given if v is not None):
            if p.resolve() == q.resolve() or (q.is_dir() and q.resolve() in p.resolve().parents):
                raise InputError(f"--dicom-seg {p} would be written into the {k} input {q}: choose another place")
    check_dicom_source(inputs["baseline"][0], p, what="the baseline CT",
                       instead="the change map is DICOM only over a DICOM baseline (change_map.seg.nrrd is "
                               "written either way)")


def _algorithm_parameters(inputs: Dict[str, Tuple[Any, Any, Any]], models: Dict[str, Dict[str, Any]],
                          deformable: bool) -> Dict[str, str]:
    """What the change map's DICOM SEG records of how it was made: each scan's model
    (name and sha256) or that its labels were reused, the follow-up's file name, and
    the registration."""
    out = {}
    for k in SCANS:
        m = models.get(k) or {}
        if m.get("name"):
            out.update({f"{k}_model": str(m["name"]), f"{k}_model_sha256": str(m.get("sha256", ""))})
        else:
            out[f"{k}_labels"] = "reused"
    out["followup"] = Path(str(inputs["followup"][0]).rstrip("/")).name
    out["registration"] = "affine + B-spline" if deformable else "affine"
    return out


def _stage(progress: Any, start: float, span: float) -> Any:
    return None if progress is None else (lambda f, msg: progress(start + span * f, msg))


def _compare(inputs, names, written, *, model, device, max_memory_mb, pixel_spacing, crop_box, decision, band_mm,
             visual_report, deformable, force, progress) -> Dict[str, Any]:
    from ..engine.modelfile import load_model
    from ..analysis.pipeline import segment_file
    timings: Dict[str, float] = {}
    cts: Dict[str, Volume] = {}
    labels: Dict[str, np.ndarray] = {}
    checks: Dict[str, List[Dict[str, str]]] = {}
    sources: Dict[str, str] = {}
    measures: Dict[str, Dict[str, Any]] = {}
    models: Dict[str, Dict[str, Any]] = {}  # the model that made each scan's labels, when known
    rules: Dict[str, Optional[str]] = {}  # the decision rule that made them, when known
    loaded = None
    for n, k in enumerate(SCANS):
        ct_path, mask, given = inputs[k]
        t = time.perf_counter()
        cts[k] = read_ct(ct_path)
        check_ct_plausible(cts[k], ct_path)
        if as_volume(cts[k].array).shape[0] < 2 or cts[k].array.ndim != 3:
            raise InputError(f"the {k} CT is a single slice: comparing needs a volume")
        if given is not None:
            path, report = _labels_path(given)
            labels[k] = read_labels(path, cts[k], k)
            checks[k] = (report or {}).get("input_checks") or input_checks(cts[k].array, labels[k], cts[k].geometry,
                                                                          dicom_files=cts[k].dicom_files)
            sources[k] = f"reused: {path}"
            models[k] = dict((report or {}).get("model") or {})
            rules[k] = ((report or {}).get("decision_rule") or {}).get("name")
        else:
            loaded = loaded or (model if model is not None and not isinstance(model, (str, os.PathLike))
                                else load_model(model))
            report = segment_file(ct_path, names[f"{k}_labels"], lung_mask=mask, model=loaded, device=device,
                                  report=names[f"{k}_report"], max_memory_mb=max_memory_mb,
                                  pixel_spacing=pixel_spacing, crop_box=crop_box, decision=decision,
                                  subpleural_band_mm=band_mm,
                                  progress=_stage(progress, 0.4 * n, 0.4))
            written += [names[f"{k}_labels"], names[f"{k}_report"]]
            labels[k] = read_labels(names[f"{k}_labels"], cts[k], k)
            checks[k] = report["input_checks"]
            measures[k] = report  # its class volumes and regions, as scan_measures computes them
            models[k] = dict(report["model"])
            rules[k] = report["decision_rule"]["name"]
            sources[k] = f"segmented: {names[f'{k}_labels']} (model {report['model']['name']})"
        timings[f"{k}_segment"] = round(time.perf_counter() - t, 2)

    if progress:
        progress(0.8, "registering the follow-up to the baseline")
    t = time.perf_counter()
    b_img, f_img = cts["baseline"].image, cts["followup"].image
    b_lab = image_like(labels["baseline"], b_img)
    f_lab = image_like(labels["followup"], f_img)
    reg = register_lungs(b_img, b_lab, f_img, f_lab, deformable=deformable)
    timings["registration"] = round(time.perf_counter() - t, 2)
    warnings: List[str] = []
    message = mismatch(reg)
    if message:
        if not force:
            raise InputError(message + " (--force compares anyway)")
        warnings.append("REGISTRATION FAILED OR DIFFERENT PATIENTS: " + message)
        log.warning(warnings[-1])

    t = time.perf_counter()
    warped = sitk.GetArrayFromImage(warp_labels(f_lab, b_img, reg.transform))
    cmap = change_map(labels["baseline"], warped)
    for k in SCANS:
        if k not in measures:
            measures[k] = scan_measures(labels[k], cts[k].geometry, band_mm)
    summary: Dict[str, Any] = {"ildseg_version": __version__, "baseline": {"ct": str(inputs["baseline"][0])},
                               "followup": {"ct": str(inputs["followup"][0])}}
    for k in SCANS:
        summary[k].update({"labels": sources[k], "decision_rule": rules[k], "lung_ml": measures[k]["lung_volume_ml"],
                           "size_ijk": list(cts[k].image.GetSize()), "spacing_mm": list(cts[k].image.GetSpacing())})
    summary.update(change_summary(measures["baseline"], measures["followup"]))
    summary["registration"] = reg.summary()
    summary["voxel_changes"] = voxel_changes(labels["baseline"], warped, cts["baseline"].geometry)
    pair = pair_checks(cts) + [_position_check(checks)]
    summary["input_checks"] = {"baseline": checks["baseline"], "followup": checks["followup"], "pair": pair}
    for k in SCANS:
        for line in warning_lines({"input_checks": checks[k]}):
            warnings.append(f"{k}: {line}")
    warnings += [f"pair: {line}" for line in warning_lines({"input_checks": pair})]
    warnings += labelling_warnings(models, rules)
    summary["warnings"] = warnings
    summary["change_map_labels"] = "see ILDSegmentationLib/analysis/change.py; segment names in the .seg.nrrd"
    timings["measures"] = round(time.perf_counter() - t, 2)

    if progress:
        progress(0.9, "writing")
    write_image(change_map_image(cmap, b_img), names["map"])
    written.append(names["map"])
    with atomic_path(names["csv"]) as tmp:
        Path(tmp).write_text(change_table_csv(summary), encoding="utf-8")
    written.append(names["csv"])
    summary["outputs"] = {"json": str(names["json"]), "csv": str(names["csv"]), "change_map": str(names["map"])}
    f_on_b = warp_ct(f_img, b_img, reg.transform) if visual_report or "registered" in names else None
    if "registered" in names:
        # Rounded back to whole HU in int16, as CTs are stored (half the float's size).
        write_image(sitk.Cast(sitk.Round(f_on_b), sitk.sitkInt16), names["registered"])
        written.append(names["registered"])
        summary["outputs"]["followup_on_baseline"] = str(names["registered"])
    if "dicom_seg" in names:
        b_model = models.get("baseline") or {}
        write_change_dicom_seg(cmap, cts["baseline"], names["dicom_seg"],
                               _algorithm_parameters(inputs, models, deformable), b_model.get("name", ""),
                               b_model.get("sha256", ""))
        written.append(names["dicom_seg"])
        summary["outputs"]["dicom_seg"] = str(names["dicom_seg"])
    if visual_report:
        from ..analysis.change_report import render_change_report
        f_ct = sitk.GetArrayFromImage(f_on_b)
        render_change_report(np.asarray(cts["baseline"].array), labels["baseline"], f_ct, warped, cmap,
                             cts["baseline"].geometry, summary, names["png"])
        written.append(names["png"])
        summary["outputs"]["visual_report"] = str(names["png"])
    summary["timings_s"] = timings
    if progress:
        progress(1.0, "done")
    return summary


# ------------------------------------------------------------------ the command line


def add_parser(sub: Any, add_run_options: Any, add_common: Any) -> None:
    """``ildseg compare``'s arguments (cli.py calls this with its shared option adders)."""
    p = sub.add_parser("compare", help="disease change between a baseline and a follow-up CT of one patient")
    p.add_argument("baseline", metavar="BASELINE", help="baseline CT (as ildseg segment takes it)")
    p.add_argument("followup", metavar="FOLLOWUP", help="follow-up CT")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created if absent): change.json, change.csv, change_map.seg.nrrd, "
                        "change_report.png, and each scan's labels and report when segmented here")
    for k, what in (("baseline", "baseline"), ("followup", "follow-up")):
        p.add_argument(f"--{k}-mask", metavar="MASK", help=f"lung mask of the {what} CT (default: computed)")
        p.add_argument(f"--{k}-labels", metavar="FILE|DIR",
                       help=f"reuse an earlier 'ildseg segment' result for the {what}: its labels file or its "
                            "output folder (report.json + labels) instead of segmenting again")
    p.add_argument("--crop-box", default="mask", choices=("mask", "aerated"), help="as for ildseg segment")
    p.add_argument("--subpleural-band", type=float, default=DEFAULT_BAND_MM, metavar="MM",
                   help="width of the subpleural band in mm (default: 10)")
    p.add_argument("--no-visual-report", action="store_true", help="do not write change_report.png")
    p.add_argument("--registered-followup", action="store_true",
                   help="also write followup_on_baseline.nrrd: the follow-up CT moved onto the baseline grid "
                        "through the registration (to view both side by side at the same anatomy)")
    p.add_argument("--affine-only", action="store_true",
                   help="register with the affine stage only (no deformable step within the lung)")
    p.add_argument("--force", action="store_true",
                   help="compare even when the lungs do not match after registration (different patients?), "
                        "with a warning in change.json")
    p.add_argument("--dicom-seg", metavar="OUT.dcm",
                   help="also write the change map as a DICOM Segmentation over the baseline's DICOM series: one "
                        "segment per change (each class unchanged, new or resolved, and lung not covered by the "
                        "follow-up), with the class's DICOM codes (needs highdicom: pip install "
                        "'ildsegmentation[dicom]'; the baseline must be a DICOM series)")
    p.add_argument("--progress-lines", action="store_true",
                   help="print progress as lines 'ildseg-progress FRACTION MESSAGE' (for the Slicer module)")
    add_run_options(p)
    # The minimum detectable change (MDC_* in analysis/change.py) was measured with the
    # paper's argmax: significance is only meaningful under the rule it was measured with.
    p.set_defaults(decision="paper")
    add_common(p)


def cmd_compare(args: Any) -> int:
    import sys
    from ..analysis.change import format_change
    if args.progress_lines:
        from .progress import ProgressLines
        bar = ProgressLines()
    else:
        from .progress import ProgressBar
        bar = ProgressBar(args.quiet)
    try:
        summary = compare_files(args.baseline, args.followup, args.out, baseline_mask=args.baseline_mask,
                                followup_mask=args.followup_mask, baseline_labels=args.baseline_labels,
                                followup_labels=args.followup_labels, model=args.model, device=args.device,
                                max_memory_mb=args.max_memory, pixel_spacing=args.pixel_spacing,
                                crop_box=args.crop_box, decision=args.decision, subpleural_band_mm=args.subpleural_band,
                                visual_report=not args.no_visual_report,
                                registered_followup=args.registered_followup, deformable=not args.affine_only,
                                force=args.force, dicom_seg=args.dicom_seg, progress=bar)
    finally:
        bar.close()
    for w in summary["warnings"]:
        print(f"ildseg: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(format_change(summary))
        reg = summary["registration"]
        print(f"registration: lung Dice {reg['lung_dice_affine']:.3f} affine, {reg['lung_dice']:.3f} after the "
              f"deformable step; lung {summary['lung']['baseline_ml']:.0f} -> {summary['lung']['followup_ml']:.0f} mL")
        print(f"outputs in {args.out}: " + ", ".join(Path(p).name for p in summary["outputs"].values()))
    return 0
