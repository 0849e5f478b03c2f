"""Cohort scale (commands/distributed.py, commands/shards.py): ``--engine ray`` writes
what the serial batch writes and resumes as it does; ``--shard I/N`` partitions a
batch and ``merge-summaries`` joins the shards into the unsharded summary.

Real CC BY CTs (three, cut to 2-slice slabs so that a case takes seconds), plus a
truncated copy of one as a broken case. The Ray tests run a 2-CPU local cluster and
skip, saying why, only when Ray is not installed (the test extra installs it)."""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, _need

from ILDSegmentationLib.commands import cli
from ILDSegmentationLib.commands.batch import BatchCase
from ILDSegmentationLib.commands.distributed import plan_workers
from ILDSegmentationLib.commands.shards import batch_fingerprint, select_shard, shard_of

#: Three CC BY 3.0 CTs of /work/shared/data (README there), none of them held out.
REAL = ("tcga-luad-tcga-17-z013", "tcga-luad-tcga-17-z015", "lidc-idri-0002")
CASE_IDS = ["tcga-luad-tcga-17-z013", "tcga-luad-tcga-17-z015", "broken", "lidc-idri-0002"]
SLICES = 2


def ildseg(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _env(**extra):
    """This process's environment without a Ray address of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return dict(env, OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def slabs(tmp_path_factory):
    """The three CTs cut to the middle 2 slices (geometry kept), and a truncated file:
    the case list in the order the batches are given."""
    d = tmp_path_factory.mktemp("slabs")
    paths = []
    for name in REAL:
        image = sitk.ReadImage(str(_need(DATA / name / f"{name}.nrrd")))
        k = image.GetSize()[2] // 2
        path = d / f"{name}.nrrd"
        sitk.WriteImage(image[:, :, k - 1:k - 1 + SLICES], str(path), True)
        paths.append(path)
    data = paths[0].read_bytes()
    (d / "broken.nrrd").write_bytes(data[:len(data) // 2])
    return [paths[0], paths[1], d / "broken.nrrd", paths[2]]


@pytest.fixture(scope="module")
def serial(slabs, tmp_path_factory):
    """The serial batch (--engine local, in this process, one torch thread as each
    1-CPU Ray worker has): the reference."""
    import torch
    out = tmp_path_factory.mktemp("serial") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["segment", *map(str, slabs), "--out-dir", str(out), "--device", "cpu", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 3
    return out


def _summary(out: Path, name: str = "summary.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def _labels(out: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / "labels.seg.nrrd")))


def _same_table(a, b):
    """Rows and columns equal, but for the seconds each case took in its run, and the
    memory addresses ITK prints in its read errors ('NrrdImageIO(0x5586...)')."""
    def comparable(rows):
        return [{k: re.sub(r"0x[0-9a-f]+", "0x", v) for k, v in r.items() if k != "seconds"} for r in rows]
    assert [list(r) for r in a] == [list(r) for r in b]
    diffs = [{k: (x[k], y[k]) for k in x if x[k] != y.get(k)} for x, y in zip(comparable(a), comparable(b))]
    assert not any(diffs), diffs


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU local Ray cluster started here; the commands connect to it by address."""
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed (pip install 'ildsegmentation[ray]'; the test extra installs it)")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    print(f"Ray local cluster started in {time.perf_counter() - t0:.1f} s")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the batch ended before it could be interrupted: {proc.communicate()}")
        try:
            if len(_summary(path.parent, path.name)) >= rows:
                return
        except (OSError, csv.Error):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no row in {path} after {timeout} s")


