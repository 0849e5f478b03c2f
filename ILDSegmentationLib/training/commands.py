"""``ildseg train | finetune | evaluate | split | simulate``: thin shells over the training package."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..classes import CLASSES
from ..engine.device import DEVICE_CHOICES
from ..errors import InputError
from ..engine.network import PRESETS
from ..engine.preprocessing import INTENSITY_PRESETS
from ..engine.resolution import PIXEL_SPACING_CHOICES
from .augment import INTENSITY_AUGMENTATIONS
from .loss import ENTROPY_SCALINGS
from ..simulation.config import (DEFAULT_DEGREES, DEFAULT_INSPIRATION, DEFAULT_SHIFT_MM, DEFAULT_SLICE_PHASE,
                                 FOLLOWUP_KINDS)

#: ``ildseg simulate --followup``'s files, per case: the two CTs (simulated ILD, HU),
#: the truth label maps (0 outside the lung, 1..6) on each scan's grid and the
#: follow-up's truth before the motion on the baseline grid, the lung masks (1 right,
#: 2 left), and truth.json (simulation/followup.py, truth_record).
FOLLOWUP_FILES = ("baseline.nrrd", "followup.nrrd", "baseline_truth.nrrd", "followup_truth.nrrd",
                  "followup_truth_on_baseline.nrrd", "baseline_lung_mask.nrrd", "followup_lung_mask.nrrd",
                  "truth.json")
#: Limits of the follow-up's motion: a repositioned patient, which registration is
#: meant to undo, not another scan altogether.
MAX_DEGREES = 15.0
MAX_SHIFT_MM = 50.0
INSPIRATION_RANGE = (0.8, 1.25)


def add_parsers(sub, common) -> None:
    t = sub.add_parser("train", help="train a model on annotated cases with the paper's protocol")
    t.add_argument("--manifest", required=True, help="CSV: case_id,ct,lung_mask,annotation")
    t.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: model, checkpoint, log, plots")
    t.add_argument("--folds", type=int, help="per-scan folds, balanced by hill climbing (default 5)")
    t.add_argument("--fold", type=int, default=0, help="which fold validates (default 0)")
    t.add_argument("--val-fraction", type=float, help="instead of --folds/--fold: validate on ~this share of scans")
    t.add_argument("--split", metavar="folds.json", help="the folds written by 'ildseg split' (instead of "
                   "computing them); --fold picks the validation fold")
    t.add_argument("--preset", default="proposed", choices=list(PRESETS), help="a Table II configuration")
    t.add_argument("--epochs", type=int, default=1000, help="at most this many epochs (default 1000)")
    t.add_argument("--patience", type=int, default=50, help="early stopping patience in epochs (paper: 50)")
    t.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the first epoch that ends this many seconds after training starts "
                        "(best weights kept; --resume continues); default: no limit")
    t.add_argument("--min-rel-improvement", type=float, default=0.005,
                   help="relative BACC gain that counts as improvement (paper: 0.005)")
    t.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4)")
    t.add_argument("--unsupervised-weight", type=float, default=0.1, help="entropy term weight w_u (paper: 0.1)")
    t.add_argument("--entropy-scaling", default="ratio", choices=ENTROPY_SCALINGS,
                   help="a in -a*w_u*sum(p log p): labeled/unlabeled pixel ratio (default) or 1")
    t.add_argument("--batch-size", type=int, default=1, help="crops per step (paper: 1)")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="arithmetic of training: bf16 autocast (norm statistics, loss and weights in float32), "
                        "fp32 (the paper's), or auto (default): bf16 where the device runs it natively")
    t.add_argument("--crops-per-epoch", type=int, default=0,
                   help="0 (paper): every crop once per epoch; N: a seeded random N crops per epoch")
    t.add_argument("--intensity", default="hu", choices=list(INTENSITY_PRESETS), help="input intensity handling")
    t.add_argument("--no-augment", action="store_true", help="no flips/rotations")
    t.add_argument("--intensity-augmentation", default="none", choices=INTENSITY_AUGMENTATIONS,
                   help="none (paper) or scanner: a random kernel and noise per crop, for data from few scanners")
    t.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.safetensors")
    t.add_argument("--init", metavar="MODEL", help="start from this model file's weights (fine-tuning; same "
                   "preset and --intensity) instead of a random init")
    t.add_argument("--seed", type=int, default=0)
    common(t)

    f = sub.add_parser("finetune", help="fine-tune a trained model on a few sparse annotations of your own scans")
    f.add_argument("--manifest", required=True, help="CSV: case_id,ct,lung_mask,annotation (as for train)")
    f.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: model.safetensors, finetune.json (before/after), checkpoint, log, plots")
    f.add_argument("--model", help="the model to start from (default: the bundled one)")
    f.add_argument("--val-fraction", type=float, default=0.25,
                   help="hold out ~this share of the scans (two scans or more) or, with one scan, of its annotated "
                        "slices as a slab at one end, to measure before/after and stop early (default 0.25)")
    f.add_argument("--slab-gap", type=float, default=40.0, metavar="MM",
                   help="one scan: least distance along the body axis between held-out and training slices; "
                        "slices in between are used by neither side (default 40)")
    f.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of distillation toward the start model's predictions on the unpainted lung, "
                        "so it keeps what it was not shown (1: as much as the painted pixels; 0: off; default 1)")
    f.add_argument("--l2sp-weight", type=float, default=0.0,
                   help="weight of the pull of the learning weights toward the start model's (L2-SP; default 0: off)")
    f.add_argument("--min-gain", type=float, default=0.01,
                   help="the fine-tuned model is offered only if its held-out balanced accuracy beats the start "
                        "model's by this much; otherwise exit status 4 and the start model stays (default 0.01)")
    f.add_argument("--epochs", type=int, default=40, help="at most this many epochs (default 40)")
    f.add_argument("--patience", type=int, default=10, help="stop after this many epochs without improvement (default 10)")
    f.add_argument("--train-layers", default="last", choices=("last", "head", "all"),
                   help="last (default): the last 1x1 block and the classifier learn, on the earlier layers' output "
                        "computed once (minutes on a CPU); head: the whole 1x1 head; all: every layer, with "
                        "flips/rotations (for a GPU)")
    f.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 1e-3 for last/head, 3e-5 for all)")
    f.add_argument("--batch-size", type=int, default=4, help="crops per step (default 4)")
    f.add_argument("--crops-per-epoch", type=int, default=0, help="a seeded random N crops per epoch (default: all)")
    f.add_argument("--unsupervised-weight", type=float, default=0.1, help="entropy term weight w_u (paper: 0.1)")
    f.add_argument("--intensity-augmentation", default="none", choices=INTENSITY_AUGMENTATIONS,
                   help="'scanner': a random kernel and noise per crop (see ildseg train)")
    f.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the first epoch that ends past this many seconds; the best weights are kept")
    f.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    f.add_argument("--seed", type=int, default=0)
    common(f)

    e = sub.add_parser("evaluate", help="balanced accuracy, confusion matrix and Dice of a model on cases")
    e.add_argument("--manifest", required=True)
    e.add_argument("--model", help="model file (default: the bundled one)")
    e.add_argument("--report", metavar="eval.json")
    e.add_argument("--confusion", metavar="confusion.png")
    e.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    e.add_argument("--pixel-spacing", default="model", choices=PIXEL_SPACING_CHOICES,
                   help="as in 'ildseg segment': model (default) resamples CTs outside the model's training "
                        "range of pixel sizes into it; native runs at each CT's own")
    common(e)

    s = sub.add_parser("split", help="per-scan folds balanced by hill climbing on class-distribution entropy")
    s.add_argument("--manifest", required=True)
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--out", required=True, metavar="folds.json")
    s.add_argument("--seed", type=int, default=0)
    common(s)

    m = sub.add_parser("simulate", help="insert simulated ILD patterns into real lung: training/test cases")
    m.add_argument("--ct", required=True, nargs="+", help="one or more CTs (file or DICOM folder)")
    m.add_argument("--lung-mask", nargs="+", help="lung masks, one per CT (default: computed)")
    m.add_argument("--out", required=True, metavar="CASE_DIR")
    m.add_argument("--cases-per-ct", type=int, default=1, help="cases (different seeds) per CT")
    m.add_argument("--seed", type=int, default=0)
    # dest: "followup" is compare's follow-up CT, which cli.py checks as an input path.
    m.add_argument("--followup", choices=FOLLOWUP_KINDS, dest="followup_kind",
                   help="instead of a training case, a baseline and a follow-up with a known answer per CT, to "
                        "check 'ildseg compare': moved (the same simulated disease, the lung moved, breathed and "
                        "cut differently: no change) or progressed (fibrosis added, then moved). Writes "
                        f"{', '.join(FOLLOWUP_FILES[:-1])} and truth.json (the true fibrotic extent and percent "
                        "of each class at both scans, their change, and the motion; README), a subfolder per case "
                        "when several, and prints the 'ildseg compare' command to run on the pair")
    m.add_argument("--motion-degrees", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="--followup: rotations about the LPS x, y, z axes through the CT's centre, in degrees "
                        f"(default {' '.join(f'{v:g}' for v in DEFAULT_DEGREES)}; each at most {MAX_DEGREES:g})")
    m.add_argument("--motion-shift", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="--followup: shift along the LPS x, y, z axes, in mm "
                        f"(default {' '.join(f'{v:g}' for v in DEFAULT_SHIFT_MM)}; each at most {MAX_SHIFT_MM:g})")
    m.add_argument("--inspiration", type=float, metavar="SCALE",
                   help="--followup: the lung's size at the follow-up relative to the baseline, along each axis "
                        f"(below 1: a shallower breath; default {DEFAULT_INSPIRATION:g}, "
                        f"{INSPIRATION_RANGE[0]:g} to {INSPIRATION_RANGE[1]:g})")
    m.add_argument("--slice-phase", type=float, metavar="FRACTION",
                   help="--followup: the follow-up's slices cut this fraction of a slice further along the body "
                        f"axis (default {DEFAULT_SLICE_PHASE:g}; 0 to below 1)")
    common(m)


def cmd_split(args) -> int:
    from .dataset import class_pixel_counts, load_case_crops
    from .manifest import read_manifest
    from .split import distribution_entropy, split_scans
    from ..imaging.atomicfile import atomic_path, check_writable
    from ..engine.preprocessing import INTENSITY_PRESETS as PRESETS
    if args.folds < 2:
        raise InputError(f"--folds must be 2 or more, not {args.folds}")
    check_writable(args.out)
    cases = read_manifest(args.manifest)
    # The very counts 'ildseg train' balances (annotated voxels inside the lung crops),
    # so that 'train --folds N --seed S' makes these folds; 'train --split' reads them.
    counts = {c.case_id: class_pixel_counts(load_case_crops(c, PRESETS["hu"])) for c in cases}
    try:
        folds = split_scans(cases, counts, args.folds, args.seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    scan_of = {c.case_id: c.scan_id for c in cases}
    rows = []
    for k, f in enumerate(folds):
        c = sum(counts[i] for i in f)
        share = c / max(c.sum(), 1)
        scans = sorted({scan_of[i] for i in f})
        rows.append({"fold": k, "cases": f, "scans": scans, "class_pixels": c.tolist(),
                     "entropy": distribution_entropy(c)})
        if not args.quiet:
            print(f"fold {k}: {len(scans)} scans, {len(f)} cases, entropy {distribution_entropy(c):.3f}, "
                  + ", ".join(f"{cl.abbreviation} {100 * s:.1f}%" for cl, s in zip(CLASSES, share)))
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps({"folds": rows, "seed": args.seed,
                                         "classes": [c.name for c in CLASSES]}, indent=2))
    return 0


def _folds_from_file(path: str, cases) -> List[List[str]]:
    """The folds of an 'ildseg split' file, checked against the manifest's cases and
    scans: each case in exactly one fold, the cases of a scan in the same one."""
    try:
        folds = [[str(c) for c in f["cases"]] for f in json.loads(Path(path).read_text())["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--split {path}: not a folds file written by 'ildseg split' ({type(e).__name__})") from None
    listed = [c for f in folds for c in f]
    repeated = sorted({c for c in listed if listed.count(c) > 1})
    if repeated:
        raise InputError(f"--split {path} lists case '{repeated[0]}' more than once")
    ids = {c.case_id for c in cases}
    if set(listed) != ids:
        odd = sorted(ids - set(listed)) or sorted(set(listed) - ids)
        raise InputError(f"--split {path} does not list exactly the manifest's cases (e.g. '{odd[0]}')")
    if len(folds) < 2:
        raise InputError(f"--split {path} has {len(folds)} fold; training needs 2 or more")
    fold_of = {c: k for k, f in enumerate(folds) for c in f}
    for scan in {c.scan_key for c in cases}:
        members = sorted(c.case_id for c in cases if c.scan_key == scan)
        if len({fold_of[m] for m in members}) > 1:
            raise InputError(f"--split {path} puts the cases of scan '{scan[1]}' ({', '.join(members)}) in "
                             "different folds: one patient would be trained and validated on")
    return folds


def _check_time_limit(value) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"--time-limit must be a finite number of seconds above 0, not {value}")


def _check_run_folder(out: Path) -> None:
    """The run folder can be made (or used) and written. The folder itself is made
    when training starts, so that an early error leaves none."""
    from ..imaging.atomicfile import check_writable
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot make the run folder {out}: {existing} is a file")
    check_writable(existing / ".ildseg-run-probe")


def cmd_train(args) -> int:
    from .dataset import class_pixel_counts, load_case_crops
    from .split import split_scans
    from .manifest import manifest_sha256, read_manifest
    from .trainer import TrainConfig, Trainer
    config = TrainConfig(preset=args.preset, epochs=args.epochs, patience=args.patience,
                         min_rel_improvement=args.min_rel_improvement, lr=args.lr,
                         unsupervised_weight=args.unsupervised_weight, entropy_scaling=args.entropy_scaling,
                         batch_size=args.batch_size, crops_per_epoch=args.crops_per_epoch,
                         augment=not args.no_augment, intensity=args.intensity,
                         intensity_augmentation=args.intensity_augmentation,
                         seed=args.seed, device=args.device, precision=args.precision)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a run folder, and {out} is a file")
    if not args.resume and (out / "checkpoint.safetensors").exists():
        # Starting afresh would replace another run's checkpoint and mix its outputs with ours.
        raise InputError(f"{out} holds the checkpoint of an earlier run: add --resume to continue it, "
                         "or choose a new --out folder")
    if args.split and (args.folds is not None or args.val_fraction is not None):
        raise InputError("--split gives the folds: leave out --folds and --val-fraction")
    _check_time_limit(args.time_limit)
    if args.folds is None:
        args.folds = 5
    if args.folds < 2:
        raise InputError(f"--folds must be 2 or more, not {args.folds}")
    _check_run_folder(out)
    cases = read_manifest(args.manifest)
    if args.val_fraction is not None:
        if not 0 < args.val_fraction < 1:
            raise InputError("--val-fraction must be between 0 and 1")
        # Folds of ~F each; never more folds than scans.
        n_scans = len({c.scan_key for c in cases})
        n_folds, fold = max(2, min(int(round(1 / args.val_fraction)), n_scans)), 0
    else:
        n_folds, fold = args.folds, args.fold
    if not args.split and not 0 <= fold < n_folds:
        raise InputError(f"--fold must be in 0..{n_folds - 1}")
    intensity = INTENSITY_PRESETS[config.intensity]
    if args.split:  # checked before the cases are read
        folds = _folds_from_file(args.split, cases)
        n_folds = len(folds)
        if not 0 <= fold < n_folds:
            raise InputError(f"--fold must be in 0..{n_folds - 1} for the {n_folds} folds of {args.split}")
    # Each case is read once: its crops also give the class counts that balance the folds.
    crops_by_case = {c.case_id: load_case_crops(c, intensity) for c in cases}
    if not args.split:
        try:
            folds = split_scans(cases, {k: class_pixel_counts(v) for k, v in crops_by_case.items()}, n_folds,
                                args.seed)
        except ValueError as e:
            raise InputError(str(e)) from None
    val_ids = {str(c) for c in folds[fold]}
    train = [crop for k, v in crops_by_case.items() if k not in val_ids for crop in v]
    val = [crop for k, v in crops_by_case.items() if k in val_ids for crop in v]
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    say(f"{len(cases) - len(val_ids)} training cases ({len(train)} lung crops), {len(val_ids)} validation cases "
        f"({len(val)} crops): {sorted(val_ids)}")
    provenance = {"trained_on": f"manifest {Path(args.manifest).name}", "manifest_sha256": manifest_sha256(args.manifest),
                  "command": "ildseg " + " ".join(args.argv),
                  "validation_cases": sorted(val_ids), "folds": n_folds, "fold": fold}
    if args.split:
        provenance["split_file"] = Path(args.split).name
    if args.val_fraction is not None:
        # --val-fraction F is carried out as fold 0 of round(1/F) folds; say what was asked.
        provenance["val_fraction"] = args.val_fraction
    from .allocator import keep_freed_memory
    keep_freed_memory()  # this command's own process: see allocator.py
    trainer = Trainer(config, train, val, Path(args.out), provenance=provenance, progress=say)
    if args.init:
        from ..engine.modelfile import load_model
        init = load_model(args.init)
        trainer.initialize_from(init)
        provenance["initialized_from"] = {"file": init.path.name, "sha256": init.sha256,
                                          "trained": init.info.trained}
        say(f"starting from the weights of {init.path.name}")
    if args.resume and trainer.resume():
        say(f"resumed from {trainer.checkpoint_path} at epoch {trainer.start_epoch + 1}")
    try:
        summary = trainer.fit(time_limit_s=args.time_limit)
    finally:
        if trainer.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    say(f"best validation BACC {summary['validation']['balanced_accuracy']:.4f} at epoch {summary['best_epoch']}; "
        f"model written to {trainer.model_path}")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import KEPT_START_MODEL_EXIT, FinetuneSettings, finetune
    from .manifest import manifest_sha256, read_manifest
    from ..engine.modelfile import load_model
    settings = FinetuneSettings(epochs=args.epochs, patience=args.patience, lr=args.lr, batch_size=args.batch_size,
                                crops_per_epoch=args.crops_per_epoch, val_fraction=args.val_fraction,
                                unsupervised_weight=args.unsupervised_weight,
                                intensity_augmentation=args.intensity_augmentation, seed=args.seed,
                                train_layers=args.train_layers, distill_weight=args.distill_weight,
                                l2sp_weight=args.l2sp_weight, min_gain=args.min_gain, slab_gap_mm=args.slab_gap)
    settings.check()
    _check_time_limit(args.time_limit)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a run folder, and {out} is a file")
    if (out / "checkpoint.safetensors").exists() or (out / "finetune.json").exists():
        raise InputError(f"{out} holds an earlier run: choose a new --out folder")
    _check_run_folder(out)
    cases = read_manifest(args.manifest)
    start = load_model(args.model)
    provenance = {"trained_on": f"manifest {Path(args.manifest).name}", "manifest_sha256": manifest_sha256(args.manifest),
                  "command": "ildseg " + " ".join(args.argv)}
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    # A run that does not finish (an error, Ctrl-C, SIGTERM from the Slicer panel's
    # Cancel or from Slicer quitting) leaves no run folder: a model.safetensors written
    # just before the end is not a finished run (its finetune.json is missing), and a
    # fine-tuning run cannot be resumed. What was there before the run stays.
    existed = out.exists()
    before = set(out.iterdir()) if existed else set()
    try:
        report = finetune(cases, start, out, settings, device=args.device, time_limit_s=args.time_limit,
                          provenance=provenance, progress=say)
    except BaseException:
        _remove_run_outputs(out, existed, before)
        raise
    # 4: finished, but the fine-tuned model is no better than the start model (keep that one).
    return KEPT_START_MODEL_EXIT if report["kept_start_model"] else 0


def _remove_run_outputs(out: Path, existed: bool, before) -> None:
    """Remove what an unfinished run wrote: the whole run folder when the run made it,
    else only the entries that were not there before."""
    import shutil
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in (set(out.iterdir()) if out.is_dir() else set()) - set(before):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_cases
    from .manifest import read_manifest
    from .plots import plot_confusion
    from ..imaging.atomicfile import atomic_path
    from ..engine.modelfile import load_model
    from ..imaging.atomicfile import check_writable
    if args.confusion and not args.confusion.lower().endswith(".png"):
        raise InputError(f"the confusion matrix is a PNG picture: name it .png, not {Path(args.confusion).name}")
    for output in (args.report, args.confusion):
        if output:  # before the work, not after it
            check_writable(output)
    cases = read_manifest(args.manifest)
    model = load_model(args.model)
    report = evaluate_cases(cases, model, args.device, progress=None if args.quiet else print,
                            pixel_spacing=args.pixel_spacing)
    if report["annotated_pixels"] == 0:
        raise InputError(f"no annotated voxel of {Path(args.manifest).name} lies inside a lung mask: "
                         "nothing to evaluate")
    if not args.quiet:
        print(f"balanced accuracy {report['balanced_accuracy']:.4f} over {report['annotated_pixels']} annotated pixels")
        for name, acc in report["per_class_accuracy"].items():
            dice = report["dice"][name]
            print(f"  {name:<22} accuracy {'-' if acc is None else f'{acc:.3f}':>6}  "
                  f"Dice {'-' if dice is None else f'{dice:.3f}':>6}")
    written = []
    try:
        if args.report:
            with atomic_path(args.report) as tmp:
                # allow_nan=False: a class absent from the annotations has no accuracy
                # (None, JSON null); NaN would make the file unreadable to strict parsers.
                Path(tmp).write_text(json.dumps(report, indent=2, allow_nan=False))
            written.append(Path(args.report))
        if args.confusion:
            plot_confusion(report, Path(args.confusion))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return 0


SIMULATED_FILES = ("ct.nrrd", "lung_mask.nrrd", "annotation.nrrd", "truth.nrrd")


def _followup_motion(args) -> Dict:
    """The follow-up's motion from the command line (defaults from simulation/config.py),
    checked; InputError in one line when out of range or given without --followup."""
    given = [f"--{name.replace('_', '-')}" for name in ("motion_degrees", "motion_shift", "inspiration", "slice_phase")
             if getattr(args, name, None) is not None]
    if not args.followup_kind:
        if given:
            raise InputError(f"{given[0]} describes the follow-up's motion: add --followup moved|progressed")
        return {}
    degrees = args.motion_degrees if args.motion_degrees is not None else list(DEFAULT_DEGREES)
    shift = args.motion_shift if args.motion_shift is not None else list(DEFAULT_SHIFT_MM)
    inspiration = DEFAULT_INSPIRATION if args.inspiration is None else args.inspiration
    phase = DEFAULT_SLICE_PHASE if args.slice_phase is None else args.slice_phase
    for option, values, limit, unit in (("--motion-degrees", degrees, MAX_DEGREES, "degrees"),
                                        ("--motion-shift", shift, MAX_SHIFT_MM, "mm")):
        bad = [v for v in values if not (math.isfinite(v) and abs(v) <= limit)]
        if bad:
            raise InputError(f"{option} {bad[0]:g} is out of range: each at most {limit:g} {unit} either way "
                             "(a repositioned patient)")
    lo, hi = INSPIRATION_RANGE
    if not (math.isfinite(inspiration) and lo <= inspiration <= hi):
        raise InputError(f"--inspiration must be a scale from {lo:g} to {hi:g}, not {inspiration:g}")
    if not (math.isfinite(phase) and 0 <= phase < 1):
        raise InputError(f"--slice-phase must be a fraction of a slice from 0 to below 1, not {phase:g} "
                         "(a larger move along the body axis is --motion-shift)")
    return {"degrees": [float(v) for v in degrees], "shift_mm": [float(v) for v in shift],
            "inspiration": float(inspiration), "slice_phase": float(phase)}


def _stage_followup(kind: str, ct_path: str, ct, mask, seed: int, folder: Path, motion: Dict, staged: List) -> str:
    """Make one ``kind`` baseline/follow-up pair of ``ct`` (read from ``ct_path``) and
    write its files under staging names in ``folder``, each added to ``staged`` as
    (staged, final) as soon as it is begun (the caller removes them on failure).
    Returns the ``ildseg compare`` command for the pair. InputError when the CT is a
    single slice or, for ``progressed``, no fibrosis fitted into its lung."""
    import shlex
    from ..imaging.images import image_like, write_image
    from ..simulation.followup import followup_pair, truth_record
    if np.ndim(ct.array) != 3 or np.shape(ct.array)[0] < 2:
        raise InputError(f"{Path(ct_path).name}: --followup needs a CT volume (several slices), not a single slice")
    image = image_like(np.asarray(ct.array), ct.image)  # HU (the DICOM rescale applied), the CT's grid
    pair = followup_pair(image, kind, mask, seed=seed, **motion)
    truth = truth_record(pair)
    if kind == "progressed" and truth["fibrotic_extent"]["change"] <= 0:
        raise InputError(f"no fibrosis could be added to the lung of {Path(ct_path).name} (seed {seed}): "
                         "too little lung? try another --seed")
    files = dict(zip(FOLLOWUP_FILES, (
        pair.baseline_ct, pair.followup_ct, image_like(pair.baseline_truth, pair.baseline_ct),
        image_like(pair.followup_truth, pair.followup_ct),
        image_like(pair.followup_truth_on_baseline, pair.baseline_ct),
        image_like(pair.baseline_lung, pair.baseline_ct), image_like(pair.followup_lung, pair.followup_ct))))
    for name, img in files.items():
        staged.append((folder / f".staged-{name}", folder / name))
        write_image(img, staged[-1][0])
    command = ["ildseg", "compare", str(folder / "baseline.nrrd"), str(folder / "followup.nrrd"),
               "--out", str(folder / "compare")]
    command_line = " ".join(shlex.quote(c) for c in command)
    record = {"kind": kind, "source_ct": str(ct_path), "seed": seed, **truth, "files": list(FOLLOWUP_FILES),
              "compare_command": command_line}
    staged.append((folder / ".staged-truth.json", folder / "truth.json"))  # removed on failure, written or not
    staged[-1][0].write_text(json.dumps(record, indent=2, allow_nan=False))
    return command_line


def cmd_simulate(args) -> int:
    from .manifest import write_manifest
    from ..imaging.atomicfile import check_writable
    from ..imaging.images import image_like, write_image
    from ..imaging.io import check_ct_plausible, read_ct, read_lung_mask
    from ..simulation.simulate import simulate_case
    if args.lung_mask and len(args.lung_mask) != len(args.ct):
        raise InputError("give one --lung-mask per --ct (or none)")
    if args.cases_per_ct < 1:
        raise InputError(f"--cases-per-ct must be at least 1, not {args.cases_per_ct}")
    motion = _followup_motion(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, and {out} is a file")
    several = len(args.ct) * args.cases_per_ct > 1
    stems = [re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", Path(str(p).rstrip("/")).name)
             for p in args.ct]
    # Cases simulated in one CT are one patient: they share a scan, so that a split never
    # puts them on both sides. CTs of the same file name get their position appended.
    scans = stems if len(set(stems)) == len(stems) else [f"{s}-{n + 1}" for n, s in enumerate(stems)]
    plan = []
    for n, stem in enumerate(stems):
        for r in range(args.cases_per_ct):
            seed = args.seed + 1000 * n + r
            case_id = f"{stem}-s{seed}" if several else stem
            plan.append((n, seed, case_id, out / case_id if several else out))
    # Nothing an input is read from may be written over (simulating into the CT's own
    # folder used to replace its ct.nrrd).
    inputs = {Path(p).resolve() for p in list(args.ct) + list(args.lung_mask or [])}
    names, index = (FOLLOWUP_FILES, None) if args.followup_kind else (SIMULATED_FILES, "manifest.csv")
    for target in [folder / name for *_, folder in plan for name in names] + ([out / index] if index else []):
        if target.resolve() in inputs:
            raise InputError(f"an output would overwrite the input {target}: choose another --out")
    created = [] if out.is_dir() else [out]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    check_writable(out / (index or names[0]))
    # Every file is first written under a staging name beside its place and renamed
    # only when all cases and the manifest are ready: a failure or Ctrl-C removes the
    # staged files, and the cases of an earlier run in the same folder stay as they were.
    staged: list = []
    commands: List[str] = []
    try:
        rows = []
        ct = mask = None
        ct_index = -1
        for n, seed, case_id, folder in plan:
            if ct_index != n:
                ct_index, ct = n, read_ct(args.ct[n])
                check_ct_plausible(ct, args.ct[n])  # patterns inserted into a label map would train nonsense
                mask = read_lung_mask(args.lung_mask[n], ct) if args.lung_mask else None
            if not folder.is_dir():
                folder.mkdir(parents=True)
                created.append(folder)
            if args.followup_kind:
                commands.append(_stage_followup(args.followup_kind, args.ct[n], ct, mask, seed, folder, motion, staged))
                if not args.quiet:
                    print(f"{case_id}: {args.followup_kind} follow-up -> {folder}")
                continue
            sim = simulate_case(np.asarray(ct.array), ct.geometry, lung_mask=mask, seed=seed)
            for name, arr in zip(SIMULATED_FILES, (sim.hu, sim.lung_mask, sim.annotation, sim.truth)):
                staged.append((write_image(image_like(arr.reshape(np.shape(ct.array)), ct.image),
                                           folder / f".staged-{name}"), folder / name))
            rel = folder.relative_to(out)
            rows.append([case_id, str(rel / "ct.nrrd"), str(rel / "lung_mask.nrrd"), str(rel / "annotation.nrrd"),
                         scans[n]])
            if not args.quiet:
                print(f"{case_id}: {len(sim.regions)} pattern regions -> {folder}")
        if not args.followup_kind:
            write_manifest(out / ".staged-manifest.csv", rows)
            staged.append((out / ".staged-manifest.csv", out / "manifest.csv"))
        for temporary, final in staged:
            os.replace(temporary, final)
    except BaseException:
        for temporary, _ in staged:
            Path(temporary).unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if not args.quiet:
        if args.followup_kind:
            print("compare the pair (the truth is in truth.json beside it):")
            print("\n".join(commands))
        else:
            print(f"manifest: {out / 'manifest.csv'}")
    return 0


COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "split": cmd_split, "simulate": cmd_simulate}
