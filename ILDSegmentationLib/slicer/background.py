"""Running ``ildseg`` in a separate process, watched from Slicer's GUI thread.

Inference (and fine-tuning) in Slicer's own process froze the application: the
first run imported torch and loaded the model before any repaint, and Cancel was
seen only between slice batches. Here the work runs in a child process of the
same Python (``python -m ILDSegmentationLib segment ...``, as SlicerTotalSegmentator
runs its command), and the caller *polls*: a QTimer in the panel calls
:meth:`SegmentationJob.poll` a few times a second, which never blocks. A reader
thread moves the child's output lines into a queue and touches nothing else; the
MRML scene is read before the child starts and written after it ended, both on the
caller's (GUI) thread.

- Progress: the child prints ``ildseg-progress FRACTION MESSAGE`` lines
  (``ildseg segment --progress-lines``, :class:`~..commands.progress.ProgressLines`).
- Cancel: the child's whole process group is terminated (SIGTERM, so it removes
  its partial outputs), then killed after a grace period. Inside Slicer the Python
  executable is ``PythonSlicer``, a launcher that starts the real interpreter as
  *its* child: terminating the launcher alone would leave the interpreter running.
  That is why the child gets its own process group (session) here, rather than
  being started with ``slicer.util.launchConsoleProcess``, which cannot do that;
  the environment is the one that function uses (Slicer's startup environment).
- Failure: the child's one-line ``ildseg: error: ...`` message, or how it ended
  (exit code, or the signal that killed it).
- Nothing in the scene changes unless the child succeeded; then the results are
  loaded into the same output nodes as :func:`~.mrml.process` would write
  (:func:`~.mrml.commit_results`). The temporary folder is removed in every case.

This module imports without torch, SimpleITK or Slicer; the MRML parts need the
``slicer`` MRML classes (the application, or the slicer-core wheel).
"""
from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..commands.progress import parse_progress_line

#: How ``ildseg`` prints an error the user can act on, and a bug.
ERROR_PREFIXES = ("ildseg: error: ", "ildseg: internal error: ")

#: States of a child process / job.
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
FINISHED_STATES = (SUCCEEDED, FAILED, CANCELLED)

