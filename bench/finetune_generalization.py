"""Does fine-tuning help the next patient, and what does it forget? (issue 25)

Simulated cases (``ildseg simulate``) in two real CTs: A1 and A2 in CT A (one patient,
two seeds: other pattern regions, other healthy patches), B1 in CT B. From the bundled
model, ``ildseg finetune`` on A1 alone (one scan: the slab hold-out), once per
regularization choice; then ``ildseg evaluate`` scores the fine-tuned model, and the
bundled model, on A2 (same CT, another case: what a site wants) and on B1 (another
CT: what forgetting costs). Balanced accuracy over the annotated pixels of the scored
case.

To keep the CPU time to minutes, every annotation (A1's and the scored cases') is
thinned to every ``--every``-th annotated slice, as a radiologist paints a few slices
rather than all; the bench's fine-tuning runs at most ``--epochs`` epochs.

Caveat, said in the output: the bundled model was trained on simulated cases in all
six CC BY CTs of ``../shared/data`` (other seeds), so "A" and "B" are CTs it has seen,
not the unseen CTs of issue 25's goal; the team reruns this on CTs kept outside the
project (``--ct-a``/``--ct-b`` take any CT). RICORD (CC BY-NC) may stand in for an
unseen CT in an evaluation only (fine-tuning on it here is an evaluation use; nothing
from it is shipped).

    .venv/bin/python bench/finetune_generalization.py --work /tmp/ftgen --json ftgen.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ILDSegmentationLib.classes import CLASSES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

#: name -> extra ``ildseg finetune`` arguments. "distill" is the default of ``ildseg finetune``.
CHOICES = {
    "none": ["--distill-weight", "0", "--l2sp-weight", "0"],
    "distill": ["--distill-weight", "1", "--l2sp-weight", "0"],
    "l2sp": ["--distill-weight", "0", "--l2sp-weight", "0.01"],
    "distill+l2sp": ["--distill-weight", "1", "--l2sp-weight", "0.01"],
}


def ildseg(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def check(result: subprocess.CompletedProcess, ok=(0,)) -> subprocess.CompletedProcess:
    if result.returncode not in ok:
        sys.exit(f"{' '.join(result.args[3:])} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                 f"{result.stderr[-2000:]}")
    return result


def simulate(ct: Path, out: Path, cases: int, seed: int) -> list:
    """Cases simulated in one CT (one scan); returns their manifest rows."""
    if not (out / "manifest.csv").is_file():
        check(ildseg("simulate", "--ct", str(ct), "--out", str(out), "--cases-per-ct", str(cases),
                     "--seed", str(seed), "--quiet"))
    import csv
    with open(out / "manifest.csv", newline="") as f:
        return [row for row in csv.DictReader(f)]


def thinned_manifest(row: dict, folder: Path, every: int, offset: int, name: str, labels=None) -> Path:
    """A one-case manifest whose annotation keeps every ``every``-th annotated slice
    (axial, array axis 0) from ``offset`` on, and only the ``labels`` (1..6) given
    (None: all)."""
    import SimpleITK as sitk
    from ILDSegmentationLib.training.manifest import write_manifest
    source = folder / row["annotation"]
    image = sitk.ReadImage(str(source))
    ann = sitk.GetArrayFromImage(image)
    annotated = np.flatnonzero(ann.reshape(ann.shape[0], -1).any(axis=1))
    keep = annotated[offset::every]
    thin = np.zeros_like(ann)
    thin[keep] = ann[keep]
    tag = ""
    if labels:
        thin[~np.isin(thin, labels)] = 0
        tag = "-only" + "".join(map(str, sorted(labels)))
    out = source.with_name(f"annotation-every{every}-{offset}{tag}.nrrd")
    if not out.is_file():
        result = sitk.GetImageFromArray(thin)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(out), True)
    manifest = folder / f"{name}.csv"
    case_dir = Path(row["annotation"]).parent
    write_manifest(manifest, [[row["case_id"], row["ct"], row["lung_mask"], str(case_dir / out.name),
                               row.get("scan") or row["case_id"]]])
    return manifest


def score(model: str, manifest: Path, report: Path) -> float:
    if not report.is_file():
        args = ["evaluate", "--manifest", str(manifest), "--report", str(report), "--device", "cpu", "--quiet"]
        if model != "bundled":
            args += ["--model", model]
        check(ildseg(*args))
    return float(json.loads(report.read_text())["balanced_accuracy"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct-a", default=str(DATA / "tcga-luad-tcga-17-z015" / "tcga-luad-tcga-17-z015.nrrd"),
                   help="the CT fine-tuned on (A1) and scored on another case (A2)")
    p.add_argument("--ct-b", default=str(DATA / "tcga-luad-tcga-17-z013" / "tcga-luad-tcga-17-z013.nrrd"),
                   help="another CT (B1): what forgetting costs")
    p.add_argument("--work", required=True, help="folder for the cases and runs (reused when rerun)")
    p.add_argument("--seed", type=int, default=11, help="simulation seed of A1 (A2: +1; B1: this + 100)")
    p.add_argument("--every", type=int, default=2, help="keep every N-th annotated slice (default 2)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    p.add_argument("--paint", nargs="+", choices=[c.name for c in CLASSES], metavar="CLASS",
                   help="keep only these classes of A1's annotation (what a site paints: e.g. Healthy "
                        "'Ground glass opacity' Consolidation), to see what the others lose; default all")
    p.add_argument("--json", help="write the figures here")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    work = Path(args.work)
    started = time.perf_counter()
    rows_a = simulate(Path(args.ct_a), work / "a", 2, args.seed)
    rows_b = simulate(Path(args.ct_b), work / "b", 1, args.seed + 100)
    labels = sorted(c.label for c in CLASSES if c.name in args.paint) if args.paint else None
    tag = "" if labels is None else "-only" + "".join(map(str, labels))
    train = thinned_manifest(rows_a[0], work / "a", args.every, 0, f"train-a1{tag}", labels)
    same = thinned_manifest(rows_a[1], work / "a", args.every, 1, "score-a2")
    other = thinned_manifest(rows_b[0], work / "b", args.every, 1, "score-b1")
    results = {"bundled": {"same_ct": score("bundled", same, work / "bundled-a2.json"),
                           "other_ct": score("bundled", other, work / "bundled-b1.json")}}
    print(f"bundled model: A2 (same CT) {results['bundled']['same_ct']:.4f}, "
          f"B1 (other CT) {results['bundled']['other_ct']:.4f}", flush=True)
    for name in args.choices:
        run = work / f"runs{tag}" / name
        t0 = time.perf_counter()
        if not (run / "finetune.json").is_file():
            check(ildseg("finetune", "--manifest", str(train), "--out", str(run), "--device", "cpu",
                         "--epochs", str(args.epochs), "--patience", str(args.patience), "--quiet",
                         *CHOICES[name], *extra), ok=(0, 4))
        report = json.loads((run / "finetune.json").read_text())
        tuned = report["model"] or report["rejected_model"]
        same_score, other_score = score(tuned, same, run / "score-a2.json"), score(tuned, other, run / "score-b1.json")
        entry = {"kept_start_model": report["kept_start_model"],
                 "per_class": {k: {"bundled": json.loads((work / f"bundled-{c}.json").read_text())
                                   ["per_class_accuracy"],
                                   "fine-tuned": json.loads((run / f"score-{c}.json").read_text())
                                   ["per_class_accuracy"]} for k, c in (("same_ct", "a2"), ("other_ct", "b1"))},
                 "held_out_before": report["before"]["balanced_accuracy"],
                 "held_out_after": report["after"]["balanced_accuracy"],
                 "best_epoch": report["best_epoch"], "epochs_run": report["epochs_run"],
                 "finetune_seconds": report["seconds"],
                 "same_ct": same_score, "other_ct": other_score}
        # What the user ends up with: the start model when the run kept it.
        base = results["bundled"]
        entry["offered_same_ct"] = base["same_ct"] if entry["kept_start_model"] else entry["same_ct"]
        entry["offered_other_ct"] = base["other_ct"] if entry["kept_start_model"] else entry["other_ct"]
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = entry
        print(f"{name}: held-out (slab of A1) {entry['held_out_before']:.4f} -> {entry['held_out_after']:.4f}"
              f"{' (kept the start model)' if entry['kept_start_model'] else ''}; fine-tuned model: A2 "
              f"{entry['same_ct']:.4f} ({entry['same_ct'] - base['same_ct']:+.4f}), B1 {entry['other_ct']:.4f} "
              f"({entry['other_ct'] - base['other_ct']:+.4f}); {entry['seconds']:.0f} s", flush=True)
    caveat = ("the bundled model was trained on simulated cases (other seeds) in all six CC BY CTs, these two "
              "included: A and B are not CTs it never saw")
    print(f"caveat: {caveat}")
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = f"{cpu}, {os.cpu_count()} cores (shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(f"machine: {machine}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ct_a": args.ct_a, "ct_b": args.ct_b, "paint": args.paint, "seed": args.seed, "every": args.every, "epochs": args.epochs,
            "patience": args.patience, "extra": extra, "choices": {k: CHOICES[k] for k in args.choices},
            "results": results, "caveat": caveat, "machine": machine}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
