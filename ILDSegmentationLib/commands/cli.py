"""``ildseg``: the command line, a thin shell over the library.

Errors the user can fix print one line (``ildseg: error: ...``) and exit with 2;
a batch of ``ildseg segment`` in which some cases failed exits with 3 (batch.py);
``ildseg finetune`` whose model did not beat the start model exits with 4 (training/finetune.py);
``--debug`` shows the traceback. Ctrl-C or SIGTERM leaves no output file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional

from .. import __version__
from ..errors import ILDSegError
from .progress import ProgressBar

log = logging.getLogger("ILDSegmentationLib")

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # Imported here, inside main()'s handlers: torch takes a second or two to import,
    # and a Ctrl-C meanwhile must give one line, not a traceback.
    from ..engine.device import DEVICE_CHOICES
    from ..engine.resolution import PIXEL_SPACING_CHOICES
    p.add_argument("--model", metavar="FILE", help="model file (.safetensors); default: the bundled model")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto = CUDA, then Apple MPS, then CPU (default: auto)")
    p.add_argument("--max-memory", type=float, default=1024, metavar="MB",
                   help="activation memory one batch of lung crops may use (default: 1024)")
    p.add_argument("--pixel-spacing", default="model", choices=PIXEL_SPACING_CHOICES,
                   help="model = run the network at a pixel size within the range the model was trained at, "
                        "resampling CTs outside it in-plane (labels come back on the CT's grid); "
                        "native = at the CT's own pixel size, as in the paper (default: model)")
    p.add_argument("--decision", default="auto", choices=("auto", "paper", "prior"),
                   help="how class probabilities become labels: paper = their argmax, as in the paper (its class "
                        "weights make all six classes equally likely, so vessels in a normal lung become "
                        "micronodules); prior = the model file's logit adjustment for whole lungs (its training "
                        "class weights, tau chosen on validation data); auto = the rule the model file recommends "
                        "(default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ildseg", description="Interstitial lung disease pattern segmentation in chest CT "
        "(dilated FCN of Anthimopoulos et al. 2018). Not for clinical use.")
    parser.add_argument("--version", action="version", version=f"ildseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    seg = sub.add_parser("segment", help="segment a chest CT into the six tissue classes")
    seg.add_argument("ct", nargs="*", metavar="CT_PATH",
                     help="CT in HU: .nrrd, .nii(.gz), .mha, or a DICOM series folder; several CTs or a folder of "
                          "series (with --out-dir) make a batch")
    seg.add_argument("-o", "--output", metavar="OUT",
                     help="label map: .nrrd, .nii.gz, .mha, .seg.nrrd (Slicer segmentation with names, colors, "
                          "terminology) or .dcm (DICOM Segmentation; the CT must be DICOM); in a batch, the file "
                          "name in each case folder (default: labels.seg.nrrd)")
    seg.add_argument("--lung-mask", metavar="PATH|auto",
                     help="lung mask label map (any non-zero voxel is lung); 'auto' or absent computes one")
    seg.add_argument("--probabilities", metavar="OUT.nrrd", help="also write per-class probabilities (6-component image)")
    seg.add_argument("--report", metavar="report.json", help="write volumes, model, device and timings as JSON")
    seg.add_argument("--overlay", metavar="overlay.png", help="write a PNG montage of axial slices with the classes")
    seg.add_argument("--table", metavar="regions.csv",
                     help="write the volume (mL) and percent of each class per region as CSV: whole lung, each lung, "
                          "upper/middle/lower zone of each lung, subpleural band and core")
    seg.add_argument("--visual-report", metavar="report.png|.pdf",
                     help="write a one-page visual report: axial overlay, coronal view with the zones, patterns per "
                          "zone, distribution and input checks (needs matplotlib)")
    seg.add_argument("--subpleural-band", type=float, default=None, metavar="MM",
                     help="width of the subpleural band, in mm from the costal pleura in the axial plane "
                          "(default: 10)")
    seg.add_argument("--dicom-seg", metavar="OUT.dcm",
                     help="also write a DICOM Segmentation over the CT's DICOM series (needs highdicom: "
                          "pip install 'ildsegmentation[dicom]')")
    seg.add_argument("--out-dir", metavar="DIR",
                     help="batch: one folder per case under DIR (labels, report.json and the other outputs, named "
                          "by -o, --report, --overlay, --dicom-seg, --probabilities), and DIR/summary.csv; cases "
                          "already complete are skipped. Exit code 3 when some cases failed")
    seg.add_argument("--manifest", metavar="cases.csv",
                     help="batch: CSV with columns ct and optionally case_id and lung_mask (paths relative to it)")
    seg.add_argument("--overwrite", action="store_true", help="batch: redo cases whose outputs are already complete")
    seg.add_argument("--crop-box", default="mask", choices=("mask", "aerated"),
                     help="where each lung's crop is cut: mask = the mask's box + 32 px, as in the paper; aerated = "
                          "the box of the aerated lung the mask outlines, found in the CT, so a mask border drawn a "
                          "few pixels wider or narrower (another mask tool) does not change the labels (default: mask)")
    seg.add_argument("--progress-lines", action="store_true",
                     help="print progress as lines 'ildseg-progress FRACTION MESSAGE' on stdout instead of a bar "
                          "(for a program that runs ildseg, such as the Slicer module)")
    from . import distributed
    distributed.add_engine_arguments(seg)
    _add_run_options(seg)
    _add_common(seg)

    from .compare import add_parser as add_compare_parser
    add_compare_parser(sub, _add_run_options, _add_common)
    from . import shards
    merge = sub.add_parser("merge-summaries", help="merge the summaries of a batch's shards (ildseg segment --shard "
                           "I/N) into one summary.csv, refusing missing, incomplete or overlapping shards")
    shards.add_arguments(merge)
    _add_common(merge)

    demo = sub.add_parser("demo", help="run the whole path on a built-in synthetic chest CT (no input needed)")
    demo.add_argument("--out", default="ildseg-demo", metavar="DIR", help="output folder (default: ./ildseg-demo)")
    _add_run_options(demo)
    _add_common(demo)

    from ..training.commands import add_parsers as add_training_parsers
    add_training_parsers(sub, _add_common)

    from . import bench
    bench_parser = sub.add_parser("bench", help="measure speed and memory on this machine against a naive baseline "
                                  "(prints a table; --json writes every figure)")
    bench.add_arguments(bench_parser)
    _add_common(bench_parser)

    arch = sub.add_parser("architecture", help="print the network's layers, parameter count and receptive field")
    arch.add_argument("--preset", default="proposed", help="a Table II configuration (see --list)")
    arch.add_argument("--list", action="store_true", help="list the presets with the paper's numbers")
    arch.add_argument("--json", action="store_true", help="print JSON")
    _add_common(arch)
    return parser


def _print_summary(summary: dict, quiet: bool) -> None:
    from ..analysis.regions import format_regions
    from ..analysis.report import format_table
    if quiet:
        return
    print(format_table(summary))
    regions = format_regions(summary)
    if regions:
        print(regions)
    if summary.get("decision_rule"):
        print(f"decision rule: {summary['decision_rule']['description']}")
    print(f"device: {summary['device']}   time: {summary['timings_s']['total']:.1f} s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in summary['timings_s'].items() if k != 'total')})")


def _say_resampled(summary: dict, quiet: bool) -> None:
    sp = summary.get("pixel_spacing_mm") or {}
    if sp.get("resampled") and not quiet:
        ct, net = sp["ct"], sp["network"]
        print(f"the CT's {ct[0]:.2f} x {ct[1]:.2f} mm pixels were resampled to {net[0]:.2f} x {net[1]:.2f} mm, "
              f"within the model's training range, and the labels brought back to the CT's grid "
              f"(--pixel-spacing native turns this off)", file=sys.stderr)


def _say_input_checks(summary: dict, quiet: bool) -> None:
    """A prone scan said so, on stderr beside the other notes about the input (the
    input checks' warnings were logged by the pipeline as they were found)."""
    if quiet:
        return
    for c in summary.get("input_checks", []):
        if c["check"] == "patient_position" and c["status"] == "ok" and "prone" in c["detail"]:
            print(f"input check: patient position: {c['detail']}", file=sys.stderr)


def cmd_segment(args: argparse.Namespace) -> int:
    from ..analysis.pipeline import segment_file
    from ..analysis.report import model_notice
    batch_only = (args.shard, args.workers, args.cpus_per_worker, args.ray_address)  # options of a batch alone
    if (args.out_dir is not None or args.manifest is not None or len(args.ct) > 1 or args.engine != "local"
            or any(v is not None for v in batch_only)):
        given = [name for name, value in (("--table", args.table), ("--visual-report", args.visual_report),
                                          ("--subpleural-band", args.subpleural_band)) if value is not None]
        if given:
            raise ILDSegError(f"{', '.join(given)}: for one CT only, not in a batch (each case's report.json "
                              "holds its regions, and summary.csv its distribution)")
        from .batch_command import run_batch_command
        return run_batch_command(args)
    if not args.ct:
        raise ILDSegError("no CT given: ildseg segment CT_PATH -o OUT (or several CTs with --out-dir DIR)")
    if args.output is None:
        raise ILDSegError("-o OUT is required for one CT (several CTs, a folder of series or --manifest "
                          "write into --out-dir DIR)")
    args.ct = args.ct[0]
    if args.lung_mask is None and not args.quiet:
        print("no --lung-mask given: computing the lung mask automatically", file=sys.stderr)
    if args.progress_lines:
        from .progress import ProgressLines
        bar = ProgressLines()
    else:
        bar = ProgressBar(args.quiet)
    try:
        summary = segment_file(args.ct, args.output, lung_mask=args.lung_mask, model=args.model, device=args.device,
                               probabilities=args.probabilities, report=args.report, overlay=args.overlay,
                               dicom_seg=args.dicom_seg, table=args.table, visual_report=args.visual_report,
                               **({} if args.subpleural_band is None else
                                  {"subpleural_band_mm": args.subpleural_band}),
                               max_memory_mb=args.max_memory, pixel_spacing=args.pixel_spacing,
                               crop_box=args.crop_box, decision=args.decision, progress=bar)
    finally:
        bar.close()
    args.outputs_complete = True
    notice = model_notice(summary["model"])
    if notice:
        print(notice, file=sys.stderr)
    _say_resampled(summary, args.quiet)
    _print_summary(summary, args.quiet)
    _say_input_checks(summary, args.quiet)
    if not args.quiet:
        print(f"labels written to {args.output}")
        if args.dicom_seg:
            print(f"DICOM Segmentation written to {args.dicom_seg}")
        for key, what in (("table", "regions table"), ("visual_report", "visual report")):
            if key in summary["outputs"]:
                print(f"{what} written to {summary['outputs'][key]}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..analysis.report import model_notice
    from .demo import run_demo
    if not args.quiet:
        print("built-in case: synthetic chest CT with simulated ILD patterns (made by code, no patient data)")
    bar = ProgressBar(args.quiet)
    try:
        summary = run_demo(args.out, model=args.model, device=args.device, max_memory_mb=args.max_memory,
                           pixel_spacing=args.pixel_spacing, decision=args.decision, progress=bar)
    finally:
        bar.close()
    _print_summary(summary, args.quiet)
    m = summary["model"]
    out = Path(args.out).resolve()
    print(f"weights: {m['name']} ({m['file']}, sha256 {m['sha256'][:12]})")
    notice = model_notice(m)
    if notice:
        print(notice)
    print(f"balanced accuracy against the known truth: {summary['demo_balanced_accuracy']:.3f} "
          f"(see {out / 'overlay.png'})")
    print(f"outputs in {out}: demo_ct.nrrd (input), demo_truth.seg.nrrd (truth), "
          "segmentation.seg.nrrd (result; open both in 3D Slicer), report.json, overlay.png")
    return 0


def cmd_architecture(args: argparse.Namespace) -> int:
    from ..engine.network import PAPER_TABLE_II, PRESETS, describe
    if args.list:
        rows = []
        for name, cfg in PRESETS.items():
            d = describe(cfg)
            paper_params, bacc = PAPER_TABLE_II[name]
            rows.append({"preset": name, "parameters": d["parameters"], "paper_parameters": paper_params * 1e5,
                         "receptive_field": d["receptive_field"], "paper_cv_bacc_percent": bacc})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'preset':<22}{'parameters':>12}{'paper (x1e5)':>14}{'receptive field':>17}{'paper BACC %':>14}")
            for r in rows:
                print(f"{r['preset']:<22}{r['parameters']:>12,}{r['paper_parameters'] / 1e5:>14.2f}"
                      f"{r['receptive_field']:>17}{r['paper_cv_bacc_percent']:>14.1f}")
        return 0
    if args.preset not in PRESETS:
        raise ILDSegError(f"unknown preset '{args.preset}' (choose from {', '.join(PRESETS)})")
    d = describe(PRESETS[args.preset])
    d["preset"] = args.preset
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"preset {args.preset}: {d['parameters']:,} parameters, receptive field {d['receptive_field']} x "
          f"{d['receptive_field']} pixels")
    print(f"{'layer':<16}{'operation':<34}{'channels':>9}{'parameters':>12}")
    for layer in d["layers"]:
        print(f"{layer['name']:<16}{layer['op']:<34}{layer['channels']:>9}{layer['parameters']:>12,}")
    return 0


