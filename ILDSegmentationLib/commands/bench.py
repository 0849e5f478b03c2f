"""``ildseg bench``: how fast is segmentation on this machine, and against what.

Measures, on the machine it runs on, and prints a table plus JSON (``--json OUT``):

* whole-CT segmentation as users run it (:func:`pipeline.segment_file`: read, lung
  mask, network, write) on a real CT (``--ct``; default the DICOM series in
  ``../shared/data``, else the built-in phantom), on a long synthetic volume (the
  CT's slices repeated, back and forth, to ``--long-slices``) and over 1x, 2x, 4x
  the CT's slice count (cost should be linear in lung voxels);
* in the same run, a **naive baseline**: the straightforward port (whole slice, one
  slice at a time, float32, eager ``network.forward``, default threads, every slice,
  same weights), and a **same-cropping reference** (the paper's per-lung crops, one
  crop at a time, eager ``network.forward``); the speed-up is a ratio of times taken
  in the same run, and the agreement of labels inside the lung is reported against
  both (cropping changes the normalization statistics, so only the reference is
  expected to agree almost everywhere);
* peak resident memory per case (each case runs in a fresh subprocess, so the peak
  is that case's), peak GPU memory on CUDA, slices and lung voxels per second;
* training throughput: crops per second of forward + backward + Adam step;
* the machine: CPU model and cores, GPU, torch version, threads.

Benchmarks are not tests: nothing here asserts a time. Timings on shared machines
are noisy; ``--repeat N`` runs the real-CT cases N times (interleaved) and keeps the
fastest of each.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..imaging.geometry import Geometry

#: Cases the bench can leave out with ``--skip``.
SKIPPABLE = ("naive", "reference", "long", "scaling", "training")
#: Peak-memory budget of the issue: the CT's own in-memory size x 4 + 1.5 GB.
MEMORY_FACTOR = 4
MEMORY_ALLOWANCE_MB = 1536


# ---------------------------------------------------------------------------------
# Measurements inside one process
# ---------------------------------------------------------------------------------
def _status_mb(field: str) -> Optional[float]:
    """A memory line of /proc/self/status (Linux), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process so far, in MB (VmHWM on Linux; else
    getrusage, whose unit is kB on Linux and bytes on macOS; None on Windows)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def _cpuinfo() -> Tuple[Optional[str], Optional[int], List[str]]:
    """CPU model, physical cores and the SIMD flags that matter here, from /proc/cpuinfo."""
    model, cores, flags = None, set(), []
    try:
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model is None:
                    model = value
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif key == "flags" and not flags:
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
                    flags = [f for f in wanted if f in value.split()]
                elif not key and phys is not None:
                    cores.add((phys, core))
                    phys = core = None
        if phys is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return model or platform.processor() or None, (len(cores) or None), flags


def machine_info() -> Dict[str, Any]:
    """What the figures were measured on."""
    import torch
    model, physical, flags = _cpuinfo()
    info: Dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": model,
        "cpu_physical_cores": physical,
        "cpu_logical": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": flags,
        "memory_gb": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    info["memory_gb"] = round(mem, 1) if mem else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}",
                       "cudnn": torch.backends.cudnn.version()}
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["gpu"] = {"name": "Apple MPS"}
    return info


def _sync(device: Any) -> None:
    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------
# The two comparison paths (public: tests check the engine against them)
# ---------------------------------------------------------------------------------
def naive_segment(network: Any, intensity: Any, hu: np.ndarray, lung_mask: np.ndarray, geometry: Any,
                  device: str = "cpu") -> np.ndarray:
    """The straightforward port: every axial slice whole, one at a time, float32,
    eager ``network.forward``; labels (1..6) written inside the lung mask only.
    Returns uint8 labels in the CT's K,J,I order."""
    import torch
    from ..imaging.geometry import as_volume, canonical_view
    hu, lung_mask = as_volume(np.asarray(hu)), as_volume(np.asarray(lung_mask))
    view = canonical_view(geometry)
    hu_c, lung_c = view.to_canonical(hu), view.to_canonical(lung_mask) != 0
    labels = np.zeros(hu.shape, np.uint8)
    labels_c = view.to_canonical(labels)
    with torch.inference_mode():
        for z in range(hu_c.shape[0]):
            x = torch.from_numpy(intensity.apply(hu_c[z]))[None, None].to(device)
            p = torch.softmax(network(x).float(), dim=1)
            arg = (p.argmax(dim=1)[0] + 1).to(torch.uint8).cpu().numpy()
            labels_c[z] = np.where(lung_c[z], arg, 0)
    return labels


