"""``ildseg segment`` over many CTs, as a command: the options checked, the engine
chosen (the serial batch of :mod:`.batch`, Ray workers of :mod:`.distributed`, a shard of
:mod:`.shards`), progress on the terminal, the closing tally. It sits above the three,
which share :func:`.batch.process_case`, so that none of them imports another's caller."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import InputError
from .batch import (DEFAULT_LABELS_NAME, REPORT_NAME, SUMMARY_NAME, BatchCase, CaseOutcome, OutputNames,
                    cases_from_paths, check_unique, read_batch_manifest, run_batch, write_summary)


def _file_name(value: Optional[str], option: str) -> Optional[str]:
    """In a batch, output options name a file inside each case folder."""
    if value is None:
        return None
    if not value or Path(value).name != value or value in (".", ".."):
        raise InputError(f"in a batch, {option} names a file inside each case folder: give a file name "
                         f"such as {Path(value).name or 'out'}, not the path {value}")
    return value


def run_batch_command(args: Any) -> int:
    """``ildseg segment CT... --out-dir DIR`` / ``--manifest cases.csv``: see the module."""
    from tqdm import tqdm

    from ..engine import modelfile
    from ..engine.inference import Inferer

    if args.out_dir is None:
        raise InputError("several CTs, a folder of series or a manifest need --out-dir DIR "
                         "(one CT with -o writes one file)")
    if args.lung_mask not in (None, "auto"):
        raise InputError("in a batch each case's lung mask comes from the manifest's lung_mask column; "
                         "--lung-mask can only be 'auto' here")
    names = OutputNames(labels=_file_name(args.output, "-o") or DEFAULT_LABELS_NAME,
                        report=_file_name(args.report, "--report") or REPORT_NAME,
                        dicom_seg=_file_name(args.dicom_seg, "--dicom-seg"),
                        overlay=_file_name(args.overlay, "--overlay"),
                        probabilities=_file_name(args.probabilities, "--probabilities"))
    for keyword, flag in (("table", "--table"), ("visual_report", "--visual-report")):  # outputs segment may add
        if getattr(args, keyword, None) is not None:
            names.extra[keyword] = _file_name(getattr(args, keyword), flag)
    if len(set(names.all())) != len(names.all()):
        raise InputError("two outputs of a case have the same file name")
    cases = cases_from_paths(args.ct) + (read_batch_manifest(args.manifest) if args.manifest else [])
    if not cases:
        raise InputError("no CT given: name CT paths, a folder of series, or --manifest cases.csv")
    check_unique(cases)
    # How the batch runs (commands/distributed.py, commands/shards.py): checked before any work.
    from . import distributed, shards  # noqa: I001 - imported when a batch runs
    distributed.check_engine_arguments(args)
    engine = getattr(args, "engine", "local")
    if engine == "ray":
        distributed.import_ray()
    shard = shards.parse_shard(args.shard) if getattr(args, "shard", None) is not None else None
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"--out-dir {out} is a file, not a folder") from None
    summary_name = SUMMARY_NAME
    if shard is not None:
        shards.write_shard_manifest(out, *shard, cases)
        summary_name = shards.shard_stem(*shard) + ".csv"
        cases = shards.select_shard(cases, *shard)

    # Loaded once for every case; a bad model or device stops the batch before any case.
    model = modelfile.load_model(args.model)
    segment_options: Dict[str, Any] = {"device": args.device, "max_memory_mb": args.max_memory,
                                       "pixel_spacing": args.pixel_spacing}
    # Run options that the segment command may add: its attribute -> segment_file's keyword.
    for option, keyword in (("crop_box", "crop_box"), ("subpleural_band", "subpleural_band_mm"),
                            ("decision", "decision")):
        if getattr(args, option, None) is not None:
            segment_options[keyword] = getattr(args, option)
    if engine == "local":  # a Ray worker checks the device where it runs (the driver may have no GPU)
        Inferer(model, device=args.device, max_memory_mb=args.max_memory, pixel_spacing=args.pixel_spacing,
                decision=getattr(args, "decision", "paper"))
    else:  # the decision rule depends on the model file alone: refused here, before any worker starts
        from ..engine.decision import resolve_decision
        try:
            resolve_decision(getattr(args, "decision", "paper"), model.info.decision)
        except ValueError as e:
            raise InputError(f"decision rule: {e}") from None

    from ..analysis.report import model_notice
    notice = model_notice({"trained": model.info.trained, "name": model.info.name,
                           "provenance": model.info.provenance})
    if notice and not args.quiet:
        print(notice, file=sys.stderr)

    bar = tqdm(total=len(cases), unit="case", disable=True if args.quiet else None, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} cases {elapsed}<{remaining}{postfix}")

    def progress(case: BatchCase, fraction: float, message: str) -> None:
        bar.set_description_str(case.case_id[:24], refresh=False)
        bar.set_postfix_str(f"{int(fraction * 100)}% {message[:32]}")

    tally = _Tally(len(cases))

    def on_case(outcome: CaseOutcome, index: int, total: int) -> None:
        tally.add(outcome.status)
        bar.set_postfix_str(tally.line(), refresh=False)
        bar.update(1)
        c = outcome.case
        if outcome.status == "failed":
            # Always said, --quiet or not: the exit code alone does not name the case.
            bar.write(f"ildseg: case {c.case_id} failed: {outcome.error}", file=sys.stderr)
        elif not args.quiet:
            what = "already done, skipped" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f} s"
            lung = (outcome.report or {}).get("lung_volume_ml")
            bar.write(f"case {c.case_id}: {what}" + (f", lung {lung:.0f} mL" if isinstance(lung, (int, float)) else "")
                      + f"  [{tally.line()}]", file=sys.stderr)

    def workers_ready(message: str) -> None:
        tally.restart()  # the cluster's start is not a case's time
        if not args.quiet:
            bar.write(message, file=sys.stderr)

    args.batch_out_dir = str(out)
    try:
        if engine == "ray":
            result = distributed.run_ray_batch(
                cases, out, names=names, model=model, overwrite=args.overwrite, segment_options=segment_options,
                workers=args.workers, cpus_per_worker=args.cpus_per_worker, address=args.ray_address,
                summary_name=summary_name, on_case=on_case,
                on_start=workers_ready)
        else:
            result = run_batch(cases, out, names=names, model=model, overwrite=args.overwrite,
                               segment_options=segment_options, on_case=on_case, progress=progress,
                               summary_name=summary_name)
            if not cases:  # an empty shard still says so, for the merge
                write_summary(result.summary, [])
    finally:
        bar.close()
    failed, skipped, done = result.count("failed"), result.count("skipped"), result.count("done")
    if not args.quiet:
        print(f"{len(cases)} cases{f' (shard {shard[0]}/{shard[1]})' if shard else ''}: {done} done, "
              f"{skipped} already done (skipped), {failed} failed; summary in {result.summary}")
    return result.exit_code


class _Tally:
    """Cases finished so far and the time left, for the progress line. The time left
    is the cases left at the rate cases were segmented (or failed) so far, all workers
    together, counted from when the workers were ready (:meth:`restart`) or after the
    complete cases skipped at the start."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.restart()

    def restart(self) -> None:
        self.skipped_until = time.monotonic()

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "skipped" and self.counts["done"] + self.counts["failed"] == 0:
            self.skipped_until = time.monotonic()

    def line(self) -> str:
        done, skipped, failed = self.counts["done"], self.counts["skipped"], self.counts["failed"]
        left = self.total - done - skipped - failed
        worked = done + failed
        eta = "?"
        if worked and left:
            seconds = left * (time.monotonic() - self.skipped_until) / worked
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} d"
        elif not left:
            eta = "00:00:00"
        # "error", not "failed": a line holding 'failed' is a failed case's (logs are grepped for it).
        return (f"{done + skipped + failed}/{self.total} finished ({done} done, {skipped} skipped, "
                f"{failed} error{'s' * (failed != 1)}), {left} left, ETA {eta}")