def _commands() -> dict:
    from ..training.commands import COMMANDS as training_commands
    from .bench import run as cmd_bench
    from .compare import cmd_compare
    from .shards import run as cmd_merge_summaries
    return {"segment": cmd_segment, "demo": cmd_demo, "architecture": cmd_architecture, "bench": cmd_bench,
            "compare": cmd_compare, "merge-summaries": cmd_merge_summaries, **training_commands}


def _one_line(message: str, limit: int = 0) -> str:
    """Collapse a message onto one line (file names and library text may hold line breaks)."""
    text = " ".join(message.split())
    return text if not limit or len(text) <= limit else text[:limit - 3] + "..."


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the same clean-up runs as for Ctrl-C."""


def _sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess
    raise _Terminated


def _interrupted_note(args: Optional[argparse.Namespace]) -> str:
    """What an interruption leaves behind, per command (the default: nothing said)."""
    command = getattr(args, "command", None)
    if command == "segment":
        if getattr(args, "batch_out_dir", None):
            return (f"; the cases that had finished are complete in {args.batch_out_dir}: "
                    "rerun the same command to go on")
        if getattr(args, "outputs_complete", False):  # Ctrl-C while the summary printed
            return "; the outputs had been written completely"
        return "; no output was written"
    if command == "train":
        checkpoint = Path(args.out) / "checkpoint.safetensors"
        if checkpoint.exists():
            return f"; finished epochs are kept in {checkpoint}: rerun with --resume to continue"
        return "; no epoch had finished, nothing to resume"
    if command == "compare":
        return "; no output was written"
    if command == "simulate":
        return "; no case was written"
    if command == "finetune":
        return "; the unfinished run's outputs were removed"
    return ""


def set_process_defaults() -> None:
    """Settings for a process that the ``ildseg`` command runs: called first thing by
    main(), never at import (the library is also imported inside Slicer, whose
    process and children must keep their own settings).

    OpenMP threads that wait for work sleep instead of spinning. Must be set before
    torch is imported (its OpenMP runtime reads it once); a torch imported earlier in
    the process keeps its own setting. Measured on a 2-core machine that other
    processes also use: a 30-slice CT's network stage took 51.7 s with 2 spinning
    threads and 10.7 s with 2 sleeping ones (BENCHMARKS.md); on an idle machine,
    waking a sleeping thread costs microseconds per parallel region. The user's own
    OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: Input path options of the commands: attribute -> (what it is, may be a DICOM folder).