def test_ray_batch_killed_midway_then_rerun_writes_what_the_serial_batch_writes(slabs, serial, ray_cluster,
                                                                                tmp_path):
    """A Ray batch (connected through $RAY_ADDRESS, one 1-CPU worker so that 'midway'
    is well defined) is killed with SIGTERM after its first case; the rerun (--workers 2
    on a local cluster it starts itself) completes only the cases not complete, the
    broken case fails alone (exit 3), and the volumes and summary are the serial ones."""
    out = tmp_path / "out"
    args = ["segment", *slabs, "--out-dir", out, "--device", "cpu", "--engine", "ray"]
    proc = subprocess.Popen([sys.executable, "-m", "ILDSegmentationLib", *map(str, args), "--workers", "1",
                             "--cpus-per-worker", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(RAY_ADDRESS=ray_cluster))
    try:
        _wait_for_rows(out / "summary.csv", 1, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "ildseg: interrupted; the cases that had finished are complete in" in stderr
    complete = [c for c in CASE_IDS if (out / c / "report.json").is_file()]
    assert 1 <= len(complete) < 3, complete  # midway: some real cases complete, not all
    listed = [r["case_id"] for r in _summary(out)]
    assert listed == [c for c in CASE_IDS if c in listed]  # the cases that had finished, in the order given
    inodes = {c: (out / c / "labels.seg.nrrd").stat().st_ino for c in complete}

    r = ildseg(*args, "--workers", "2", env=_env())
    assert r.returncode == 3, r.stderr
    assert "Ray: 2 workers (1 CPU each)" in r.stderr
    failed = [line for line in r.stderr.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith("ildseg: case broken failed: "), r.stderr
    assert f"4 cases: {3 - len(complete)} done, {len(complete)} already done (skipped), 1 failed" in r.stdout
    assert "4/4 finished (" in r.stderr and "0 left, ETA 00:00:00" in r.stderr  # the progress lines
    # Complete cases were not touched (outputs are written by rename: a rewrite is a new inode).
    assert {c: (out / c / "labels.seg.nrrd").stat().st_ino for c in complete} == inodes
    assert not (out / "broken").exists()
    for case in CASE_IDS:
        if case != "broken":
            assert np.array_equal(_labels(out, case), _labels(serial, case)), case
    rows, reference = _summary(out), _summary(serial)
    assert [r["status"] for r in rows] == ["skipped" if c in complete else "failed" if c == "broken" else "done"
                                           for c in CASE_IDS]
    for r in rows:  # the serial batch did them all: only the status says which run did what
        r["status"] = "failed" if r["case_id"] == "broken" else "done"
    _same_table(rows, reference)


def _running_case_workers():
    """Processes of Ray actors of this batch now running a case: Ray names them
    'ray::CaseWorker.run' while the method runs."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::CaseWorker.run"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc (Linux)")
def test_a_worker_killed_on_a_case_fails_that_case_alone_and_the_batch_goes_on(slabs, ray_cluster, tmp_path):
    """The worker process is killed (SIGKILL, as the kernel's out-of-memory killer does)
    while it segments the first case: that case fails, named, Ray restarts the worker
    and the second case is done (exit 3); a rerun redoes only the killed case."""
    out = tmp_path / "out"
    args = ["segment", slabs[0], slabs[1], "--out-dir", out, "--device", "cpu", "--engine", "ray",
            "--workers", "1", "--cpus-per-worker", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(RAY_ADDRESS=ray_cluster))
    try:
        end, killed = time.monotonic() + 300, None
        while killed is None and time.monotonic() < end and proc.poll() is None:
            pids = _running_case_workers()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no worker was seen running a case"
    assert proc.returncode == 3, stderr
    failed = [line for line in stderr.splitlines() if "failed" in line]
    assert len(failed) == 1 and failed[0].startswith(f"ildseg: case {CASE_IDS[0]} failed: the Ray worker died "
                                                     "while segmenting it"), stderr
    assert [(r["case_id"], r["status"]) for r in _summary(out)] == [(CASE_IDS[0], "failed"), (CASE_IDS[1], "done")]
    assert not (out / CASE_IDS[0] / "report.json").exists()
    r = ildseg(*args, env=_env(RAY_ADDRESS=ray_cluster))
    assert r.returncode == 0 and "2 cases: 1 done, 1 already done (skipped), 0 failed" in r.stdout, r.stderr


def test_ray_engine_without_ray_says_how_to_install_it(slabs, tmp_path):
    """Ray made unimportable in the command's process (sys.modules entry None): one
    line naming the pip command, exit 2, nothing written."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['ray'] = None; from ILDSegmentationLib.commands.cli import main; "
            f"sys.exit(main({['segment', str(slabs[0]), '--out-dir', str(out), '--engine', 'ray']!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ildseg: error: --engine ray needs Ray, which is not installed: pip install 'ildsegmentation[ray]'"]
    assert not out.exists()


@pytest.mark.parametrize("given, message", [
    (["--workers", "2"], "--workers: with --engine ray only"),
    (["--ray-address", "auto"], "--ray-address: with --engine ray only"),
    (["--engine", "ray", "--workers", "0"], "--workers 0: give 1 or more"),
    (["--shard", "3/2"], "--shard 3/2: I must be from 1 to N"),
    (["--shard", "1of2"], "--shard 1of2: give I/N"),
])
def test_bad_engine_or_shard_options_exit_2_in_one_line(slabs, tmp_path, capsys, given, message):
    out = tmp_path / "out"
    code = cli.main(["segment", str(slabs[0]), "--out-dir", str(out), *given])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"ildseg: error: {message}"), err
    assert not any(out.glob("*/report.json"))


def test_plan_workers_from_the_cluster_resources():
    two_cpu_nodes = [{"CPU": 16.0}, {"CPU": 8.0}]
    # One worker per GPU; --workers shares the GPUs.
    assert plan_workers([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 2}]).workers == 6
    assert plan_workers([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 2}]).num_gpus == 1
    assert plan_workers([{"CPU": 8, "GPU": 1}], workers=4).num_gpus == 0.25
    assert plan_workers([{"CPU": 8, "GPU": 2}]).num_cpus == 1  # the CPU's part of a case: one thread,
    assert plan_workers([{"CPU": 8, "GPU": 2}], cpus_per_worker=4).num_cpus == 4  # unless asked
    # --device cpu leaves the GPUs alone.
    assert plan_workers([{"CPU": 8, "GPU": 1}], device="cpu").num_gpus == 0
    # CPU nodes: one worker per node with all the smallest node's cores, or C cores each.
    plan = plan_workers(two_cpu_nodes)
    assert (plan.workers, plan.num_cpus) == (2, 8)
    plan = plan_workers(two_cpu_nodes, cpus_per_worker=4)
    assert (plan.workers, plan.num_cpus) == (6, 4)
    plan = plan_workers([{"CPU": 2.0}], workers=2)
    assert (plan.workers, plan.num_cpus) == (2, 1)
    plan = plan_workers([{"CPU": 2.0}], workers=3)  # more workers than cores: a share each, still fits
    assert plan.workers == 3 and plan.num_cpus * 3 <= 2
    from ILDSegmentationLib.errors import InputError
    with pytest.raises(InputError, match="no GPU"):
        plan_workers(two_cpu_nodes, device="cuda")
    with pytest.raises(InputError, match="holds only 6 such workers"):
        plan_workers(two_cpu_nodes, workers=7, cpus_per_worker=4)
    with pytest.raises(InputError, match="largest node"):
        plan_workers(two_cpu_nodes, cpus_per_worker=32)