#: Seconds a cancelled child has to clean up after SIGTERM before it is killed.
KILL_AFTER_S = 5.0
#: Seconds to wait, after SIGKILL, for the processes to be gone.
KILL_WAIT_S = 3.0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ChildProcess:
    """One command in a separate process, polled without blocking.

    stdout and stderr are merged and read line by line by a reader thread into a
    queue; :meth:`poll` drains it. The child runs in its own process group (POSIX:
    a new session; Windows: a new process group) so that :meth:`cancel` reaches
    every process it started. ``env`` is the child's whole environment (default:
    this process's), ``env_updates`` are set on top of it.
    """

    def __init__(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
                 env_updates: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 what: str = "the background process", kill_after_s: float = KILL_AFTER_S,
                 keep_lines: int = 400) -> None:
        self.argv = [str(a) for a in argv]
        self.env = dict(os.environ if env is None else env)
        self.env.update(env_updates or {})
        self.cwd = cwd
        self.what = what
        #: Exit statuses that mean the command did its work (FinetuneJob adds 4).
        self.success_codes: Tuple[int, ...] = (0,)
        self.kill_after_s = kill_after_s
        self.state = RUNNING
        self.error: Optional[str] = None
        self.returncode: Optional[int] = None
        #: The last lines of output (for the log and for error messages).
        self.lines: Deque[str] = collections.deque(maxlen=keep_lines)
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._eof = False
        self._cancel_at: Optional[float] = None
        self._exited_at: Optional[float] = None
        self._killed = False

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "ChildProcess":
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            # No console window; a group of its own so that the whole tree can be ended.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._reader = threading.Thread(target=self._read, name="ildseg-output-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        # Only the queue is touched here: no MRML, no Qt.
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                self._queue.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(None)

    def poll(self) -> List[str]:
        """New output lines since the last call; updates :attr:`state`. Never blocks."""
        new: List[str] = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                continue
            new.append(line)
            self.lines.append(line)
        if self.state in FINISHED_STATES or self._proc is None:
            return new
        now = time.monotonic()
        returncode = self._proc.poll()
        if self._cancel_at is not None and now - self._cancel_at > self.kill_after_s and not self._killed:
            self._kill_group(force=True)
            self._killed = True
        if returncode is None:
            return new
        if self._exited_at is None:
            self._exited_at = now
        # A grandchild (the interpreter under a launcher) may still hold the pipe
        # open for a moment: wait for the end of the output, but not forever.
        if not self._eof and now - self._exited_at < 2.0:
            return new
        if self._cancel_at is not None:
            # Cancelled only once nothing of the group runs: SIGKILL is sent at
            # kill_after_s; a process in uninterruptible I/O dies a moment later.
            if self._group_alive() and now - self._cancel_at <= self.kill_after_s + KILL_WAIT_S:
                return new
        self.returncode = returncode
        self._finish(returncode)
        return new

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> str:
        """Poll until finished (for scripts and tests); returns the state."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if self.state in FINISHED_STATES:
                return self.state
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.what} did not finish within {timeout:.0f} s")
            time.sleep(interval)

    def cancel(self) -> None:
        """Ask the child (and everything it started) to stop: SIGTERM now, SIGKILL
        after ``kill_after_s`` (checked by :meth:`poll`)."""
        if self.state in FINISHED_STATES or self._proc is None or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        self.state = CANCELLING
        self._kill_group(force=False)

    def stop(self, grace_s: Optional[float] = None) -> str:
        """Cancel and wait until nothing of the child's group runs (blocking, at most
        ``grace_s`` (default ``kill_after_s``) for SIGTERM, then SIGKILL and up to
        KILL_WAIT_S more). For leaving for good (Slicer quits, the module is
        reloaded): no poll will follow, and what the child writes must be over before
        its outputs are removed. Returns the state."""
        if self._proc is None or self.state in FINISHED_STATES:
            return self.state
        self.cancel()
        grace = self.kill_after_s if grace_s is None else grace_s

        def running() -> bool:
            return self._proc.poll() is None or self._group_alive()

        deadline = time.monotonic() + grace
        while running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if running():
            self._kill_group(force=True)
            self._killed = True
            deadline = time.monotonic() + KILL_WAIT_S
            while running() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._eof = True  # the pipe's end is not waited for: nobody reads on
        self._exited_at = self._exited_at or time.monotonic()
        self.poll()
        return self.state

    def _group_alive(self) -> bool:
        if os.name == "nt" or self._proc is None:
            return False
        return group_alive(self._proc.pid)

    def _kill_group(self, force: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if os.name == "nt":
            # taskkill /T ends the whole tree (the launcher and the interpreter);
            # Windows has no SIGTERM a console program can catch from here.
            subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            if proc.poll() is None:
                proc.kill()
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self, returncode: int) -> None:
        if self._cancel_at is not None:
            self.state = CANCELLED
            return
        if returncode in self.success_codes:
            self.state = SUCCEEDED
            return
        self.state = FAILED
        self.error = self.describe_failure(returncode)

    def describe_failure(self, returncode: int) -> str:
        """One line: the child's own error message when it printed one, else how it
        ended (a signal, an exit code) and its last line of output."""
        for line in reversed(self.lines):
            for prefix in ERROR_PREFIXES:
                if line.startswith(prefix):
                    return " ".join(line[len(prefix):].split())
        # POSIX: -N is "killed by signal N"; a launcher reports 128 + N instead.
        number = -returncode if returncode < 0 else returncode - 128 if returncode in (128 + 9, 128 + 15) else 0
        if number:
            name = _signal_name(number)
            cause = " (the system may have run out of memory)" if number == 9 else ""
            return f"{self.what} was stopped by {name}{cause}"
        last = next((line for line in reversed(self.lines) if line.strip() and parse_progress_line(line) is None), "")
        detail = f": {' '.join(last.split())[:300]}" if last else ""
        return f"{self.what} ended with exit code {returncode}{detail}"


def group_alive(pgid: int) -> bool:
    """Whether a process of the process group ``pgid`` still runs (POSIX). A zombie
    does not count: an interpreter orphaned by its launcher is reaped by init, which
    in a container may never happen, and it runs no code anyway. Linux is asked
    through /proc (zombies are visible there); elsewhere signal 0 is sent."""
    proc = Path("/proc")
    if proc.is_dir() and (proc / "self" / "stat").is_file():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            # After the command name: state, ppid, pgrp.
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def library_folder() -> str:
    """The folder holding the ILDSegmentationLib package (put on the child's path)."""
    return str(Path(__file__).resolve().parents[2])


def child_environment(base: Optional[Dict[str, str]] = None, folder: Optional[str] = None) -> Dict[str, str]:
    """What the child needs on top of ``base``: this package importable (its folder
    first on PYTHONPATH) and unbuffered UTF-8 output. (The ildseg command sets its
    own process defaults, e.g. OMP_WAIT_POLICY.)"""
    base = dict(os.environ if base is None else base)
    folder = folder or library_folder()
    path = base.get("PYTHONPATH", "")
    updates = {"PYTHONPATH": folder + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1",
               "PYTHONIOENCODING": "utf-8"}
    return updates


class BackgroundJob:
    """Common part of the jobs below: a temporary folder, one :class:`ChildProcess`,
    progress (fraction 0..1, message) and elapsed time, and clean-up."""

    what = "the background process"
    success_codes: Tuple[int, ...] = (0,)

    def __init__(self, *, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 temp_root: Optional[str] = None, library: Optional[str] = None) -> None:
        self.python = python or sys.executable
        self.base_env = env
        self.temp_root = temp_root
        self.library = library or library_folder()
        self.folder: Optional[Path] = None
        self.child: Optional[ChildProcess] = None
        self.fraction = 0.0
        self.message = "Starting"
        self.started_at: Optional[float] = None
        #: The lines the child printed since the previous poll (for a log).
        self.new_lines: List[str] = []

    @property
    def state(self) -> str:
        return self.child.state if self.child is not None else RUNNING

    @property
    def error(self) -> Optional[str]:
        return self.child.error if self.child is not None else None

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def _make_folder(self) -> Path:
        self.folder = Path(tempfile.mkdtemp(prefix="ildseg-", dir=self.temp_root))
        return self.folder

    @staticmethod
    def _check_model(path: Optional[str]) -> None:
        """A model file given must exist (one-line InputError, before anything starts)."""
        from ..errors import InputError
        if path is not None and not os.path.isfile(path):
            raise InputError(f"the model file does not exist: {path}")

    def _start_child(self, write_inputs: Callable[[Path], List[str]], model: Optional[str], message: str) -> None:
        """Make the temporary folder, let ``write_inputs`` write the child's inputs
        into it and return its ``ildseg`` arguments, add the model, and start it;
        the folder is removed again when any of it fails."""
        folder = self._make_folder()
        try:
            args = write_inputs(folder)
            if model is not None:
                args += ["--model", os.path.abspath(model)]
            self.message = message
            self._launch(args)
        except BaseException:
            self.cleanup()
            raise

    def _require_success(self) -> Path:
        """The temporary folder of a run that SUCCEEDED; ILDSegError otherwise."""
        from ..errors import ILDSegError
        if self.state != SUCCEEDED or self.folder is None:
            raise ILDSegError(f"{self.what} has not succeeded ({self.state}); nothing to load")
        return self.folder

    def _launch(self, args: Sequence[str]) -> None:
        argv = [self.python, "-m", "ILDSegmentationLib", *args]
        child = ChildProcess(argv, env=self.base_env, env_updates=child_environment(self.base_env, self.library),
                             cwd=str(self.folder), what=self.what)
        child.success_codes = self.success_codes
        self.child = child.start()
        self.started_at = time.monotonic()

    def handle_line(self, line: str) -> None:
        """One line of the child's output (override for more than progress)."""
        parsed = parse_progress_line(line)
        if parsed is not None:
            self.fraction, self.message = parsed

    def poll(self) -> str:
        """Read what the child printed, update progress; returns the state. When the
        child failed or was cancelled, the temporary folder is removed at once."""
        if self.child is None:
            return RUNNING
        self.new_lines = self.child.poll()
        for line in self.new_lines:
            self.handle_line(line)
        if self.child.state in (FAILED, CANCELLED):
            self.cleanup()
        return self.child.state

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> str:
        deadline = time.monotonic() + timeout
        while self.poll() not in FINISHED_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.what} did not finish within {timeout:.0f} s")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        if self.child is not None:
            self.child.cancel()

    def cleanup(self) -> None:
        """Remove the temporary folder; a child still running is stopped first
        (:meth:`ChildProcess.stop`), so that nothing writes into it afterwards."""
        if self.child is not None and self.child.state not in FINISHED_STATES:
            self.child.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class SegmentationJob(BackgroundJob):
    """:func:`~.mrml.process` with the work in a separate process.

    :meth:`start` checks the nodes and writes the CT (voxels as stored, HU, with its
    geometry in world space) and the lung mask (resampled onto the CT's grid, as the
    in-process run does) into a temporary folder, then starts ``ildseg segment``
    on them. :meth:`poll` follows it; :meth:`finish`, after SUCCEEDED, reads the
    labels back and writes them into the scene (:func:`~.mrml.commit_results`).
    Until then the scene is only read. Parameters are those of :func:`~.mrml.process`;
    ``model`` is a model file path (None: the bundled model).
    """

    what = "the segmentation process"

    def __init__(self, scene: Any, ct_node: Any, lung_mask_node: Any = None, output_segmentation_node: Any = None,
                 *, segment_ids: Optional[Sequence[str]] = None, model: Optional[str] = None, device: str = "auto",
                 probabilities: bool = False, pixel_spacing: str = "model", max_memory_mb: float = 1024.0,
                 crop_box: str = "mask", decision: str = "auto", python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None,
                 temp_root: Optional[str] = None, library: Optional[str] = None) -> None:
        super().__init__(python=python, env=env, temp_root=temp_root, library=library)
        self.scene = scene
        self.ct_node = ct_node
        self.lung_mask_node = lung_mask_node
        self.output_segmentation_node = output_segmentation_node
        self.segment_ids = None if segment_ids is None else [str(s) for s in segment_ids]
        self.model = None if model in (None, "") else str(model)
        self.device = device
        self.probabilities = probabilities
        self.pixel_spacing = pixel_spacing
        self.decision = decision
        self.max_memory_mb = max_memory_mb
        self.crop_box = crop_box
        self._geometry = None
        self._lung_mask_source = ""

    def start(self) -> "SegmentationJob":
        """Check the inputs (one-line InputError / LungMaskError, nothing started),
        write them to a temporary folder and start the child. Reads the scene only."""
        from . import mrml, nodes
        from ..errors import InputError
        from ..imaging.images import write_array

        mrml.check_process_nodes(self.scene, self.ct_node, self.lung_mask_node, self.output_segmentation_node)
        self._check_model(self.model)
        from ..engine.cropping import CROP_BOX_CHOICES

        if self.crop_box not in CROP_BOX_CHOICES:
            raise InputError(f"the crop box must be one of {', '.join(CROP_BOX_CHOICES)}, not {self.crop_box!r}")
        hu, geometry = nodes.volume_array_and_geometry(self.ct_node)
        mask = None
        if self.lung_mask_node is not None:
            mask = nodes.lung_mask_from_node(self.lung_mask_node, self.ct_node, self.segment_ids)
        self._geometry = geometry
        self._lung_mask_source = mrml.lung_mask_description(self.lung_mask_node, self.segment_ids)

        def write_inputs(folder: Path) -> List[str]:
            # Uncompressed (speed over size): the files live only as long as the run.
            write_array(hu, geometry, folder / "ct.nrrd", compress=False)
            if mask is not None:
                write_array(mask, geometry, folder / "lung_mask.nrrd", compress=False)
            args = ["segment", str(folder / "ct.nrrd"), "-o", str(folder / "labels.nrrd"),
                    "--report", str(folder / "report.json"), "--progress-lines",
                    "--lung-mask", str(folder / "lung_mask.nrrd") if mask is not None else "auto",
                    "--device", self.device, "--pixel-spacing", self.pixel_spacing, "--decision", self.decision,
                    "--max-memory", f"{self.max_memory_mb:g}", "--crop-box", self.crop_box]
            if self.probabilities:
                args += ["--probabilities", str(folder / "probabilities.nrrd")]
            return args

        self._start_child(write_inputs, self.model, "Starting PyTorch and loading the model")
        return self

    def finish(self) -> Any:
        """After SUCCEEDED: load the labels (and probabilities) into the output nodes;
        returns :class:`~.mrml.ProcessResult`. The temporary folder is removed."""
        from . import mrml
        from ..analysis.case import CaseResult

        folder = self._require_success()
        try:
            import SimpleITK as sitk

            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nrrd")))
            probabilities = None
            if self.probabilities:
                probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "probabilities.nrrd")))
            report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
            # The run's results as the command computed them (its report), counted on its labels.
            case = CaseResult.from_report(report, labels, self._geometry, probabilities)
            return mrml.commit_results(self.scene, self.ct_node, self.output_segmentation_node, case,
                                       self._lung_mask_source, t_start=time.perf_counter() - self.elapsed_s)
        finally:
            self.cleanup()


