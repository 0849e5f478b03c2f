"""Reproduce the bundled model: simulate ILD patterns in the six CC BY chest CTs of
``../shared/data``, train with the paper's protocol and the scanner augmentation,
evaluate leave-one-CT-out, install the model file and its card's held-out section.

    # everything, on one machine (a GPU when there is one; on a CPU give a shorter --time-limit)
    python scripts/train_bundled_model.py all --data ../shared/data --work /tmp/ildtrain [--time-limit 480]

    # or step by step (what `all` runs), e.g. simulate here and train on a rented GPU:
    python scripts/train_bundled_model.py prepare --data ../shared/data --work W   # simulate, write crop banks (CPU)
    python scripts/train_bundled_model.py train --bank W/bank --out W/runs/all --time-limit 480
    python scripts/train_bundled_model.py train --bank W/bank --out W/runs/no-cptac --exclude cptac-lscc-c3n-00247
    python scripts/train_bundled_model.py evaluate --work W --model W/runs/no-cptac/model.safetensors --heldout cptac-lscc-c3n-00247
    python scripts/train_bundled_model.py install --work W --final W/runs/all --loco W/runs/no-cptac:cptac-lscc-c3n-00247 ...

Data (``BACKGROUNDS``): each CT in two variants, resampled in-plane to 0.75 mm (its
own lung) and to 1.0 mm with its lung tissue fraction scaled (deeper or shallower
inspiration), two simulated cases per variant. One case of each CT's 1.0 mm variant
is its validation case: the best epoch is chosen on validation cases of the training
CTs only. ``train`` needs no CT files: ``prepare`` saves the crops as crop banks
(``training/cropbank.py``), one per background CT, so a machine with torch alone
(no SimpleITK) can train. Leave-one-CT-out: ``--exclude CT`` trains without that CT's
crops, training and validation alike; ``evaluate`` then scores the model on cases
simulated in that CT at its own pixels (other seeds), which no step of that run saw.
The shipped model is trained on all six; its held-out figures are the leave-one-CT-out
models' (the only honest ones for CTs it was trained on) and RICORD's (never trained on:
its licence is non-commercial, so it is used to evaluate only).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The CC BY chest CTs of ../shared/data (its README): name -> path inside it.
BACKGROUNDS: Dict[str, str] = {
    "lung-pet-ct-dx-A0002": "lung-pet-ct-dx-A0002",
    "lidc-idri-0001": "lidc-idri-0001/lidc-idri-0001.nrrd",
    "lidc-idri-0002": "lidc-idri-0002/lidc-idri-0002.nrrd",
    "cptac-lscc-c3n-00247": "cptac-lscc-c3n-00247/cptac-lscc-c3n-00247.nrrd",
    "tcga-luad-tcga-17-z013": "tcga-luad-tcga-17-z013/tcga-luad-tcga-17-z013.nrrd",
    "tcga-luad-tcga-17-z015": "tcga-luad-tcga-17-z015/tcga-luad-tcga-17-z015.nrrd",
}
#: Left out, one at a time, for the leave-one-CT-out figures: the sharp-kernel Siemens
#: CT with emphysema and contrast (the most unlike the rest) and a GE CT.
HELDOUT = ("cptac-lscc-c3n-00247", "lidc-idri-0001")
RICORD = "ricord-000082/ricord-000082-5mm.nii.gz"
#: Variants of each CT: (in-plane mm, lung tissue-fraction factor); the second variant's
#: factor alternates between CTs (deeper / shallower inspiration).
VARIANTS = ((0.75, 1.0), (1.0, None))
INSPIRATION = (0.85, 1.15)
#: Annotated slices kept per case in the crop banks (thin-slice CTs are annotated on
#: hundreds of slices; evenly spread slices keep each CT's weight alike).
MAX_SLICES = {"train": 20, "val": 10}
SEED = 100
HELDOUT_SEED = 900
INTENSITY = "hu1000"


def ildseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "ILDSegmentationLib", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def read_background(data: Path, name: str):
    import SimpleITK as sitk
    p = data / BACKGROUNDS[name]
    if p.is_dir():
        return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p)))
    return sitk.ReadImage(str(p))


#: Thin-slice CTs are simulated on every other slice (the cost of simulating grows with
#: the slices; 2.5 mm apart is still thin, and in-plane texture is what the network sees).
MAX_SLICES_PER_CT = 140


def variant(src, spacing_xy: float, factor: float):
    """The CT resampled in-plane to ``spacing_xy`` mm (linear), with its lung's tissue
    fraction (HU + 1000) scaled by ``factor`` below -300 HU (fading out towards 0 HU, so
    vessels, walls and the chest wall keep their values); out-of-field padding
    (-3024, -2048) becomes -1024 first, so that interpolation does not smear it."""
    import numpy as np
    import SimpleITK as sitk
    if src.GetSize()[2] > MAX_SLICES_PER_CT:
        src = src[:, :, ::2]
    sp = src.GetSpacing()
    arr = np.maximum(sitk.GetArrayFromImage(src).astype(np.float32), -1024.0)
    clean = sitk.GetImageFromArray(arr)
    clean.CopyInformation(src)
    new_sp = (spacing_xy, spacing_xy, sp[2])
    size = [int(round(src.GetSize()[i] * sp[i] / new_sp[i])) for i in range(2)] + [src.GetSize()[2]]
    out = sitk.Resample(clean, size, sitk.Transform(), sitk.sitkLinear, src.GetOrigin(), new_sp,
                        src.GetDirection(), -1024.0, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(out)
    if factor != 1.0:
        w = np.clip(-hu / 300.0, 0.0, 1.0)
        hu = hu + w * (factor - 1.0) * (hu + 1000.0)
    img = sitk.GetImageFromArray(np.clip(np.round(hu), -1024, 3071).astype(np.int16))
    img.CopyInformation(out)
    return img


def _simulate(cts: Sequence[Path], out: Path, cases: int, seed: int) -> None:
    if not (out / "manifest.csv").exists():
        ildseg("simulate", "--ct", *map(str, cts), "--out", str(out), "--cases-per-ct", str(cases), "--seed", str(seed))


def prepare(data: Path, work: Path, jobs: int) -> None:
    """Variants, simulated cases (training and held-out) and one crop bank per CT."""
    import SimpleITK as sitk
    cts = work / "cts"
    cts.mkdir(parents=True, exist_ok=True)
    tasks: List[Tuple[List[Path], Path, int, int]] = []
    for n, name in enumerate(BACKGROUNDS):
        src = read_background(data, name)
        paths = []
        for mm, factor in VARIANTS:
            factor = INSPIRATION[n % 2] if factor is None else factor
            p = cts / f"{name}-{mm:g}mm-x{factor:g}.nrrd"
            if not p.exists():
                sitk.WriteImage(variant(src, mm, factor), str(p), True)
            paths.append(p)
        tasks.append((paths, work / "sim" / name, 2, SEED + 10_000 * n))
        if name in HELDOUT:  # at its own pixels, as a user would give it; other seeds
            native = cts / f"{name}-native.nrrd"
            if not native.exists():
                sitk.WriteImage(src, str(native), True)
            tasks.append(([native], work / "heldout" / name, 2, HELDOUT_SEED))
    tasks.append(([data / RICORD], work / "heldout" / "ricord-000082", 3, HELDOUT_SEED))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(_simulate, *t) for t in tasks]:
            f.result()
    write_banks(work)


def write_banks(work: Path) -> None:
    from ILDSegmentationLib.training.cropbank import hu_crops, save_crop_bank
    from ILDSegmentationLib.training.manifest import read_manifest
    bank = work / "bank"
    bank.mkdir(exist_ok=True)
    for name in BACKGROUNDS:
        target = bank / f"{name}.npz"
        if target.exists():
            continue
        cases = read_manifest(work / "sim" / name / "manifest.csv")
        crops, groups = [], []
        for i, case in enumerate(cases):
            # The last case (of the 1.0 mm variant) validates; the rest train.
            group = "val" if i == len(cases) - 1 else "train"
            got = hu_crops(case, MAX_SLICES[group])
            crops += got
            groups += [group] * len(got)
        save_crop_bank(target, crops, groups)
        print(f"{target}: {groups.count('train')} training and {groups.count('val')} validation crops, "
              f"{target.stat().st_size / 1e6:.1f} MB", flush=True)


def train(bank: Path, out: Path, exclude: Sequence[str], time_limit: float, device: str, batch_size: int,
          lr: float, crops_per_epoch: int, seed: int, init: Path = None, precision: str = "auto",
          patience: int = 50) -> Dict:
    """One run from the crop banks (no CT files needed); resumes when ``out`` holds a
    checkpoint of the same run."""
    from ILDSegmentationLib.engine.modelfile import load_model
    from ILDSegmentationLib.engine.preprocessing import INTENSITY_PRESETS
    from ILDSegmentationLib.training.cropbank import load_crop_bank
    from ILDSegmentationLib.training.trainer import TrainConfig, Trainer
    unknown = set(exclude) - {f.stem for f in Path(bank).glob("*.npz")}
    if unknown:  # before any bank is read
        raise SystemExit(f"no crop bank for the background(s) to exclude: {sorted(unknown)}")
    intensity = INTENSITY_PRESETS[INTENSITY]
    train_crops, val_crops, used = [], [], []
    for f in sorted(Path(bank).glob("*.npz")):
        if f.stem in exclude:
            continue
        used.append(f.stem)
        crops, groups = load_crop_bank(f, intensity)
        for c, g in zip(crops, groups):
            (val_crops if g == "val" else train_crops).append(c)
    config = TrainConfig(preset="proposed", epochs=100_000, patience=patience, lr=lr, batch_size=batch_size,
                         crops_per_epoch=crops_per_epoch, intensity=INTENSITY, intensity_augmentation="scanner",
                         seed=seed, device=device, precision=precision)
    provenance = {"trained_on": "simulated ILD patterns in " + ", ".join(used) + " (CC BY, ../shared/data)",
                  "command": " ".join(["scripts/train_bundled_model.py", *sys.argv[1:]]),
                  "backgrounds": used, "excluded_backgrounds": sorted(exclude),
                  "validation_cases": sorted({c.case_id for c in val_crops})}
    print(f"{out.name}: {len(train_crops)} training crops, {len(val_crops)} validation crops from {', '.join(used)}",
          flush=True)
    trainer = Trainer(config, train_crops, val_crops, out, provenance=provenance,
                      progress=lambda m: print(f"[{out.name}] {m}", flush=True))
    if init:
        trainer.initialize_from(load_model(init))
        provenance["initialized_from"] = {"file": Path(init).name, "sha256": trainer.config.init_sha256}
    if trainer.resume():
        print(f"[{out.name}] resumed at epoch {trainer.start_epoch + 1}", flush=True)
    print(f"[{out.name}] {trainer.device}, {trainer.precision}, {torch_threads()} thread(s)", flush=True)
    return trainer.fit(time_limit_s=time_limit)


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


#: The bundled runs: run folder name -> the CT it leaves out (None: the shipped model).
RUNS = {"all": None, "no-cptac": "cptac-lscc-c3n-00247", "no-lidc1": "lidc-idri-0001"}
#: Where their compact state (checkpoint: weights, best weights, optimizer, history;
#: log.csv) is committed, so that training accumulates across machines and sessions.
STATE = REPO / "training_runs"
#: The shipped run went on from the bundled model of 2026-12-04 (its GPU run's own
#: checkpoint was lost with that machine); the leave-one-CT-out runs could not (that
#: model saw their held-out CTs), so they start from the paper's initialization.
INIT = {"all": REPO / "ILDSegmentationLib" / "models" / "default.safetensors"}


def keep_training(bank: Path, runs: Sequence[str], slice_s: float, opts: Dict, state: Path = STATE) -> None:
    """Train the bundled runs in turn, ``slice_s`` seconds each (to the end of the epoch
    running then), round and round until every run has ended by early stopping, or
    until stopped (SIGTERM, Ctrl-C): what is lost then is the epoch in progress, every
    finished epoch is in its run's checkpoint, ready to commit and resume."""
    pending = list(runs)
    while pending:
        for name in list(pending):
            # --init is part of a run's settings: named again on every resume.
            train(bank, state / name, [RUNS[name]] if RUNS[name] else [], time_limit=slice_s,
                  init=INIT.get(name), **opts)
            if _early_stopped(state / name):
                pending.remove(name)
                print(f"[{name}] ended by early stopping", flush=True)


