"""Reliability: interruptions, full and unwritable output locations, memory bounds,
and corrupt or odd real files. Each test backs a promise in docs/guarantees.md.

Most tests run ``ildseg`` as a user does (a subprocess). Tests that need root (a tiny
tmpfs, a read-only mount) or the real CT in ../shared/data skip with the reason.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ILDSegmentationLib.commands import cli
from ILDSegmentationLib.errors import InputError
from ILDSegmentationLib.imaging.geometry import Geometry, canonical_view
from ILDSegmentationLib.engine.inference import Inferer
from ILDSegmentationLib.imaging.io import read_ct
from ILDSegmentationLib.analysis.pipeline import segment_file

from permissions import public_folder, run_unprivileged, unprivileged_command
from synthetic import random_model, two_lungs
from training_data import make_manifest

# A fixed thread count makes CPU results reproducible across processes and keeps
# these tests from fighting over the cores of a shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _ildseg(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV, **kw)


def _write(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[:array.ndim])
    sitk.WriteImage(image, str(path))
    return path


def _error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("ildseg:")]


def _assert_one_line_error(r: subprocess.CompletedProcess, code: int = 2, contains: str = "") -> str:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in _error_lines(r.stderr) if "error" in line]
    assert len(lines) == 1, r.stderr
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _leftovers(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("model")).path


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Tuple[Path, Path, np.ndarray]:
    d = tmp_path_factory.mktemp("small")
    hu, mask = two_lungs()
    return _write(d / "ct.nrrd", hu), _write(d / "mask.nrrd", mask), mask


# =========================================================================================
# Interruption
# =========================================================================================

@pytest.fixture(scope="module")
def full_size_case(tmp_path_factory) -> Tuple[Path, Path]:
    """A CT of real size (512 x 512 pixels, 24 slices) with big lungs: minutes of CPU
    work, so a signal always arrives while the network runs."""
    d = tmp_path_factory.mktemp("full-size")
    hu, mask = two_lungs(24, 512, 512, seed=3)
    return _write(d / "ct.nrrd", hu, (0.7, 0.7, 2.0)), _write(d / "mask.nrrd", mask, (0.7, 0.7, 2.0))


def _start_with_progress_on_a_terminal(args: Sequence[str], marker: bytes, timeout: float = 180):
    """Start ``ildseg`` with stderr on a pseudo-terminal (so it draws its progress bar)
    and return once ``marker`` has appeared there."""
    master, slave = pty.openpty()
    # A terminal of 24 x 100 characters: with no size tqdm draws nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: give the child the terminal default a user's Ctrl-C meets.
    proc = subprocess.Popen([sys.executable, "-m", "ILDSegmentationLib", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            os.close(master)
            pytest.fail(f"ildseg ended or stalled before showing progress: {seen[-2000:]!r}")
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            seen += os.read(master, 65536)
    return proc, master, seen


def _finish(proc: subprocess.Popen, master: int, seen: bytes, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("ildseg did not stop after the signal")
    os.close(master)
    proc.wait(timeout=timeout)
    proc.stdout.close()
    return seen.decode("utf-8", "replace")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_segment_leaves_no_output(full_size_case, model_path, tmp_path, sig):
    ct, mask = full_size_case
    out = tmp_path / "out"
    out.mkdir()
    proc, master, seen = _start_with_progress_on_a_terminal(
        ["segment", ct, "--lung-mask", mask, "--model", model_path, "--device", "cpu", "-o", out / "labels.seg.nrrd",
         "--probabilities", out / "p.nrrd", "--report", out / "report.json", "--overlay", out / "overlay.png"],
        marker=b"lung crops")
    proc.send_signal(sig)
    stderr = _finish(proc, master, seen)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    assert _error_lines(stderr) == ["ildseg: interrupted; no output was written"], stderr[-2000:]
    assert _leftovers(out) == [], "no output and no temporary file may be left"


def test_interrupt_while_writing_removes_every_output(small_case, model_path, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing the second output: the half-written temporary
    file and the first, complete output are both removed."""
    ct, mask, _ = small_case
    import ILDSegmentationLib.imaging.io as io_module
    real_write = sitk.WriteImage
    calls = []

    def write_then_interrupt(image, path, *args):
        calls.append(path)
        if len(calls) == 2:  # the probabilities: leave a partial file, as a real crash would
            Path(path).write_bytes(b"NRRD0004\n" + b"\0" * 1000)
            raise KeyboardInterrupt
        return real_write(image, path, *args)

    monkeypatch.setattr(io_module.sitk, "WriteImage", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        segment_file(ct, tmp_path / "labels.nrrd", lung_mask=mask, model=model_path, device="cpu",
                     probabilities=tmp_path / "p.nrrd", report=tmp_path / "report.json")
    assert len(calls) == 2 and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def training_manifest(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("train-data"), 3, shape=(3, 48, 64))


TRAIN_ARGS = ["--folds", "3", "--epochs", "5", "--device", "cpu", "--intensity", "hu1000", "--lr", "2e-3",
              "--batch-size", "2", "--seed", "5"]


def _train(manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _ildseg("train", "--manifest", manifest, "--out", out, *TRAIN_ARGS, *extra, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted_run(training_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    r = _train(training_manifest, out, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_training_killed_then_resumed_ends_with_the_same_weights(training_manifest, uninterrupted_run, tmp_path,
                                                                 sig):
    """Stopped during epoch 3 of 5 and resumed, the run ends with the weights (of the
    final model and of the last checkpoint) of an uninterrupted run. SIGKILL cannot be
    caught: the checkpoint survives because it is replaced by a rename, never rewritten."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ILDSegmentationLib", "train", "--manifest", str(training_manifest),
                             "--out", str(out), *TRAIN_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    for line in proc.stdout:  # progress lines are flushed once per epoch
        if line.startswith("epoch 2:"):
            proc.send_signal(sig)
            break
    else:
        proc.wait()
        pytest.fail(f"training ended before epoch 2 was reported: {proc.stderr.read()[-2000:]}")
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert "Traceback" not in stderr
        lines = _error_lines(stderr)
        assert len(lines) == 1 and "--resume" in lines[0], stderr[-2000:]
        assert [p for p in _leftovers(out) if ".part" in p] == [], "SIGTERM leaves no temporary file"
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the interrupted run must not look finished"
    checkpoint_meta = json.loads(_safetensors_metadata(out / "checkpoint.safetensors")["ildseg_checkpoint"])
    assert 1 <= checkpoint_meta["epoch"] <= 3, "killed during epoch 3: at most that epoch is lost"

    if sig == signal.SIGKILL:
        # What a kill in the middle of a checkpoint write leaves: resuming clears it.
        (out / ".checkpoint.safetensors.x1y2z3.part.safetensors").write_bytes(b"half a checkpoint")
    r = _train(training_manifest, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert [p for p in _leftovers(out) if ".part" in p] == [], "resuming leaves no temporary file"
    for name in ("model.safetensors", "checkpoint.safetensors"):
        expected, got = _tensors(uninterrupted_run / name), _tensors(out / name)
        assert expected.keys() == got.keys()
        for k in expected:
            assert torch.equal(expected[k], got[k]), f"{name}: {k} differs from the uninterrupted run"


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# =========================================================================================
# Resources: full or unwritable output locations
# =========================================================================================

def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a test tmpfs (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")


def _unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> None:
    """Fill a file system completely with one file (unbuffered, to the last byte)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (b"\0" * 4096, b"\0"):
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass


@pytest.mark.parametrize("output", ["labels.nrrd", "labels.nii.gz", "labels.mha", "labels.seg.nrrd"])
def test_full_file_system_one_line_error_nothing_partial(small_case, model_path, tmp_path, output):
    """A 64 kB tmpfs, filled up: the label map cannot be written."""
    ct, mask, _ = small_case
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=64k")
    try:
        _fill(mnt)
        r = _ildseg("segment", ct, "--lung-mask", mask, "--model", model_path, "--device", "cpu", "-o", mnt / output,
                    "--report", mnt / "report.json", "--quiet")
        _assert_one_line_error(r, 2, contains="no space left")
        assert _leftovers(mnt) == ["filler"]
    finally:
        _unmount(mnt)


def test_disk_full_after_first_output_removes_it(small_case, model_path, tmp_path):
    """A 64 kB tmpfs, empty: the label map fits, the probabilities do not; the label
    map already written is removed, so no partial set of outputs looks complete."""
    ct, mask, _ = small_case
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=64k")
    try:
        r = _ildseg("segment", ct, "--lung-mask", mask, "--model", model_path, "--device", "cpu", "-o",
                    mnt / "labels.nrrd", "--probabilities", mnt / "p.nrrd", "--report", mnt / "r.json", "--quiet")
        _assert_one_line_error(r, 2, contains="p.nrrd: no space left")
        assert _leftovers(mnt) == []
    finally:
        _unmount(mnt)


def test_file_size_limit_one_line_error_nothing_partial(small_case, model_path, tmp_path):
    """Without root: RLIMIT_FSIZE makes every write past 4 kB fail (EFBIG), as a quota would."""
    ct, mask, _ = small_case
    out = tmp_path / "out"
    out.mkdir()

    def limit_file_size():  # runs in the child before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = _ildseg("segment", ct, "--lung-mask", mask, "--model", model_path, "--device", "cpu", "-o",
                out / "labels.nrrd", "--probabilities", out / "p.nrrd", "--report", out / "r.json", "--quiet",
                preexec_fn=limit_file_size)
    _assert_one_line_error(r, 2, contains="cannot write")
    assert _leftovers(out) == []


def _unwritable(kind: str, tmp_path: Path) -> Tuple[Path, Optional[Path]]:
    """An output path that cannot be written, and a mount point to undo (or None)."""
    if kind == "under_a_file":
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        return tmp_path / "notes.txt" / "labels.nrrd", None
    if kind == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        return Path("/proc/labels.nrrd"), None
    if kind == "read_only_mount":
        mnt = tmp_path / "ro"
        _mount_tmpfs(mnt, "ro,size=64k")
        return mnt / "labels.nrrd", mnt
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["under_a_file", "proc", "read_only_mount"])
def test_unwritable_output_refused_before_any_work(small_case, model_path, tmp_path, monkeypatch, kind):
    ct, mask, _ = small_case
    out, mnt = _unwritable(kind, tmp_path)
    try:
        # In-process first, to prove the refusal comes before the network runs.
        def must_not_run(*a, **k):
            raise AssertionError("the engine ran although the output cannot be written")
        monkeypatch.setattr(Inferer, "segment", must_not_run)
        with pytest.raises(InputError, match="not writable|not a folder"):
            segment_file(ct, out, lung_mask=mask, model=model_path, device="cpu")
        monkeypatch.undo()
        r = _ildseg("segment", ct, "--lung-mask", mask, "--model", model_path, "--device", "cpu", "-o", out, "--quiet")
        _assert_one_line_error(r, 2, contains=str(out.parent))
        assert not out.exists()
    finally:
        if mnt is not None:
            _unmount(mnt)


def test_output_folder_without_permission_refused_before_any_work(small_case, model_path, monkeypatch):
    """A folder the user may not write. Root ignores permission bits, so there (CI) the
    checks run as an ordinary user (uid 65534), on copies of the inputs that user can read."""
    with public_folder() as folder:
        inputs = folder / "in"
        inputs.mkdir()
        ct, mask, model = (Path(shutil.copy(p, inputs)) for p in (small_case[0], small_case[1], model_path))
        for p in (ct, mask, model):
            p.chmod(0o644)
        locked = folder / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "labels.nrrd"

        def refused_in_process():
            assert not os.access(locked, os.W_OK), "the check must run as a user who cannot write here"

            def must_not_run(*a, **k):
                raise AssertionError("the engine ran although the output cannot be written")
            monkeypatch.setattr(Inferer, "segment", must_not_run)
            with pytest.raises(InputError, match="not writable"):
                segment_file(ct, out, lung_mask=mask, model=model, device="cpu")
        run_unprivileged(refused_in_process)
        monkeypatch.undo()
        cmd = [sys.executable, "-m", "ILDSegmentationLib", "segment", ct, "--lung-mask", mask, "--model", model,
               "--device", "cpu", "-o", out, "--quiet"]
        r = subprocess.run(unprivileged_command(cmd), capture_output=True, text=True, timeout=300, env=ENV,
                           cwd=folder)
        _assert_one_line_error(r, 2, contains=f"not writable: {locked}")
        assert list(locked.iterdir()) == []
        locked.chmod(0o755)


# =========================================================================================
# Resources: memory
# =========================================================================================

def _network_calls(model, run) -> List[Tuple[int, int, int, int]]:
    """Shapes of the network's inputs during ``run()``, by a forward hook."""
    calls: List[Tuple[int, int, int, int]] = []
    hook = model.network.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    try:
        run()
    finally:
        hook.remove()
    return calls


def test_max_memory_bounds_every_batch(tmp_path):
    model = random_model(tmp_path)
    hu, mask = two_lungs(3, 48, 64)
    hu, mask = np.repeat(hu[2:3], 6, axis=0), np.repeat(mask[2:3], 6, axis=0)  # 12 crops of two shapes
    geo = Geometry((0.8, 0.8, 2.5))
    bytes_per_pixel = Inferer(model, device="cpu").bytes_per_pixel
    one_crop_mb = 48 * 64 * bytes_per_pixel / 2**20  # above any crop of this image
    seen = {}
    for budget in (0.001, 3.5 * one_crop_mb, 1024.0):
        inferer = Inferer(model, device="cpu", max_memory_mb=budget)
        result = {}
        calls = _network_calls(model, lambda: result.update(r=inferer.segment(hu, mask, geo)))
        for n, _, h, w in calls:
            assert n == 1 or n * h * w * bytes_per_pixel <= budget * 2**20, (budget, n, h, w)
        assert sum(c[0] for c in calls) == result["r"].crops == 12
        seen[budget] = len(calls)
    assert seen[0.001] == 12, "a budget below one crop runs crops one at a time"
    assert seen[1024.0] == 2, "a large budget batches all crops of one shape"
    assert 2 < seen[3.5 * one_crop_mb] < 12


def test_max_memory_option_reaches_the_engine(small_case, model_path, tmp_path, monkeypatch):
    ct, mask, _ = small_case
    batches: List[int] = []
    real_predict = Inferer._predict

    def counting(self, crops):
        batches.append(len(crops))
        return real_predict(self, crops)

    monkeypatch.setattr(Inferer, "_predict", counting)
    hu = np.repeat(sitk.GetArrayFromImage(sitk.ReadImage(str(ct)))[2:3], 6, axis=0)
    m = np.repeat(sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))[2:3], 6, axis=0)
    same = _write(tmp_path / "ct.nrrd", hu), _write(tmp_path / "mask.nrrd", m)
    for budget, expect_max in (("0.001", 1), ("1024", 6)):
        batches.clear()
        assert cli.main(["segment", str(same[0]), "--lung-mask", str(same[1]), "--model", str(model_path),
                         "--device", "cpu", "-o", str(tmp_path / "l.nrrd"), "--quiet", "--max-memory", budget]) == 0
        assert max(batches) == expect_max and sum(batches) == 12, (budget, batches)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from synthetic import random_model
    from pathlib import Path
    from ILDSegmentationLib.imaging.geometry import Geometry
    from ILDSegmentationLib.engine.inference import Inferer

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    slices, lung_slices, budget, size = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    model = random_model(Path(sys.argv[2]))
    inferer = Inferer(model, device="cpu", max_memory_mb=budget, fast_cpu=sys.argv[7] == "1")
    # Warm up torch's allocator and kernels on a small case, so the peak below is the engine's.
    warm = np.full((1, 128, 128), -800, np.int16)
    wmask = np.zeros(warm.shape, np.uint8)
    wmask[:, 40:90, 20:60] = 1
    wmask[:, 40:90, 70:110] = 1
    inferer.segment(warm, wmask, Geometry((0.7, 0.7, 1.0)))
    hu = np.full((slices, 512, 512), -1000, np.int16)   # the CT, as read from a file
    mask = np.zeros(hu.shape, np.uint8)                 # the lung mask
    first = (slices - lung_slices) // 2
    for z in range(first, first + lung_slices):  # two square lungs of size x size pixels
        hu[z, 150:360, 60:450] = 40
        for c0 in (80, 270):
            hu[z, 170:170 + size, c0:c0 + size] = -850
            mask[z, 170:170 + size, c0:c0 + size] = 1
    before = peak_kb()
    t = time.perf_counter()
    result = inferer.segment(hu, mask, Geometry((0.7, 0.7, 1.0)))
    print(json.dumps({"before_kb": before, "after_kb": peak_kb(), "seconds": time.perf_counter() - t,
                      "crops": result.crops, "voxels": int(hu.size)}))
""")


def _memory_probe(tmp_path: Path, slices: int, lung_slices: int, budget_mb: float, size: int,
                  fast_cpu: bool = True) -> Dict[str, float]:
    """Peak memory (VmHWM) of a fresh process before and after the engine runs on a
    512 x 512 CT of ``slices`` slices, ``lung_slices`` of them with two lungs."""
    tests = str(Path(__file__).resolve().parent)
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, tests, str(tmp_path), str(slices), str(lung_slices),
                        str(budget_mb), str(size), "1" if fast_cpu else "0"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_thousand_slice_ct_runs_in_bounded_memory(tmp_path):
    """1000 slices of 512 x 512 (a 512 MB int16 CT): besides the CT and the mask the
    engine holds the uint8 label map and two one-byte lung maps (3 bytes a voxel), and
    the network's working memory depends on the lung crops, not on the slice count."""
    probe = _memory_probe(tmp_path, slices=1000, lung_slices=3, budget_mb=256, size=160)
    grown_bytes = (probe["after_kb"] - probe["before_kb"]) * 1024
    assert probe["crops"] == 6
    # A float32 copy of the CT (4 bytes a voxel) or per-class probabilities (24) break this.
    assert grown_bytes <= 3.5 * probe["voxels"] + 256 * 2**20, probe


def test_memory_budget_bounds_the_network_memory(tmp_path):
    """Peak memory during the network stays within --max-memory: 24 lung crops of
    104 x 104 pixels (about 50 MB of float32 activations each) run three at a time
    within 160 MB, and all at once within 2 GB (about 1.3 GB)."""
    # The eager path, which batches crops of one shape up to the budget. (The fast
    # CPU path runs one crop at a time in a reused workspace: checked below.)
    small = _memory_probe(tmp_path, slices=12, lung_slices=12, budget_mb=160, size=40, fast_cpu=False)
    large = _memory_probe(tmp_path, slices=12, lung_slices=12, budget_mb=2048, size=40, fast_cpu=False)
    assert small["crops"] == large["crops"] == 24
    arrays = 3 * small["voxels"]  # labels and the two lung maps, as above
    small_grown = (small["after_kb"] - small["before_kb"]) * 1024
    large_grown = (large["after_kb"] - large["before_kb"]) * 1024
    assert small_grown <= arrays + 160 * 2**20, small
    assert large_grown <= arrays + 2048 * 2**20, large
    assert large_grown > small_grown + 400 * 2**20, (small, large)  # the budget is what made the difference
    fast = _memory_probe(tmp_path, slices=12, lung_slices=12, budget_mb=2048, size=40)
    assert (fast["after_kb"] - fast["before_kb"]) * 1024 <= arrays + 160 * 2**20, fast


# =========================================================================================
# Corrupt and odd files
# =========================================================================================

@pytest.mark.parametrize("ext", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_truncated_image_files_one_line_error(small_case, model_path, tmp_path, ext):
    ct, _, _ = small_case
    whole = tmp_path / f"whole{ext}"
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(whole))
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    r = _ildseg("segment", cut, "--model", model_path, "--device", "cpu", "-o", tmp_path / "out.nrrd", "--quiet")
    _assert_one_line_error(r, 2, contains=f"cannot read image cut{ext}")
    assert not (tmp_path / "out.nrrd").exists()


def _dicom_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the shared data is read-only
    return dst


@pytest.mark.parametrize("keep", ["half", "header", "ten_bytes"])
def test_truncated_dicom_file_is_refused_by_name(dicom_dir, model_path, tmp_path, keep):
    """GDCM silently drops a truncated file from its series; read without it, every
    slice after the gap would be misplaced. So it is refused, naming the file."""
    folder = _dicom_copy(dicom_dir, tmp_path / "series")
    victim = sorted(folder.iterdir())[14]
    data = victim.read_bytes()
    victim.write_bytes(data[: {"half": len(data) // 2, "header": 600, "ten_bytes": 10}[keep]])
    with pytest.raises(InputError, match=f"DICOM file {victim.name} .* cannot be read"):
        read_ct(folder)
    r = _ildseg("segment", folder, "--model", model_path, "--device", "cpu", "-o", tmp_path / "o.nrrd", "--quiet")
    _assert_one_line_error(r, 2, contains=victim.name)


def test_missing_dicom_slice_warns_uneven_spacing(dicom_dir, tmp_path, caplog):
    folder = _dicom_copy(dicom_dir, tmp_path / "series")
    sorted(folder.iterdir())[14].unlink()  # a slice removed on purpose: readable, with a warning
    with caplog.at_level(logging.WARNING, logger="ILDSegmentationLib"):
        ct = read_ct(folder)
    assert ct.array.shape[0] == 29
    assert "unevenly spaced (8 to 16 mm" in caplog.text
    assert "unevenly spaced" in ct.description, "the report's input note says so too"


def test_duplicate_dicom_slice_is_refused_by_name(dicom_dir, tmp_path):
    import shutil
    folder = _dicom_copy(dicom_dir, tmp_path / "series")
    original = sorted(folder.iterdir())[14]
    shutil.copy(original, folder / "copy_of_slice.dcm")  # the same slice twice, as a copying slip does
    with pytest.raises(InputError, match="same position"):
        read_ct(folder)


def _write_second_series(src_files: Sequence[Path], folder: Path, series_uid: str) -> None:
    """Copies of some slices under another SeriesInstanceUID (a second series)."""
    for n, f in enumerate(src_files):
        image = sitk.ReadImage(str(f))
        image.SetMetaData("0020|000e", series_uid)
        image.SetMetaData("0008|0018", f"{series_uid}.{n + 1}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"second-{n:02d}.dcm"))
        writer.Execute(image)


def test_two_series_in_a_folder_reads_the_largest_and_says_so(dicom_dir, model_path, tmp_path, caplog):
    folder = _dicom_copy(dicom_dir, tmp_path / "series")
    original_uid = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(dicom_dir))[0]
    _write_second_series(sorted(dicom_dir.iterdir())[:10], folder, "1.2.826.0.1.3680043.8.498.4242")
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 2
    with caplog.at_level(logging.WARNING, logger="ILDSegmentationLib"):
        ct = read_ct(folder)
    assert ct.array.shape == (30, 512, 512)
    note = f"folder holds 2 DICOM series; using the largest (30 files, series {original_uid})"
    assert note in caplog.text and ct.description == note
    # A lung mask from a file keeps the test fast; the note reaches the user and the report.
    mask = np.zeros(ct.array.shape, np.uint8)
    mask[14, 200:300, 100:200] = 1
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(ct.image)
    sitk.WriteImage(mask_image, str(tmp_path / "mask.nrrd"))
    r = _ildseg("segment", folder, "--lung-mask", tmp_path / "mask.nrrd", "--model", model_path, "--device", "cpu",
                "-o", tmp_path / "labels.nrrd", "--report", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    assert note in r.stderr
    assert json.loads((tmp_path / "report.json").read_text())["input"]["note"] == note


def test_unsigned_storage_with_rescale_reads_as_hu_real_series(dicom_dir):
    """The real series stores unsigned 16-bit values with RescaleIntercept -1024."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sorted(dicom_dir.iterdir())[0]))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0028|0103").strip() == "0", "pixel representation: unsigned"
    assert float(reader.GetMetaData("0028|1052")) == -1024
    ct = read_ct(dicom_dir)
    assert np.asarray(ct.array).min() <= -1000 < 0, "values are HU: the rescale was applied"


def _unsigned_dicom_with_rescale(hu: np.ndarray, folder: Path) -> None:
    """A DICOM series storing HU + 1024 as unsigned 16-bit with RescaleIntercept -1024.
    SimpleITK recomputes the stored values from the intercept it is given, so it
    writes intercept 0 and the tag is edited in the bytes (implicit VR little endian)."""
    folder.mkdir()
    for k in range(hu.shape[0]):
        image = sitk.GetImageFromArray((hu[k:k + 1].astype(np.int32) + 1024).astype(np.uint16))
        image.SetSpacing((0.7, 0.7, 2.0))
        image.SetOrigin((0.0, 0.0, 2.0 * k))
        for tag, value in (("0028|1052", "0"), ("0028|1053", "1"), ("0020|000e", "1.2.826.0.1.3680043.8.498.77"),
                           ("0008|0060", "CT"), ("0020|0013", str(k + 1))):
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(image)
        path = folder / f"{k:03d}.dcm"
        data = path.read_bytes()
        intercept_zero = b"\x28\x00\x52\x10\x02\x00\x00\x000 "
        assert data.count(intercept_zero) == 1
        path.write_bytes(data.replace(intercept_zero, b"\x28\x00\x52\x10\x06\x00\x00\x00-1024 "))


def test_unsigned_storage_with_rescale_reads_as_hu_synthetic(tmp_path):
    hu = np.random.default_rng(0).integers(-1024, 2000, (3, 20, 30)).astype(np.int16)
    _unsigned_dicom_with_rescale(hu, tmp_path / "dicom")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "dicom" / "000.dcm"))
    reader.ReadImageInformation()
    assert reader.GetMetaData("0028|0103").strip() == "0" and float(reader.GetMetaData("0028|1052")) == -1024
    np.testing.assert_array_equal(read_ct(tmp_path / "dicom").array, hu)
    # NIfTI: unsigned storage with scl_inter = -1024 (header bytes 112..119: scl_slope, scl_inter).
    nii = tmp_path / "u16.nii"
    image = sitk.GetImageFromArray((hu.astype(np.int32) + 1024).astype(np.uint16))
    sitk.WriteImage(image, str(nii))
    header = bytearray(nii.read_bytes())
    struct.pack_into("<ff", header, 112, 1.0, -1024.0)
    nii.write_bytes(bytes(header))
    np.testing.assert_array_equal(read_ct(nii).array, hu)


def test_out_of_field_padding_disturbs_neither_mask_nor_labels(ricord_path):
    """ricord-000082 holds -3024 outside the scanner's field of view, inside the crops
    of many lung slices. The lung mask leaves it out, no label lands on it, and the
    labels are those of the same CT with the padding set to air (-1024 HU)."""
    from ILDSegmentationLib.imaging.lungmask import compute_lung_mask
    from ILDSegmentationLib.engine.modelfile import load_model
    ct = read_ct(ricord_path)
    hu = np.asarray(ct.array)
    padding = hu == -3024
    assert padding.sum() > 100_000
    mask = compute_lung_mask(hu, ct.geometry)
    assert not (mask[padding]).any()
    as_air = np.where(padding, -1024, hu).astype(hu.dtype)
    np.testing.assert_array_equal(compute_lung_mask(as_air, ct.geometry), mask)
    # Two lung slices whose crops hold thousands of padding voxels (engine on those only).
    from ILDSegmentationLib.engine.cropping import crop_boxes
    from ILDSegmentationLib.imaging.lungsides import split_left_right
    view = canonical_view(ct.geometry)
    hu_c, sides = view.to_canonical(hu), split_left_right(view.to_canonical(mask))
    in_crops = sum(int((hu_c[z, b.r0:b.r1, b.c0:b.c1] == -3024).sum()) for z in (30, 45)
                   for b in crop_boxes(sides[z], z))
    assert in_crops > 1000, "the network must see padding for this test to mean anything"
    roi_c = np.zeros(hu_c.shape, np.uint8)
    roi_c[[30, 45]] = 1
    roi = view.from_canonical(roi_c)
    inferer = Inferer(load_model(), device="cpu")  # the bundled model: -3024 must clip like -1024
    labels = inferer.segment(hu, mask, ct.geometry, only_slices_of=roi).labels
    on = roi > 0
    assert (labels[padding] == 0).all() and labels[on].any()
    np.testing.assert_array_equal(labels[on] != 0, mask[on] != 0)
    np.testing.assert_array_equal(inferer.segment(as_air, mask, ct.geometry, only_slices_of=roi).labels, labels)


# =========================================================================================
# Reading and reporting
# =========================================================================================

def test_ct_array_outlives_the_volume_object(tmp_path):
    """``read_ct(path).array`` keeps its voxels when the Volume is gone: a bare
    SimpleITK array view would point into freed memory (seen as garbage voxels)."""
    import gc
    hu = np.random.default_rng(1).integers(-1024, 2000, (3, 20, 30)).astype(np.int16)
    _write(tmp_path / "ct.nrrd", hu)
    arrays = [read_ct(tmp_path / "ct.nrrd").array for _ in range(3)]
    gc.collect()
    clutter = [np.full(hu.shape, 7, np.int16) for _ in range(50)]  # reuse of freed memory, if any
    for a in arrays:
        np.testing.assert_array_equal(a, hu)
    assert len(clutter) == 50


def test_unexpected_failure_is_one_line_exit_1(small_case, model_path, tmp_path, monkeypatch, capsys):
    """A bug (not a user error) still prints one line, and --debug shows the traceback."""
    ct, mask, _ = small_case

    def broken(*args, **kwargs):
        raise RuntimeError("first line\nsecond line from a library\n  third")

    monkeypatch.setattr(Inferer, "segment", broken)
    args = ["segment", str(ct), "--lung-mask", str(mask), "--model", str(model_path), "--device", "cpu",
            "-o", str(tmp_path / "l.nrrd"), "--quiet"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ildseg: internal error: RuntimeError: first line second line from a library third "
                   "(rerun with --debug for details)"]
    with pytest.raises(RuntimeError, match="second line"):
        cli.main(args + ["--debug"])
    assert _leftovers(tmp_path) == []