class FinetuneJob(BackgroundJob):
    """``ildseg finetune`` in a separate process, for the panel's "Fine-tune".

    Starts from ``start_model`` (None: the bundled model) on the training folder's
    ``manifest``, writing into ``run_folder`` (which must not exist yet: a new folder
    in the user's model folder, see :func:`~.trainingset.new_run_folder`). Progress
    comes from the command's own lines: ``finetune: E epochs at most`` and, per epoch,
    ``epoch N: loss ..., validation BACC ...``; the remaining time is estimated from
    the epochs' durations (an upper bound: early stopping may end the run sooner).
    On failure or cancel the run folder is removed, so no partial model ever shows up
    among the user's models. :meth:`finish` returns the run's ``finetune.json``
    (``before`` / ``after``: balanced and per-class accuracy on the held-out
    annotations) with ``model`` the new model file, or, when the fine-tuned model
    did not beat the start model (exit status 4, ``kept_start_model`` true), with
    ``model`` None: the start model stays the one to use.
    """

    what = "the fine-tuning process"
    success_codes = (0, 4)  # 4: finished, the start model was kept (training/finetune.py)

    def __init__(self, manifest: str, run_folder: str, *, start_model: Optional[str] = None, epochs: int = 40,
                 val_fraction: float = 0.25, device: str = "auto", time_limit_s: Optional[float] = None,
                 extra_args: Sequence[str] = (), python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 temp_root: Optional[str] = None, library: Optional[str] = None) -> None:
        super().__init__(python=python, env=env, temp_root=temp_root, library=library)
        self.manifest = str(manifest)
        self.run_folder = Path(run_folder)
        self.start_model = None if start_model in (None, "") else str(start_model)
        self.epochs = int(epochs)
        self.val_fraction = float(val_fraction)
        self.device = device
        self.time_limit_s = time_limit_s
        self.extra_args = [str(a) for a in extra_args]
        #: From the command's output: at most this many epochs; (epoch, BACC) so far.
        self.max_epochs: Optional[int] = None
        self.epoch_results: List[Tuple[int, float]] = []
        self._epoch_ends: List[float] = []
        self._epochs_started_at: Optional[float] = None

    def start(self) -> "FinetuneJob":
        """Check the paths (one-line InputError) and start the child."""
        from ..errors import InputError

        if not os.path.isfile(self.manifest):
            raise InputError(f"the training set has no manifest yet ({self.manifest}): add an annotated case first")
        if self.run_folder.exists():
            raise InputError(f"the run folder exists already: {self.run_folder}")
        self._check_model(self.start_model)
        self._make_folder()
        args = ["finetune", "--manifest", os.path.abspath(self.manifest), "--out", os.path.abspath(self.run_folder),
                "--epochs", str(self.epochs), "--val-fraction", f"{self.val_fraction:g}", "--device", self.device]
        if self.start_model is not None:
            args += ["--model", os.path.abspath(self.start_model)]
        if self.time_limit_s is not None:
            args += ["--time-limit", f"{self.time_limit_s:g}"]
        self.message = "Starting PyTorch and reading the training set"
        try:
            self._launch(args + self.extra_args)
        except BaseException:
            self.cleanup()
            raise
        return self

    _FIRST = re.compile(r"^finetune: (\d+) epochs at most")
    _EPOCH = re.compile(r"^epoch (\d+): loss [^,]+, validation BACC ([0-9.]+|nan)")

    def handle_line(self, line: str) -> None:
        first = self._FIRST.match(line)
        if first:
            self.max_epochs = int(first.group(1))
            self.message = "Reading the annotated cases"
            return
        epoch = self._EPOCH.match(line)
        now = time.monotonic()
        if epoch:
            n, bacc = int(epoch.group(1)), float(epoch.group(2))
            self.epoch_results.append((n, bacc))
            self._epoch_ends.append(now)
            total = self.max_epochs or self.epochs
            self.fraction = min(1.0, n / max(total, 1))
            self.message = f"Epoch {n} of at most {total}: held-out balanced accuracy {bacc:.3f}"
            return
        if line.startswith("before: "):
            self._epochs_started_at = now  # the epochs start after the "before" measure
        if line.strip() and parse_progress_line(line) is None and not self.epoch_results:
            self.message = " ".join(line.split())[:120]

    @property
    def remaining_s(self) -> Optional[float]:
        """At most about this many seconds left: the mean of the last epochs' durations
        times the epochs that may still run; None before the first epoch ended."""
        if not self._epoch_ends:
            return None
        starts = ([self._epochs_started_at] if self._epochs_started_at is not None else []) + self._epoch_ends
        durations = [b - a for a, b in zip(starts, starts[1:])] or [self._epoch_ends[0] - (self.started_at or 0.0)]
        recent = durations[-3:]
        left = (self.max_epochs or self.epochs) - self.epoch_results[-1][0]
        return max(0.0, sum(recent) / len(recent) * left)

    def poll(self) -> str:
        state = super().poll()
        if state in (FAILED, CANCELLED):
            shutil.rmtree(self.run_folder, ignore_errors=True)
        return state

    def cleanup(self) -> None:
        """Stop a run still going (Slicer quits, the module is reloaded, Cancel) and
        remove its temporary folder and, unless the run succeeded, its run folder:
        an unfinished run leaves nothing among the user's models. (The command removes
        its own outputs on SIGTERM too; this covers a child killed outright.)"""
        super().cleanup()
        if self.child is not None and self.state != SUCCEEDED:
            shutil.rmtree(self.run_folder, ignore_errors=True)

    def finish(self) -> Dict[str, Any]:
        """After SUCCEEDED: the run's finetune.json as a dict (``model``: the new model
        file). The temporary folder is removed; the run folder stays."""
        from ..errors import ILDSegError

        if self.state != SUCCEEDED:
            raise ILDSegError(f"{self.what} has not succeeded ({self.state})")
        try:
            report_path = self.run_folder / "finetune.json"
            model = self.run_folder / "model.safetensors"
            kept = self.child is not None and self.child.returncode == 4
            if not report_path.is_file() or not (kept or model.is_file()):
                raise ILDSegError(f"{self.what} ended without writing {model.name} and finetune.json "
                                  f"into {self.run_folder}")
            report = json.loads(report_path.read_text(encoding="utf-8"))
            report["kept_start_model"] = kept
            report["model"] = None if kept else str(model)
            return report
        finally:
            self.cleanup()


__all__ = ["ChildProcess", "BackgroundJob", "SegmentationJob", "FinetuneJob",
           "child_environment", "library_folder", "RUNNING", "CANCELLING", "SUCCEEDED",
           "FAILED", "CANCELLED", "FINISHED_STATES"]
