"""``ildseg segment ... --out-dir DIR --engine ray``: a batch spread over Ray workers.

The driver (the ``ildseg`` process) lists the cases, checks the arguments and the
model exactly as the serial batch does, then hands the cases one at a time to Ray
actors. Each actor loads the model once (the driver's model file, sent as bytes, so
every worker runs the very weights the driver checked) and runs every case it gets
through :func:`~ILDSegmentationLib.batch.process_case`, the function the serial
batch runs: the same per-case folders, the same skipping of complete cases, the same
one-line errors. Workers write into ``DIR/<case_id>/`` themselves, so on a
multi-node cluster DIR and the CTs must be on a file system every node sees (the
paths are used as given). The driver alone writes ``DIR/summary.csv`` (cases in the
order given, rewritten as cases finish), so a killed run resumes as the serial one.

Workers (:func:`plan_workers`): one per GPU when the cluster has GPUs (and ``--device``
allows them), else one per CPU node with as many cores as the smallest node has, or
``node CPUs // --cpus-per-worker`` per node; ``--workers N`` asks for N (sharing the
cluster's CPUs, or GPUs, evenly).
A worker process that dies (killed for memory, a crash) fails the case it held; Ray
restarts it and the batch goes on. Ray is imported only here, only when asked for.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .batch import (SUMMARY_NAME, BatchCase, BatchResult, CaseOutcome, OutputNames, _one_line, process_case,
                     write_summary)
from ..errors import ILDSegError, InputError

RAY_INSTALL = "pip install 'ildsegmentation[ray]'"
#: summary.csv is rewritten at most this often (seconds) while cases finish: with
#: thousands of cases a rewrite per case would cost more than the cases' I/O. The
#: last rewrite comes when the batch ends or is interrupted; resuming reads the
#: case folders, never the summary.
SUMMARY_INTERVAL_S = 1.0
#: A worker that died this many times in a row (each time failing its case) is let go.
MAX_DEATHS_IN_A_ROW = 3
#: How long a worker killed on a case may take to come back (Ray restarts its process,
#: which imports torch and loads the model again): seconds, not a count of retries,
#: since a restart on a busy machine is slow, not failed. Its check is asked again every
#: RECHECK_INTERVAL_S until then.
WORKER_RESTART_TIMEOUT_S = 300.0
RECHECK_INTERVAL_S = 2.0


def import_ray() -> Any:
    """The ray module, or a one-line error saying how to install it (exit 2)."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def add_engine_arguments(p: Any) -> None:
    """The options of ``ildseg segment`` that choose how a batch runs."""
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="batch: local = one case after another in this process; ray = cases spread over Ray "
                        f"workers, each loading the model once (needs {RAY_INSTALL}) (default: local)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --engine ray: number of workers (default: one per GPU of the cluster, else one per "
                        "CPU node, or node CPUs / --cpus-per-worker per node)")
    p.add_argument("--cpus-per-worker", type=int, metavar="C",
                   help="with --engine ray on CPUs: CPU cores (torch threads) of each worker (default: all the cores "
                        "of the smallest node, or the cluster's shared evenly among --workers)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="with --engine ray: the cluster to connect to (host:port, or 'auto' for the one started "
                        "with 'ray start' on this machine); default: $RAY_ADDRESS, else a new local cluster for "
                        "this batch")
    p.add_argument("--shard", metavar="I/N",
                   help="batch: run only shard I of N (1 <= I <= N; a case's shard comes from a hash of its id), "
                        "writing DIR/summary-shard-I-of-N.csv; 'ildseg merge-summaries DIR' joins the shards")


def check_engine_arguments(args: Any) -> None:
    """Options that only mean something with --engine ray are refused without it."""
    if getattr(args, "engine", "local") == "ray":
        if args.workers is not None and args.workers < 1:
            raise InputError(f"--workers {args.workers}: give 1 or more")
        if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
            raise InputError(f"--cpus-per-worker {args.cpus_per_worker}: give 1 or more")
        return
    given = [flag for flag, attr in (("--workers", "workers"), ("--cpus-per-worker", "cpus_per_worker"),
                                     ("--ray-address", "ray_address")) if getattr(args, attr, None) is not None]
    if given:
        raise InputError(f"{', '.join(given)}: with --engine ray only")


# ---------------------------------------------------------------- how many workers

@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """Workers to start and the Ray resources each one holds."""

    workers: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{self.workers} worker{'s' * (self.workers != 1)} ({each} each)"


def plan_workers(node_resources: Sequence[Dict[str, float]], *, workers: Optional[int] = None,
                 cpus_per_worker: Optional[int] = None, device: str = "auto") -> WorkerPlan:
    """How many workers, and what each holds, from the alive nodes' resources
    (``{"CPU": n, "GPU": m}`` per node, as Ray reports them).

    GPUs are used when the cluster has some and ``device`` is auto or cuda: one worker
    per GPU, or ``workers`` sharing them (a fraction of a GPU each when more workers
    than GPUs). Otherwise CPU workers: ``cpus_per_worker`` cores each (default: every
    core of the smallest node, so one worker per node), as many as the nodes hold; or
    ``workers`` sharing the cluster's cores evenly. A plan the cluster cannot hold
    (its workers would wait for resources forever) is refused."""
    cpus = [float(n.get("CPU", 0)) for n in node_resources if n.get("CPU", 0) > 0]
    total_cpus, total_gpus = sum(cpus), sum(float(n.get("GPU", 0)) for n in node_resources)
    if not cpus:
        raise InputError("the Ray cluster has no node with CPUs to run workers on")
    if total_gpus > 0 and device in ("auto", "cuda"):
        n = workers if workers is not None else int(total_gpus)
        gpu_each = min(1.0, _floor4(total_gpus / n))
        # The CPU's part of a case (reading, lung mask) runs in one thread unless asked otherwise.
        cpu_each = float(cpus_per_worker) if cpus_per_worker is not None else min(1.0, _floor4(total_cpus / n))
        return WorkerPlan(n, cpu_each, gpu_each)
    if device == "cuda":
        raise InputError("--device cuda: the Ray cluster has no GPU (ray status lists its resources)")
    if cpus_per_worker is not None:
        if cpus_per_worker > max(cpus):
            raise InputError(f"--cpus-per-worker {cpus_per_worker}: the largest node of the Ray cluster has "
                             f"{max(cpus):g} CPUs")
        fits = sum(int(c // cpus_per_worker) for c in cpus)
        n = workers if workers is not None else fits
        if n > fits:
            raise InputError(f"--workers {n} with --cpus-per-worker {cpus_per_worker}: the Ray cluster holds "
                             f"only {fits} such workers ({total_cpus:g} CPUs)")
        return WorkerPlan(n, float(cpus_per_worker), 0.0)
    if workers is None:
        return WorkerPlan(len(cpus), min(cpus), 0.0)  # one per node, each with all of the smallest node's cores
    each = float(int(total_cpus // workers)) if workers <= total_cpus else _floor4(total_cpus / workers)
    return WorkerPlan(workers, min(each, max(cpus)), 0.0)


def _floor4(x: float) -> float:
    """Ray counts resources to 1e-4: a share rounded down, so that N shares fit."""
    return int(x * 10000) / 10000


# ---------------------------------------------------------------- the worker

@dataclasses.dataclass(frozen=True)
class ModelShipment:
    """The driver's model file, as the workers get it: its bytes (through Ray's object
    store, a reference here), the path reports name and the sha256 it must have."""

    data: Any  # a Ray ObjectRef to the file's bytes
    path: str
    sha256: str


class CaseWorker:
    """A Ray actor: loads the model once (on its first call, and again only if Ray
    restarts the process), then runs the cases it is handed through
    :func:`~ILDSegmentationLib.batch.process_case`.

    The model comes with each call, as a reference to bytes already in the object
    store, not with the constructor: a restarted actor then needs nothing but its
    small settings to come back."""

    def __init__(self, names: OutputNames, overwrite: bool, segment_options: Dict[str, Any], threads: int) -> None:
        # Before torch's OpenMP starts: idle threads sleep (cli.set_process_defaults).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        torch.set_num_threads(max(1, threads))
        self.names, self.overwrite, self.segment_options = names, overwrite, segment_options
        self.model: Any = None

    def _load(self, shipment: ModelShipment) -> Any:
        if self.model is not None and self.model.sha256 == shipment.sha256:
            return self.model
        import ray

        from ..engine import modelfile
        from ..engine.inference import Inferer
        with tempfile.TemporaryDirectory(prefix="ildseg-worker-") as tmp:
            copy = Path(tmp) / Path(shipment.path).name
            copy.write_bytes(ray.get(shipment.data))
            model = modelfile.load_model(copy)
        if model.sha256 != shipment.sha256:
            raise ILDSegError(f"the model reached a worker damaged (sha256 {model.sha256[:12]}, "
                              f"sent {shipment.sha256[:12]})")
        # The device is checked here, where the cases run (the driver may have no GPU).
        options = self.segment_options
        Inferer(model, device=options.get("device", "auto"), max_memory_mb=options.get("max_memory_mb", 1024),
                pixel_spacing=options.get("pixel_spacing", "model"))
        # Reports name the driver's model file, as the serial batch's do.
        self.model = dataclasses.replace(model, path=Path(shipment.path))
        return self.model

    def ready(self, shipment: ModelShipment) -> str:
        """Loads the model; where this worker runs ("host:pid")."""
        import socket
        self._load(shipment)
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, case: BatchCase, out_dir: str, shipment: ModelShipment) -> CaseOutcome:
        return process_case(case, out_dir, names=self.names, model=self._load(shipment), overwrite=self.overwrite,
                            segment_options=self.segment_options)


# ---------------------------------------------------------------- the driver

def connect(ray: Any, address: Optional[str]) -> bool:
    """Connect to the cluster at ``address`` (or $RAY_ADDRESS), else start a local one
    for this batch (quiet, no dashboard; not a cluster that 'ray start' left running:
    ask for that one with --ray-address auto). True when a local cluster was started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "configure_logging": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"cannot connect to the Ray cluster at {address}: {_one_line(str(e), 200)}") from None
        return False
    ray.init(address="local", include_dashboard=False, **quiet)
    return True


class _Signals:
    """The command's own SIGINT and SIGTERM handling, kept while Ray runs.

    Ray's core installs a SIGTERM handler of its own (it prints a stack and aborts),
    and a wait interrupted by a signal comes back as a bare KeyboardInterrupt, not the
    exception the command's handler raised (cli.py tells SIGTERM from Ctrl-C by it).
    :meth:`install` puts the handlers found at the start back, each noting its signal;
    :meth:`reraise` raises the handler's own exception again; :meth:`restore` ends."""

    def __init__(self) -> None:
        self.handlers: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self.handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
        self.last: Optional[tuple] = None

    def install(self) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, self._noting(handler) if callable(handler) else handler)

    def _noting(self, handler: Callable) -> Callable:
        def on_signal(signum: int, frame: Any) -> None:
            self.last = (signum, handler)
            handler(signum, frame)
        return on_signal

    def reraise(self, error: BaseException) -> None:
        if self.last is not None and type(error) is KeyboardInterrupt:
            signum, handler = self.last
            handler(signum, None)

    def restore(self) -> None:
        for signum, handler in self.handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


def run_ray_batch(cases: Sequence[BatchCase], out_dir: Path, *, names: OutputNames, model: Any,
                  overwrite: bool, segment_options: Dict[str, Any], workers: Optional[int] = None,
                  cpus_per_worker: Optional[int] = None, address: Optional[str] = None,
                  summary_name: str = SUMMARY_NAME,
                  on_case: Optional[Callable[[CaseOutcome, int, int], None]] = None,
                  on_start: Optional[Callable[[str], None]] = None) -> BatchResult:
    """Run ``cases`` on Ray workers into ``out_dir`` (see the module): the result as
    :func:`~ILDSegmentationLib.batch.run_batch` gives it, outcomes in the cases' order.

    ``model``: the loaded model the driver checked (its file is sent to the workers).
    ``on_case(outcome, finished_so_far - 1, total)`` as each case ends, in the order
    they end; ``on_start(message)`` once the workers are up. A KeyboardInterrupt stops
    the workers; cases that had finished stay complete and listed."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayError

    result = BatchResult(summary=Path(out_dir) / summary_name)
    if not cases:
        write_summary(result.summary, [])
        return result
    signals = _Signals()
    actors: List[Any] = []
    finished: Dict[int, CaseOutcome] = {}
    last_write = 0.0

    def save(force: bool = False) -> None:
        nonlocal last_write
        if force or time.monotonic() - last_write >= SUMMARY_INTERVAL_S:
            write_summary(result.summary, [finished[i] for i in sorted(finished)])
            last_write = time.monotonic()

    try:
        connect(ray, address)
        signals.install()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        plan = plan_workers(nodes, workers=workers, cpus_per_worker=cpus_per_worker,
                            device=segment_options.get("device", "auto"))
        plan = dataclasses.replace(plan, workers=min(plan.workers, len(cases)))  # no idle workers
        remote = ray.remote(CaseWorker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                                max_restarts=-1, max_task_retries=0)
        shipment = ModelShipment(ray.put(Path(model.path).read_bytes()), str(model.path), model.sha256)
        actors = [remote.remote(names, overwrite, segment_options, int(max(1, plan.num_cpus)))
                  for _ in range(plan.workers)]
        try:
            hosts = ray.get([a.ready.remote(shipment) for a in actors])
        except RayError as e:
            raise ILDSegError(f"a Ray worker could not start: {_worker_error(e)}") from None
        if on_start is not None:
            on_start(f"Ray: {plan.describe()} on {len({h.split(':')[0] for h in hosts})} node(s)")

        todo = collections.deque(range(len(cases)))
        idle = list(actors)
        deaths = {id(a): 0 for a in actors}
        running: Dict[Any, Any] = {}  # object ref -> (actor, case index, or None for a restarted worker's check)
        back_by: Dict[int, float] = {}  # a restarting worker -> when it must be back (monotonic s)
        rechecks: List[Tuple[float, Any]] = []  # (when, actor): checks to ask again
        out = str(out_dir)

        def check(actor: Any) -> None:
            running[actor.ready.options(max_task_retries=MAX_DEATHS_IN_A_ROW).remote(shipment)] = (actor, None)

        while todo or running or rechecks:
            while idle and todo:
                actor, index = idle.pop(), todo.popleft()
                running[actor.run.remote(cases[index], out, shipment)] = (actor, index)
            now = time.monotonic()
            for when, actor in [r for r in rechecks if r[0] <= now]:
                rechecks.remove((when, actor))
                check(actor)
            if not running and not rechecks:
                raise ILDSegError(f"every Ray worker died {MAX_DEATHS_IN_A_ROW} times in a row or did not come back "
                                  f"within {WORKER_RESTART_TIMEOUT_S:g} s; {len(todo)} cases were not run (rerun "
                                  "the same command to go on)")
            if not running:
                time.sleep(0.2)
                continue
            # A timeout, so that Ctrl-C and SIGTERM reach this loop while cases run.
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, index = running.pop(ref)
                if index is None:  # a restarted worker's check: back with its model, asked again, or let go
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except RayError:
                        if time.monotonic() < back_by[id(actor)]:
                            rechecks.append((time.monotonic() + RECHECK_INTERVAL_S, actor))
                        else:
                            deaths[id(actor)] = MAX_DEATHS_IN_A_ROW
                    continue
                case = cases[index]
                try:
                    outcome = ray.get(ref)
                    deaths[id(actor)] = 0
                    idle.append(actor)
                except RayActorError as e:
                    # The worker process died on this case (killed for memory, a crash): the case
                    # fails and Ray restarts the worker. Calls to a restarting worker fail at once,
                    # so it gets cases again once a check (retried through the restart) came back.
                    # A worker that keeps dying is let go.
                    outcome = CaseOutcome(case, "failed", error=f"the Ray worker died while segmenting it "
                                                                f"({type(e).__name__}: out of memory, killed or "
                                                                "crashed; the worker's log in Ray's session folder "
                                                                "says which)")
                    deaths[id(actor)] += 1
                    if deaths[id(actor)] < MAX_DEATHS_IN_A_ROW:
                        back_by[id(actor)] = time.monotonic() + WORKER_RESTART_TIMEOUT_S
                        check(actor)
                except RayError as e:
                    outcome = CaseOutcome(case, "failed", error=_one_line(f"Ray: {_worker_error(e)}", 300))
                    idle.append(actor)
                finished[index] = outcome
                save()
                if on_case is not None:
                    on_case(outcome, len(finished) - 1, len(cases))
    except KeyboardInterrupt as e:
        signals.reraise(e)
        raise
    finally:
        if finished:
            save(force=True)
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        # Stops the cluster started here; from a cluster we connected to, only disconnects.
        ray.shutdown()
        signals.restore()
    result.outcomes = [finished[i] for i in sorted(finished)]
    return result


def _worker_error(e: BaseException) -> str:
    """The first line that says why, from a Ray error (whose text holds a traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and str(cause):
        return _one_line(str(cause), 300)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):  # a traceback ends with 'ExceptionType: message'
        if ":" in line and not line.startswith(("File ", "Traceback")):
            return _one_line(line, 300)
    return _one_line(lines[-1] if lines else type(e).__name__, 300)
