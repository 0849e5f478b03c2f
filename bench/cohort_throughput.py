"""Cases per hour of ``ildseg segment`` batches: the serial batch (the baseline) and
``--engine ray`` with 1 and 2 workers, on the same CTs, in one run, on this machine.

Each configuration runs as the user runs it (a fresh ``ildseg`` process, a fresh output
folder, the bundled model, ``--device cpu``), its wall time taken from the command's
start to its end: for Ray this includes starting the local cluster and the workers,
which the figure "cases per hour, cluster start excluded" leaves out (wall time minus
the time until the workers were ready, read from the command's own line
'Ray: N workers ... on M node(s)').

    .venv/bin/python bench/cohort_throughput.py                       # the three CTs below, ~10 min on 2 cores
    .venv/bin/python bench/cohort_throughput.py --ct A.nrrd B.nrrd --configs local,ray:2 --json out.json

Figures go to BENCHMARKS.md with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ILDSEG_TEST_DATA", REPO.parent / "shared" / "data"))
#: Whole CC BY CTs of ../shared/data: 30, 48 and 61 slices of 512 x 512.
DEFAULT_CTS = [DATA / "lung-pet-ct-dx-A0002",
               DATA / "tcga-luad-tcga-17-z013" / "tcga-luad-tcga-17-z013.nrrd",
               DATA / "tcga-luad-tcga-17-z015" / "tcga-luad-tcga-17-z015.nrrd"]


def run_config(config: str, cts, out: Path) -> dict:
    args = [sys.executable, "-m", "ILDSegmentationLib", "segment", *map(str, cts), "--out-dir", str(out),
            "--device", "cpu"]
    workers = 1
    if config.startswith("ray:"):
        workers = int(config.split(":")[1])
        args += ["--engine", "ray", "--workers", str(workers), "--cpus-per-worker", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready_at = [None]
    err_lines = []

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("Ray: ") and ready_at[0] is None:
                ready_at[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed ({proc.returncode}): {''.join(err_lines)[-2000:]}")
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n = len(rows)
    working = wall - (ready_at[0] or 0.0)
    return {"config": config, "workers": workers, "cases": n, "wall_s": round(wall, 1),
            "cluster_start_s": None if ready_at[0] is None else round(ready_at[0], 1),
            "sum_case_s": round(sum(float(r["seconds"]) for r in rows), 1),
            "cases_per_hour": round(n * 3600 / wall, 1),
            "cases_per_hour_per_worker": round(n * 3600 / wall / workers, 1),
            "cases_per_hour_started": round(n * 3600 / working, 1),
            "cases_per_hour_per_worker_started": round(n * 3600 / working / workers, 1),
            "device": sorted({r["device"] for r in rows}), "last_line": stdout.strip().splitlines()[-1]}


def machine() -> dict:
    import torch
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray_version, "load_average": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", nargs="+", type=Path, default=DEFAULT_CTS)
    p.add_argument("--configs", default="local,ray:1,ray:2", help="comma-separated: local, ray:N")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    missing = [str(c) for c in a.ct if not c.exists()]
    if missing:
        raise SystemExit(f"CT not found: {', '.join(missing)} (set ILDSEG_TEST_DATA or give --ct)")
    result = {"machine_before": machine(), "cts": [str(c) for c in a.ct], "runs": []}
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        for config in a.configs.split(","):
            r = run_config(config, a.ct, Path(tmp) / config.replace(":", "-"))
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    result["load_average_after"] = os.getloadavg()
    print(f"\nmachine: {result['machine_before']}, load average after {result['load_average_after']}")
    print(f"{'config':<8}{'cases':>6}{'wall s':>9}{'start s':>9}{'cases/h':>9}{'/h/worker':>11}"
          f"{'/h/worker, started':>20}")
    for r in result["runs"]:
        print(f"{r['config']:<8}{r['cases']:>6}{r['wall_s']:>9}{str(r['cluster_start_s'] or '-'):>9}"
              f"{r['cases_per_hour']:>9}{r['cases_per_hour_per_worker']:>11}"
              f"{r['cases_per_hour_per_worker_started']:>20}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