# ---------------------------------------------------------------- shards

def test_shards_partition_the_cases_whatever_their_order():
    cases = [BatchCase(f"case-{i:04d}", Path(f"/ct/{i}.nrrd")) for i in range(300)]
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    for n in (1, 3, 7):
        parts = [select_shard(cases, i, n) for i in range(1, n + 1)]
        assert sorted(c.case_id for p in parts for c in p) == sorted(c.case_id for c in cases)  # all, once
        assert [[c.case_id for c in p] for p in parts] == \
               [sorted(c.case_id for c in select_shard(shuffled, i, n)) for i in range(1, n + 1)]
    # A case keeps its shard when the cohort grows; ids differing only in case share one.
    assert [shard_of(c.case_id, 7) for c in cases] == [shard_of(c.case_id.upper(), 7) for c in cases]
    assert batch_fingerprint(cases) == batch_fingerprint(shuffled) != batch_fingerprint(cases[1:])


N_SHARDS = 3


@pytest.fixture(scope="module")
def sharded(slabs, tmp_path_factory):
    """The batch run as N_SHARDS shards into one folder (serial engine, in this process)."""
    import torch
    out = tmp_path_factory.mktemp("sharded") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = [cli.main(["segment", *map(str, slabs), "--out-dir", str(out), "--device", "cpu", "--quiet",
                           "--shard", f"{i}/{N_SHARDS}"]) for i in range(1, N_SHARDS + 1)]
    finally:
        torch.set_num_threads(threads)
    assert sorted(codes) == sorted(3 if shard_of("broken", N_SHARDS) == i else 0 for i in range(1, N_SHARDS + 1))
    return out