def _early_stopped(out: Path) -> bool:
    """Whether the run in ``out`` ended by the paper's early stopping (not by time)."""
    from safetensors import safe_open
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["ildseg_checkpoint"])
    history = meta["history"]
    best = max((i for i, r in enumerate(history) if r["best"]), default=-1)
    return len(history) - 1 - best >= meta["config"]["patience"]


def evaluate(work: Path, model: Path, heldout: str) -> Path:
    """``ildseg evaluate`` on the held-out cases of one CT; a report already made for
    this very model file (same sha256) is kept."""
    from ILDSegmentationLib.engine.modelfile import load_model
    report = Path(model).parent / f"heldout-{heldout}.json"
    if report.exists() and json.loads(report.read_text())["model"]["sha256"] == load_model(model).sha256:
        return report
    ildseg("evaluate", "--manifest", str(work / "heldout" / heldout / "manifest.csv"), "--model", str(model),
           "--report", str(report), "--confusion", str(report.with_suffix(".png")))
    return report


CARD = REPO / "ILDSegmentationLib" / "models" / "README.md"
HELDOUT_BEGIN = "<!-- held-out result: written by scripts/train_bundled_model.py install -->"
HELDOUT_END = "<!-- end of held-out result -->"


def _result_table(title: str, result: Dict) -> List[str]:
    from ILDSegmentationLib.classes import CLASSES
    from ILDSegmentationLib.training.metrics import summarize
    cm = result["confusion_matrix"]
    dice = summarize(cm)["dice"]
    lines = [f"### {title}: balanced accuracy **{result['balanced_accuracy']:.3f}**", "",
             "| class | accuracy | Dice |", "| --- | --- | --- |"]
    for c in CLASSES:
        acc, d = result["per_class_accuracy"][c.name], dice[c.name]
        lines.append(f"| {c.name} | {'-' if acc is None else f'{acc:.3f}'} | {'-' if d is None else f'{d:.3f}'} |")
    abbr = [c.abbreviation for c in CLASSES]
    lines += ["", f"Confusion matrix (annotated pixels; rows: truth, columns: prediction; {', '.join(abbr)}):", "",
              "| truth \\ predicted | " + " | ".join(abbr) + " |", "| --- " * (len(CLASSES) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(str(v) for v in row) + " |" for a, row in zip(abbr, cm)]
    return lines + [""]


def heldout_section(provenance: Dict) -> str:
    """The model card's held-out section, from the bundled model's provenance, so the
    card states exactly what the file carries."""
    held = provenance["heldout_evaluation"]
    lines = [HELDOUT_BEGIN, "## Held-out results (simulated patterns)", "",
             "Leave-one-CT-out: a model trained like the shipped one but without that CT (neither its training "
             "nor its validation cases), scored on two cases simulated in it at its own pixel size with other "
             "seeds. The shipped model itself saw every CC BY CT.", ""]
    for ct, r in sorted(held["leave_one_ct_out"].items()):
        lines += _result_table(f"{ct} (model without it)", r)
    lines += _result_table("RICORD 000082 (the shipped model; never trained on)", held["ricord"])
    return "\n".join(lines + [HELDOUT_END])


def write_card_section(provenance: Dict) -> None:
    """Replace the held-out section of the model card (between its markers)."""
    card = CARD.read_text()
    begin, end = card.index(HELDOUT_BEGIN), card.index(HELDOUT_END) + len(HELDOUT_END)
    CARD.write_text(card[:begin] + heldout_section(provenance) + card[end:])


def install(work: Path, final: Path, loco: Sequence[Tuple[Path, str]]) -> Path:
    """The final run's weights as the bundled model, with the leave-one-CT-out and
    RICORD results in its provenance and its card's held-out section."""
    from ILDSegmentationLib.engine.modelfile import default_model_path, load_model, read_info, save_model
    results = {}
    for run, ct in loco:
        r = json.loads(evaluate(work, Path(run) / "model.safetensors", ct).read_text())
        results[ct] = {k: r[k] for k in ("balanced_accuracy", "per_class_accuracy", "confusion_matrix")}
        loco = load_model(Path(run) / "model.safetensors")
        results[ct]["model"] = {"run": Path(run).name, "sha256": loco.sha256,
                                "excluded_backgrounds": loco.info.provenance.get("excluded_backgrounds", []),
                                "best_epoch": loco.info.provenance.get("best_epoch"),
                                "validation_balanced_accuracy": loco.info.provenance.get("validation_balanced_accuracy")}
        results[ct]["annotated_pixels"] = int(sum(map(sum, r["confusion_matrix"])))
    ricord = json.loads(evaluate(work, Path(final) / "model.safetensors", "ricord-000082").read_text())
    model = load_model(Path(final) / "model.safetensors")
    info = model.info
    worst = min(v["balanced_accuracy"] for v in results.values())
    info.name = "ILD dilated FCN (proposed), trained on simulated patterns"
    info.provenance = {
        **info.provenance,
        "trained_on": "simulated ILD patterns in six CC BY chest CTs (" + ", ".join(BACKGROUNDS) + "); "
                      "see ILDSegmentationLib/models/README.md",
        "heldout_evaluation": {
            "leave_one_ct_out": results,
            "ricord": {k: ricord[k] for k in ("balanced_accuracy", "per_class_accuracy", "confusion_matrix",
                                              "per_case_balanced_accuracy")},
            "trained_model_sha256": model.sha256},
        "metrics": f"leave-one-CT-out balanced accuracy {worst:.3f} (worst held-out CT) on simulated patterns",
        "warning": "Trained on SIMULATED patterns only (no real ILD annotations exist to share); "
                   f"held-out balanced accuracy {worst:.2f} on simulated cases. For demonstration and research, "
                   "not for clinical use.",
    }
    path = save_model(default_model_path(), model.network, info)
    write_card_section(read_info(path).provenance)
    shutil.copy(Path(final) / "learning_curves.png", REPO / "docs" / "img" / "default-model-learning-curves.png")
    print("installed as", path, "- its model card's held-out section is rewritten", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--time-limit", type=float, default=480.0, help="seconds of training per run (default 480)")
    common.add_argument("--device", default="auto")
    common.add_argument("--batch-size", type=int, default=4)
    common.add_argument("--lr", type=float, default=3e-4)
    common.add_argument("--crops-per-epoch", type=int, default=400)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    common.add_argument("--patience", type=int, default=50, help="early stopping patience in epochs (paper: 50)")
    common.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's choice; 1 leaves the other cores free)")
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=2)
    t = sub.add_parser("train", parents=[common])
    t.add_argument("--bank", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--exclude", nargs="*", default=[])
    t.add_argument("--init", type=Path)
    e = sub.add_parser("evaluate")
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--heldout", required=True)
    i = sub.add_parser("install")
    i.add_argument("--work", type=Path, required=True)
    i.add_argument("--final", type=Path, required=True)
    i.add_argument("--loco", nargs="+", required=True, help="RUN:CT pairs")
    k = sub.add_parser("continue", parents=[common],
                       help="train the bundled runs in turn (their state in training_runs/) until early stopping")
    k.add_argument("--bank", type=Path, required=True)
    k.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    k.add_argument("--slice", type=float, default=900.0, help="seconds per run before the next one's turn")
    k.add_argument("--state", type=Path, default=STATE)
    a = sub.add_parser("all", parents=[common])
    a.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--jobs", type=int, default=2)
    a.add_argument("--install", action="store_true")
    args = ap.parse_args()
    if getattr(args, "threads", 0):
        import torch
        torch.set_num_threads(args.threads)
    if args.step in ("train", "continue", "all"):
        from ILDSegmentationLib.training.allocator import keep_freed_memory
        keep_freed_memory()  # this process trains: see allocator.py
    opts = lambda: dict(time_limit=args.time_limit, device=args.device, batch_size=args.batch_size,  # noqa: E731
                        lr=args.lr, crops_per_epoch=args.crops_per_epoch, seed=args.seed, precision=args.precision,
                        patience=args.patience)
    if args.step == "prepare":
        prepare(args.data, args.work, args.jobs)
    elif args.step == "train":
        train(args.bank, args.out, args.exclude, init=args.init, **opts())
    elif args.step == "continue":
        keep_training(args.bank, args.runs, args.slice,
                      {k: v for k, v in opts().items() if k != "time_limit"}, args.state)
    elif args.step == "evaluate":
        print(json.loads(evaluate(args.work, args.model, args.heldout).read_text())["balanced_accuracy"])
    elif args.step == "install":
        install(args.work, args.final, [tuple(x.split(":", 1)) for x in args.loco])
    else:
        prepare(args.data, args.work, args.jobs)
        runs = args.work / "runs"
        train(args.work / "bank", runs / "all", [], **opts())
        for ct in HELDOUT:
            train(args.work / "bank", runs / f"no-{ct}", [ct], **opts())
        for ct in HELDOUT:
            evaluate(args.work, runs / f"no-{ct}" / "model.safetensors", ct)
        if args.install:
            install(args.work, runs / "all", [(runs / f"no-{ct}", ct) for ct in HELDOUT])


if __name__ == "__main__":
    from ILDSegmentationLib.commands.cli import set_process_defaults
    set_process_defaults()  # as `ildseg` does, before torch is imported
    main()