def reference_segment(network: Any, intensity: Any, hu: np.ndarray, lung_mask: np.ndarray, geometry: Any,
                      device: str = "cpu", probabilities: bool = False
                      ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The same-cropping reference: the paper's per-lung crops (32 px margin), one
    crop at a time, eager float32 ``network.forward``, no batching, padding or fast
    path. Returns labels (uint8, K,J,I) and, if asked, probabilities (K,J,I,C)."""
    import torch
    from ..engine.cropping import crop_boxes
    from ..imaging.lungsides import split_left_right
    from ..imaging.geometry import as_volume, canonical_view
    hu, lung_mask = as_volume(np.asarray(hu)), as_volume(np.asarray(lung_mask))
    view = canonical_view(geometry)
    hu_c = view.to_canonical(hu)
    sides = split_left_right(view.to_canonical(lung_mask))
    labels = np.zeros(hu.shape, np.uint8)
    labels_c = view.to_canonical(labels)
    probs = None
    with torch.inference_mode():
        for z in range(sides.shape[0]):
            if not sides[z].any():
                continue
            for b in crop_boxes(sides[z], z):
                x = torch.from_numpy(intensity.apply(hu_c[z, b.r0:b.r1, b.c0:b.c1]))[None, None].to(device)
                p = torch.softmax(network(x).float(), dim=1)[0].cpu().numpy()
                inside = sides[z, b.r0:b.r1, b.c0:b.c1] == b.side
                labels_c[z, b.r0:b.r1, b.c0:b.c1][inside] = (p.argmax(axis=0) + 1).astype(np.uint8)[inside]
                if probabilities:
                    if probs is None:
                        probs = np.zeros(hu.shape + (p.shape[0],), np.float32)
                    for c in range(p.shape[0]):
                        view.to_canonical(probs[..., c])[z, b.r0:b.r1, b.c0:b.c1][inside] = p[c][inside]
    return labels, probs


def agreement_in_lung(a: np.ndarray, b: np.ndarray, lung: np.ndarray) -> Optional[float]:
    """Fraction of lung voxels where two label maps are equal (None without lung)."""
    lung = np.asarray(lung) != 0
    n = int(lung.sum())
    return float((np.asarray(a)[lung] == np.asarray(b)[lung]).sum()) / n if n else None


# ---------------------------------------------------------------------------------
# Workers: one case per fresh process
# ---------------------------------------------------------------------------------
def _worker_setup(spec: Dict[str, Any]) -> Any:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if str(spec.get("device", "")).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return torch


def _gpu_peak_mb(torch: Any, device: str) -> Optional[float]:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _worker_product(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The product path: pipeline.segment_file, with the automatic lung mask. At the
    CT's own pixel size, as the baselines: the figures compare the same computation
    (by default the product resamples CTs outside the model's range of pixel sizes,
    which changes the work itself), and with the paper's argmax, the baselines' rule
    (a model's whole-lung rule changes labels, not the work)."""
    torch = _worker_setup(spec)
    from ..analysis.pipeline import segment_file
    summary = segment_file(spec["ct"], spec["out"], model=spec.get("model"), device=spec["device"],
                           max_memory_mb=spec["max_memory_mb"], pixel_spacing="native", decision="paper")
    timings = dict(summary["timings_s"])
    return {"timings": timings, "device": summary["device"],
            "slices_with_lung": summary["slices"]["with_lung"], "lung_crops": summary["slices"]["lung_crops"],
            "peak_gpu_mb": _gpu_peak_mb(torch, spec["device"]), "threads": torch.get_num_threads()}


def _worker_manual(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The naive baseline or the same-cropping reference, timed in the same parts."""
    torch = _worker_setup(spec)
    from ..engine.device import describe_device, select_device
    from ..imaging.io import read_ct, write_label_map
    from ..imaging.lungmask import compute_lung_mask
    from ..engine.modelfile import load_model
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_model(spec.get("model"))
    device = select_device(spec["device"])
    network = loaded.network.to(device).eval()
    timings["model"] = time.perf_counter() - t
    t = time.perf_counter()
    ct = read_ct(spec["ct"])
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    mask = compute_lung_mask(ct.array, ct.geometry)
    timings["lung_mask"] = time.perf_counter() - t
    t = time.perf_counter()
    if spec["kind"] == "naive":
        labels = naive_segment(network, loaded.info.intensity, ct.array, mask, ct.geometry, device)
    else:
        labels, _ = reference_segment(network, loaded.info.intensity, ct.array, mask, ct.geometry, device)
    _sync(device)
    timings["network"] = time.perf_counter() - t
    t = time.perf_counter()
    write_label_map(labels, ct.image, spec["out"])
    timings["write"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    return {"timings": timings, "device": describe_device(device),
            "peak_gpu_mb": _gpu_peak_mb(torch, spec["device"]), "threads": torch.get_num_threads()}


def _synthetic_crops(shapes: Sequence[Sequence[int]], n: int, seed: int) -> List[Any]:
    """``n`` training crops cycling through ``shapes``: lung-like intensities (hu1000),
    an elliptic lung, about 15 % of it annotated with the six classes (the share of
    the bundled model's training crops)."""
    from ..training.dataset import Crop
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[:h, :w]
        lung = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
        image = np.where(lung, -0.85, 0.04) + rng.normal(0, 0.05, (h, w))
        target = np.where(lung & (rng.random((h, w)) < 0.15), rng.integers(0, 6, (h, w)), -1)
        crops.append(Crop(f"bench{i}", i, 0, image.astype(np.float32), target.astype(np.int64), lung))
    return crops


def _worker_training(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Crops per second of ``ildseg train``'s epochs (training steps and the validation
    that ends each epoch) on synthetic crops, for one trainer: ``reference`` (the
    straightforward implementation: float32, torch's dropout, padded batches, the loss
    read back every step, validation crop by crop, glibc's default heap) or ``fast``
    (the defaults, in a training process's heap setting). Each runs in its own
    process, since the heap setting is the process's."""
    torch = _worker_setup(spec)
    from ..engine.device import describe_device
    from ..training.trainer import TrainConfig, Trainer
    fast = spec["trainer"] == "fast"
    if fast:
        from ..training.allocator import keep_freed_memory
        keep_freed_memory()
    shapes = spec["train_shapes"]
    train = _synthetic_crops(shapes, int(spec["train_crops"]), 0)
    val = _synthetic_crops(shapes, max(1, int(spec["train_crops"]) // 4), 1)
    options = {} if fast else {"fast": False, "precision": "fp32"}
    config = TrainConfig(device=spec["device"], batch_size=int(spec["batch_size"]), intensity="hu1000", **options)
    trainer = Trainer(config, train, val, Path(spec["out"]))
    if not fast:
        trainer.network.dropout = torch.nn.Dropout(trainer.network.config.dropout)
    trainer.run_epoch(0)  # warm-up: oneDNN and cuDNN choose their kernels per shape
    _sync(trainer.device)
    epochs = int(spec["train_epochs"])
    wall, cpu = time.perf_counter(), time.process_time()
    for epoch in range(1, 1 + epochs):
        trainer.run_epoch(epoch)
    _sync(trainer.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(train) * epochs
    return {"device": describe_device(trainer.device), "precision": trainer.precision, "crops": n,
            "validation_crops_per_epoch": len(val), "crop_shapes": [list(s) for s in shapes],
            "batch_size": config.batch_size, "crops_per_second": n / wall, "cpu_seconds_per_crop": cpu / n,
            "peak_gpu_mb": _gpu_peak_mb(torch, spec["device"]), "threads": torch.get_num_threads()}


_WORKERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "product": _worker_product, "naive": _worker_manual, "reference": _worker_manual,
    "training": _worker_training,
}


def _worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    # Imported first, so that the baseline below includes torch and the library.
    importlib.import_module("torch")
    importlib.import_module("..analysis.pipeline", __package__)
    rss_start = _status_mb("VmRSS")
    result = _WORKERS[spec["kind"]](spec)
    # Measured before anything else is read back: the peak of the case itself.
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_after_imports_mb"] = rss_start
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _spawn(spec: Dict[str, Any], tmp: Path, name: str) -> Dict[str, Any]:
    """Run one case in a fresh interpreter; {'error': ...} if it failed."""
    spec = dict(spec, result=str(tmp / f"{name}.result.json"))
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ILDSegmentationLib.commands.bench", "--worker", str(spec_path)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    result = json.loads(Path(spec["result"]).read_text())
    result["wall_s"] = wall
    return result


# ---------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------
def default_ct() -> Optional[Path]:
    """The DICOM series of ../shared/data (or $ILDSEG_TEST_DATA), if present."""
    data = Path(os.environ.get("ILDSEG_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    series = data / "lung-pet-ct-dx-A0002"
    return series if series.is_dir() else None


def repeat_slices(array: np.ndarray, n_slices: int) -> np.ndarray:
    """The CT's slices repeated back and forth (0..K-1, K-1..0, ...) to n_slices:
    anatomy stays continuous from slice to slice, as in a real long scan."""
    k = array.shape[0]
    period = list(range(k)) + list(range(k - 1, -1, -1)) if k > 1 else [0]
    index = [period[i % len(period)] for i in range(int(n_slices))]
    return array[index]


class _Source:
    """The CT under test, as an array with its grid, plus the file the cases read."""

    def __init__(self, array: np.ndarray, geometry: Geometry, path: Path, description: str) -> None:
        self.array, self.geometry = array, geometry
        self.path, self.description = path, description

    def write_slices(self, n_slices: int, path: Path) -> Path:
        from ..imaging.images import write_array
        # Uncompressed: reading it is not the benchmark.
        return write_array(repeat_slices(self.array, n_slices), self.geometry, path, compress=False)


def _load_source(ct: Optional[str], quick: bool, tmp: Path, say: Callable[[str], None]) -> _Source:
    from ..imaging.io import read_ct
    path: Optional[Path] = Path(ct) if ct else default_ct()
    if path is not None:
        if not path.exists():
            raise InputError(f"CT not found: {path}")
        vol = read_ct(path)
        image = vol.image
        if image.GetDimension() != 3:
            raise InputError("the benchmark needs a 3D CT")
        # A copy: read_ct's array is a view into the SimpleITK image's buffer, which
        # is freed with the image.
        array = np.array(vol.array, copy=True)
        spacing, origin, direction = list(image.GetSpacing()), image.GetOrigin(), image.GetDirection()
        description = f"{path.name} ({'DICOM series' if path.is_dir() else 'file'})"
    else:
        from ..simulation.phantom import make_chest_phantom
        say("no real CT found: using the built-in synthetic chest phantom")
        size, spacing_xy = (256, 1.4) if quick else (512, 0.7)
        phantom = make_chest_phantom(size=size, spacing=(spacing_xy, spacing_xy, 5.0))
        array, g = phantom.hu, phantom.geometry
        spacing, origin, direction = list(g.spacing), g.origin, g.direction
        description = f"built-in synthetic phantom ({size}x{size}x{array.shape[0]})"
        path = None
    if quick:
        # Small enough for ~2 minutes on a 2-core CPU: 8 central slices, half resolution.
        k0 = max(0, array.shape[0] // 2 - 4)
        array = array[k0:k0 + 8]
        if array.shape[1] > 256:
            array = array[:, ::2, ::2]
            spacing = [spacing[0] * 2, spacing[1] * 2, spacing[2]]
        description += f", --quick: {array.shape[2]}x{array.shape[1]}x{array.shape[0]}"
        path = None
    array = np.ascontiguousarray(array)
    from ..imaging.images import write_array
    geometry = Geometry(tuple(spacing), tuple(origin), tuple(direction))
    if path is None:
        path = write_array(array, geometry, tmp / "ct.nrrd", compress=False)
    return _Source(array, geometry, path, description)


# ---------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ildseg bench``."""
    parser.add_argument("--ct", metavar="PATH",
                        help="CT to measure on (file or DICOM folder); default: the DICOM series in ../shared/data, "
                             "else the built-in synthetic phantom")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="small settings (8 slices at half resolution, short long volume): "
                             "~2 minutes on a 2-core CPU")
    parser.add_argument("--long-slices", type=int, default=None, metavar="N",
                        help="slices of the long synthetic volume (default 300; 24 with --quick)")
    parser.add_argument("--scaling", default="1,2,4", metavar="F,F,...",
                        help="multiples of the CT's slice count for the scaling cases (default 1,2,4)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the real-CT cases N times, interleaved, and keep the fastest of each (default 1)")
    parser.add_argument("--skip", action="append", default=[], choices=SKIPPABLE,
                        help="leave a case out (repeatable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads in every case (default: torch's default, the physical cores)")
    parser.add_argument("--train-epochs", type=int, default=None, metavar="N",
                        help="timed training epochs of 8 crops and 2 validation crops, after one of warm-up "
                             "(default 2; 1 with --quick, 4 crops)")
    parser.add_argument("--train-batch-size", type=int, default=1, metavar="N",
                        help="crops per training step (default 1, as ildseg train)")
    parser.add_argument("--model", metavar="FILE", help="model file (.safetensors); default: the bundled model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--max-memory", type=float, default=1024, metavar="MB",
                        help="activation memory one batch of lung crops may use (default: 1024)")


def _best(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The fastest successful run; peak memory is the largest seen over the runs."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: r["timings"]["total"]))
    best["runs"] = len(ok)
    best["totals_s"] = [round(r["timings"]["total"], 3) for r in ok]
    peaks = [r["peak_rss_mb"] for r in ok if r.get("peak_rss_mb") is not None]
    best["peak_rss_mb"] = max(peaks) if peaks else None
    return best


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _complete(case: Dict[str, Any], slices: int, lung_voxels: int, ct_mb: float,
              labels_mb: float) -> Dict[str, Any]:
    """Derived figures of one case. ct_mb, labels_mb: the CT as read and the uint8
    label map, the arrays whose size must grow with the slice count."""
    if "error" in case:
        return case
    t = case["timings"]
    case["slices"] = slices
    case["lung_voxels"] = lung_voxels
    case["ct_mb"] = ct_mb
    case["seconds_per_slice"] = t["total"] / slices
    case["network_seconds_per_slice"] = t["network"] / slices
    case["slices_per_second"] = slices / t["total"]
    case["lung_voxels_per_second"] = lung_voxels / t["network"] if t["network"] > 0 else None
    case["network_seconds_per_million_lung_voxels"] = t["network"] / lung_voxels * 1e6 if lung_voxels else None
    budget = MEMORY_FACTOR * ct_mb + MEMORY_ALLOWANCE_MB
    case["memory_budget_mb"] = budget
    if case.get("peak_rss_mb") is not None:
        case["within_memory_budget"] = case["peak_rss_mb"] <= budget
        case["peak_rss_minus_ct_and_labels_mb"] = case["peak_rss_mb"] - ct_mb - labels_mb
    return case


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return format(v, spec)


def training_lines(tr: Dict[str, Dict[str, Any]]) -> List[str]:
    """The report's training lines: each trainer's crops per second, and the speed-up."""
    lines: List[str] = []
    for name, t in tr.items():
        if "error" in t:
            lines.append(f"training, {name} trainer: failed: {t['error'][:100]}")
            continue
        shapes = " and ".join(f"{h}x{w}" for h, w in t["crop_shapes"])
        lines.append(f"training, {name} trainer ({t['device']}, {t['precision']}, crops {shapes}, batch "
                     f"{t['batch_size']}, validation included): {t['crops_per_second']:.2f} crops/s, "
                     f"{t['cpu_seconds_per_crop']:.2f} CPU s/crop")
    if set(tr) == {"reference", "fast"} and all("error" not in t for t in tr.values()):
        ref, new = tr["reference"], tr["fast"]
        lines.append(f"training speed-up, fast over reference: "
                     f"{new['crops_per_second'] / ref['crops_per_second']:.2f}x (wall), "
                     f"{ref['cpu_seconds_per_crop'] / new['cpu_seconds_per_crop']:.2f}x (CPU time)")
    return lines


def format_report(report: Dict[str, Any]) -> str:
    """The table printed by ``ildseg bench``."""
    m = report["machine"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    lines = [
        f"ILD segmentation benchmark, {m['date']}",
        f"machine: {m['cpu_model']} ({m['cpu_physical_cores'] or '?'} cores, {m['cpu_usable']} usable), "
        f"GPU: {gpu}, torch {m['torch']}, {report['threads']} threads, device {report['device']}",
        f"CT: {report['ct']['description']}, {report['ct']['shape_kji'][0]} slices of "
        f"{report['ct']['shape_kji'][2]}x{report['ct']['shape_kji'][1]}, {report['ct']['lung_voxels']:,} lung voxels",
        "",
        f"{'case':<30}{'slices':>7}{'read':>7}{'mask':>7}{'network':>9}{'write':>7}{'total':>8}"
        f"{'s/slice':>9}{'Mvox/s':>8}{'peak MB':>9}{'budget':>8}",
    ]
    for name, case in report["table"]:
        if "error" in case:
            lines.append(f"{name:<30}  failed: {case['error'][:100]}")
            continue
        t = case["timings"]
        vps = case.get("lung_voxels_per_second")
        est = " (est.)" if case.get("estimated") else ""
        lines.append(
            f"{(name + est):<30}{case['slices']:>7}{_fmt(t.get('read')):>7}{_fmt(t.get('lung_mask')):>7}"
            f"{_fmt(t['network'], '.1f'):>9}{_fmt(t.get('write')):>7}{_fmt(t['total'], '.1f'):>8}"
            f"{_fmt(case['seconds_per_slice'], '.3f'):>9}{_fmt(vps / 1e6 if vps else None, '.3f'):>8}"
            f"{_fmt(case.get('peak_rss_mb'), '.0f'):>9}"
            f"{('ok' if case.get('within_memory_budget') else ('OVER' if 'within_memory_budget' in case else '-')):>8}")
    lines.append("")
    s = report
    if s.get("speedup_vs_naive") is not None:
        lines.append(f"speed-up vs naive baseline (same run): {s['speedup_vs_naive']:.2f}x end to end, "
                     f"{s['speedup_vs_naive_network']:.2f}x network stage")
    if s.get("speedup_vs_reference_network") is not None:
        lines.append(f"speed-up vs same-cropping eager reference, network stage: {s['speedup_vs_reference_network']:.2f}x")
    if s.get("agreement_in_lung") is not None:
        lines.append(f"labels in the lung equal to the naive baseline: {100 * s['agreement_in_lung']:.3f} % "
                     "(whole-slice vs per-lung normalization statistics)")
    if s.get("agreement_in_lung_same_cropping") is not None:
        lines.append(f"labels in the lung equal to the same-cropping reference: "
                     f"{100 * s['agreement_in_lung_same_cropping']:.4f} %")
    sc = s.get("scaling") or []
    if sc and all("error" not in c for c in sc):
        per = ", ".join(f"{c['slices']} slices {c['network_seconds_per_million_lung_voxels']:.2f}" for c in sc)
        lines.append(f"scaling, network seconds per million lung voxels: {per}")
        if all(c.get("peak_rss_minus_ct_and_labels_mb") is not None for c in sc):
            mem = ", ".join(f"{c['slices']} slices {c['peak_rss_minus_ct_and_labels_mb']:.0f}" for c in sc)
            lines.append(f"scaling, peak resident memory minus the CT and label arrays (MB): {mem}")
    lines += training_lines(s.get("training") or {})
    lines.append(f"peak memory budget per case: CT size x {MEMORY_FACTOR} + {MEMORY_ALLOWANCE_MB} MB")
    return "\n".join(lines)


def training_throughput(base_spec: Dict[str, Any], quick: bool, repeat: int, epochs: int, batch_size: int,
                        tmp: Path) -> Dict[str, Dict[str, Any]]:
    """The reference and the fast trainer, each in fresh processes, side by side: they
    alternate, so a machine busy with something else slows both alike; the fastest
    run of each is kept."""
    shapes = [[96, 80], [128, 96]] if quick else [[224, 160], [320, 240]]
    runs: Dict[str, List[Dict[str, Any]]] = {"reference": [], "fast": []}
    for r in range(repeat):
        for trainer in runs:
            runs[trainer].append(_spawn(dict(
                base_spec, kind="training", trainer=trainer, train_shapes=shapes, train_epochs=epochs,
                train_crops=4 if quick else 8, batch_size=batch_size, out=str(tmp / f"train_{trainer}_{r}")),
                tmp, f"training_{trainer}_{r}"))
    return {k: max(v, key=lambda res: res.get("crops_per_second", -1.0)) for k, v in runs.items()}


def run(args: argparse.Namespace) -> int:
    """``ildseg bench``: measure, print the table, write --json. Returns the exit code."""
    quiet = bool(getattr(args, "quiet", False))

    def say(msg: str) -> None:
        if not quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    quick = bool(getattr(args, "quick", False))
    skip = set(getattr(args, "skip", None) or [])
    long_slices = getattr(args, "long_slices", None) or (24 if quick else 300)
    scaling = [float(f) for f in str(getattr(args, "scaling", "1,2,4") or "").split(",") if f.strip()]
    repeat = max(1, int(getattr(args, "repeat", 1) or 1))
    train_epochs = getattr(args, "train_epochs", None) or (1 if quick else 2)
    from ..engine.device import select_device
    device = str(select_device(getattr(args, "device", "auto") or "auto"))
    base_spec = {"device": device, "model": getattr(args, "model", None),
                 "max_memory_mb": float(getattr(args, "max_memory", 1024) or 1024),
                 "threads": getattr(args, "threads", None)}

    tmp = Path(tempfile.mkdtemp(prefix="ildseg-bench-"))
    try:
        machine = machine_info()
        src = _load_source(getattr(args, "ct", None), quick, tmp, say)
        k = src.array.shape[0]
        ct_mb_per_slice = src.array[0].nbytes / 2**20
        labels_mb_per_slice = src.array[0].size / 2**20

        def complete(case: Dict[str, Any], n: int, n_lung: int) -> Dict[str, Any]:
            return _complete(case, n, n_lung, ct_mb_per_slice * n, labels_mb_per_slice * n)

        # -- the real CT: product path, naive baseline, same-cropping reference ----
        kinds = ["product"] + [kd for kd in ("naive", "reference") if kd not in skip]
        runs: Dict[str, List[Dict[str, Any]]] = {kd: [] for kd in kinds}
        for r in range(repeat):
            for kd in kinds:
                say(f"real CT, {kd} path, run {r + 1} of {repeat} ({k} slices)")
                out = tmp / f"real_{kd}_{r}.nrrd"
                res = _spawn(dict(base_spec, kind=kd, ct=str(src.path), out=str(out)), tmp, f"real_{kd}_{r}")
                if "error" not in res:
                    res["labels_file"] = str(out)
                runs[kd].append(res)
        real = {kd: _best(v) for kd, v in runs.items()}
        fast = real["product"]
        if "error" in fast:
            print(f"ildseg bench: the segmentation itself failed: {fast['error']}", file=sys.stderr)
            return 1
        labels_fast = _read_labels(Path(fast["labels_file"]))
        lung = labels_fast > 0
        lung_voxels = int(lung.sum())
        for kd, case in real.items():
            complete(case, k, lung_voxels)
        report: Dict[str, Any] = {
            "machine": machine,
            "device": fast.get("device", device),
            "threads": fast.get("threads"),
            "settings": {"quick": quick, "repeat": repeat, "long_slices": long_slices, "scaling": scaling,
                         "skip": sorted(skip), "max_memory_mb": base_spec["max_memory_mb"],
                         "model": base_spec["model"] or "bundled"},
            "ct": {"description": src.description, "path": str(src.path), "shape_kji": list(src.array.shape),
                   "spacing_ijk_mm": list(src.geometry.spacing), "lung_voxels": lung_voxels,
                   "ct_mb": ct_mb_per_slice * k},
            "real_ct": real,
        }
        agreement = {}
        for kd in ("naive", "reference"):
            if kd in real and "error" not in real[kd]:
                agreement[kd] = agreement_in_lung(labels_fast, _read_labels(Path(real[kd]["labels_file"])), lung)
        naive = real.get("naive")
        ok_naive = naive is not None and "error" not in naive
        report["speedup_vs_naive"] = naive["timings"]["total"] / fast["timings"]["total"] if ok_naive else None
        report["speedup_vs_naive_network"] = (naive["timings"]["network"] / fast["timings"]["network"]
                                              if ok_naive else None)
        ref = real.get("reference")
        report["speedup_vs_reference_network"] = (ref["timings"]["network"] / fast["timings"]["network"]
                                                  if ref is not None and "error" not in ref else None)
        report["agreement_in_lung"] = agreement.get("naive")
        report["agreement_in_lung_same_cropping"] = agreement.get("reference")
        report["seconds_per_slice"] = fast["seconds_per_slice"]
        report["network_seconds_per_slice"] = fast["network_seconds_per_slice"]
        report["slices_per_second"] = fast["slices_per_second"]
        report["lung_voxels_per_second"] = fast["lung_voxels_per_second"]
        report["peak_rss_mb"] = fast.get("peak_rss_mb")
        report["peak_gpu_mb"] = fast.get("peak_gpu_mb")
        table: List[Tuple[str, Dict[str, Any]]] = [("real CT: segment (fast path)", fast)]
        if "naive" in real:
            table.append(("real CT: naive baseline", real["naive"]))
        if "reference" in real:
            table.append(("real CT: same-crop reference", real["reference"]))

        # -- the long volume and the scaling cases ---------------------------------
        def volume_case(n: int, name: str) -> Dict[str, Any]:
            path = src.write_slices(n, tmp / f"{name}.nrrd")
            say(f"{name}: {n} slices")
            out = tmp / f"{name}_labels.nrrd"
            res = _spawn(dict(base_spec, kind="product", ct=str(path), out=str(out)), tmp, name)
            path.unlink()
            if "error" in res:
                return res
            n_lung = int((_read_labels(out) > 0).sum())
            out.unlink()
            return complete(res, n, n_lung)

        if "long" not in skip:
            long_case = volume_case(long_slices, "long")
            report["long"] = long_case
            table.append((f"long volume ({long_slices} slices)", long_case))
            if ok_naive and "error" not in long_case:
                # The naive cost is per slice (every slice whole), so it scales exactly
                # with the slice count: estimated, not run (it would take ~10x longer).
                est_net = naive["network_seconds_per_slice"] * long_slices
                t = long_case["timings"]
                est = {"timings": {"read": t.get("read"), "lung_mask": t.get("lung_mask"), "network": est_net,
                                   "write": t.get("write")}, "estimated": True}
                est["timings"]["total"] = t["total"] - t["network"] + est_net
                complete(est, long_slices, long_case["lung_voxels"])
                report["long_naive_estimate"] = est
                report["long_speedup_vs_naive_estimate"] = est["timings"]["total"] / t["total"]
                table.append((f"long: naive ({long_slices} slices)", est))
        if "scaling" not in skip and scaling:
            cases = []
            for f in scaling:
                n = max(1, int(round(f * k)))
                c = volume_case(n, f"scaling_{f:g}x")
                c["factor"] = f
                cases.append(c)
                table.append((f"scaling {f:g}x ({n} slices)", c))
            report["scaling"] = cases

        if "training" not in skip:
            say("training throughput")
            report["training"] = training_throughput(base_spec, quick, repeat, train_epochs,
                                                     getattr(args, "train_batch_size", 1), tmp)
        report["table"] = table
        text = format_report(report)
        del report["table"]
        print(text)
        json_path = getattr(args, "json", None)
        if json_path:
            from ..imaging.atomicfile import atomic_path
            with atomic_path(json_path) as part:
                Path(part).write_text(json.dumps(report, indent=2, default=str))
            say(f"wrote {json_path}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ILDSegmentationLib.commands.bench [options]`` (same as ``ildseg bench``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--worker":
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(prog="ildseg bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