_INPUT_PATHS = {"ct": ("CT", True), "lung_mask": ("lung mask", True), "model": ("model file", False),
                "baseline": ("baseline CT", True), "followup": ("follow-up CT", True),
                "baseline_mask": ("lung mask", True), "followup_mask": ("lung mask", True),
                "baseline_labels": ("labels", True), "followup_labels": ("labels", True),
                "init": ("model file", False), "manifest": ("manifest", False), "split": ("folds file", False)}
#: Output path options (files or folders): a path the system cannot even look up is refused up front.
_OUTPUT_PATHS = ("output", "out", "report", "probabilities", "overlay", "confusion", "json", "dicom_seg", "out_dir",
                 "table", "visual_report")


def _check_input_paths(args: argparse.Namespace) -> None:
    """Before any work: every input path given on the command line is something that
    can be read (no symlink loop, FIFO, device, folder for a file, missing permission),
    said in one line that names it."""
    from ..imaging.paths import check_input, check_output_path
    for attr, (what, folder_ok) in _INPUT_PATHS.items():
        value = getattr(args, attr, None)
        if attr == "split" and args.command == "split":
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v and v != "auto":
                check_input(v, what, folder=folder_ok)
    for attr in _OUTPUT_PATHS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_output_path(value)


def main(argv: Optional[List[str]] = None) -> int:
    set_process_defaults()
    # SIGTERM is handled from the start (argument parsing imports the training package)
    # and the previous handler comes back afterwards, for callers that run main() in-process.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main_thread else None
    args: Optional[argparse.Namespace] = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command line as given, for provenance
        logging.basicConfig(format="ildseg: %(levelname)s: %(message)s",
                            level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING)
        command: Callable[[argparse.Namespace], int] = _commands()[args.command]
        _check_input_paths(args)
        return command(args)
    except ILDSegError as e:
        if args is not None and args.debug:
            raise
        print(f"ildseg: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        # An operating-system error on a path that no check caught (a folder that
        # vanished, a permission lost mid-run): the user's to fix, so exit 2.
        if args is not None and args.debug:
            raise
        from ..imaging.paths import os_error_message
        print(f"ildseg: error: {_one_line(os_error_message(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ildseg: interrupted{_interrupted_note(args)}", file=sys.stderr)
        # The shell's convention: 128 + the signal number.
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except Exception as e:  # a bug, not a user error: still one line unless --debug
        if args is None or args.debug:
            raise
        # Library messages (SimpleITK's in particular) can span lines: keep the promise of one line.
        print(f"ildseg: internal error: {type(e).__name__}: {_one_line(str(e), 300)} "
              "(rerun with --debug for details)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