def test_shards_merged_equal_the_unsharded_batch(sharded, serial, capsys):
    assert not (sharded / "summary.csv").exists()
    for i in range(1, N_SHARDS + 1):
        meta = json.loads((sharded / f"summary-shard-{i}-of-{N_SHARDS}.json").read_text())
        ids = [r["case_id"] for r in _summary(sharded, f"summary-shard-{i}-of-{N_SHARDS}.csv")]
        assert ids == [c["case_id"] for c in meta["cases"]] == [c for c in CASE_IDS if shard_of(c, N_SHARDS) == i]
    assert cli.main(["merge-summaries", str(sharded)]) == 0
    assert f"{N_SHARDS} shards, 4 cases (1 failed) merged into" in capsys.readouterr().out
    _same_table(_summary(sharded), _summary(serial))
    for case in CASE_IDS:
        if case != "broken":
            assert np.array_equal(_labels(sharded, case), _labels(serial, case)), case


def _copy_shards(src: Path, dst: Path, shards) -> Path:
    dst.mkdir(parents=True)
    for i in shards:
        for ext in (".csv", ".json"):
            shutil.copy(src / f"summary-shard-{i}-of-{N_SHARDS}{ext}", dst)
    return dst


@pytest.mark.parametrize("problem", ["missing", "given_twice", "case_in_two_shards", "incomplete", "other_split",
                                     "other_batch", "no_shards"])
def test_merge_refuses_missing_incomplete_or_overlapping_shards(sharded, tmp_path, capsys, problem):
    d = _copy_shards(sharded, tmp_path / "a", range(1, N_SHARDS + 1))
    sources = [d]
    if problem == "missing":
        (d / f"summary-shard-2-of-{N_SHARDS}.csv").unlink()
        expected = f"1 of {N_SHARDS} shards missing (2/{N_SHARDS})"
    elif problem == "given_twice":
        sources.append(_copy_shards(sharded, tmp_path / "b", [1]))
        expected = f"shard 1/{N_SHARDS} given twice"
    elif problem == "case_in_two_shards":
        # Shard 1 claims a case of shard 2 too (its list and its rows): an overlap, whichever shard holds it.
        other = next(c for c in CASE_IDS if shard_of(c, N_SHARDS) != 1)
        home = shard_of(other, N_SHARDS)
        meta_path = d / f"summary-shard-1-of-{N_SHARDS}.json"
        meta = json.loads(meta_path.read_text())
        meta["cases"].append({"case_id": other, "position": CASE_IDS.index(other)})
        meta_path.write_text(json.dumps(meta))
        row = next(r for r in _summary(d, f"summary-shard-{home}-of-{N_SHARDS}.csv") if r["case_id"] == other)
        rows = _summary(d, f"summary-shard-1-of-{N_SHARDS}.csv") + [row]
        with open(d / f"summary-shard-1-of-{N_SHARDS}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(rows)
        expected = f"case {other} is in shard 1/{N_SHARDS} and in shard {home}/{N_SHARDS}"
    elif problem == "incomplete":
        i = next(i for i in range(1, N_SHARDS + 1) if _summary(d, f"summary-shard-{i}-of-{N_SHARDS}.csv"))
        path = d / f"summary-shard-{i}-of-{N_SHARDS}.csv"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # its last row lost
        expected = f"shard {i}/{N_SHARDS} is incomplete: 1 of its"
    elif problem == "other_split":
        shutil.copy(d / f"summary-shard-1-of-{N_SHARDS}.csv", d / "summary-shard-1-of-9.csv")
        meta = json.loads((d / f"summary-shard-1-of-{N_SHARDS}.json").read_text())
        (d / "summary-shard-1-of-9.json").write_text(json.dumps(dict(meta, of=9)))
        expected = "shards of different splits"
    elif problem == "other_batch":
        meta_path = d / f"summary-shard-2-of-{N_SHARDS}.json"
        meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), batch_fingerprint="0" * 64)))
        expected = "shards of different batches"
    else:
        for p in d.iterdir():
            p.unlink()
        expected = "holds no shard summary"
    code = cli.main(["merge-summaries", *map(str, sources), "--out", str(tmp_path / "summary.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ildseg: error: ") and expected in err[0], err
    assert not (tmp_path / "summary.csv").exists()
