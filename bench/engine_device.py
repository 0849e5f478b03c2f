"""Time the inference engine on one device without any file I/O (so it runs where
torch is installed but SimpleITK is not, such as a rented GPU machine):

    python bench/engine_device.py --device cuda --slices 300 --json engine-cuda.json

The input is the built-in synthetic chest phantom (512 x 512 in-plane, 0.8 mm
pixels, ``--slices`` axial slices of 1 mm), lung mask from the phantom itself, the
bundled model at the CT's own pixels (no resampling). Prints and writes: the machine,
the whole ``Inferer.segment`` time (the best of ``--repeat`` runs after one warm-up),
seconds per slice, and the peak GPU memory. The same run also times a naive baseline
on that device (whole slices, one at a time, float32, no cropping) on the first
``--baseline-slices`` slices, and the agreement of the two inside the lung there.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import benchmain  # noqa: E402  (bench/benchmain.py: the checkout on the path, main()'s wrapper)


def main() -> None:
    import torch

    from ILDSegmentationLib.engine.inference import Inferer
    from ILDSegmentationLib.engine.modelfile import load_model
    from ILDSegmentationLib.simulation.phantom import make_chest_phantom
    from ILDSegmentationLib.engine.preprocessing import Intensity

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-slices", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    ph = make_chest_phantom(seed=0, size=512, n_slices=args.slices, spacing=(0.8, 0.8, 1.0))
    lung = ph.lung_labels > 0
    model = load_model()
    inferer = Inferer(model, device=args.device, pixel_spacing="native")
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    mid = slice(args.slices // 2, args.slices // 2 + min(8, args.slices))  # warm-up on slices with lung
    inferer.segment(ph.hu[mid], lung[mid], ph.geometry)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        result = inferer.segment(ph.hu, lung, ph.geometry)
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None

    # Naive baseline: whole slices, one at a time, float32, the model's own network.
    net = model.network.to(dev).eval()
    intensity: Intensity = model.info.intensity
    n = min(args.baseline_slices, args.slices)
    first = args.slices // 2 - n // 2  # the baseline's slices: the middle ones, with lung
    sync()
    t0 = time.perf_counter()
    naive = np.zeros((n,) + ph.hu.shape[1:], np.uint8)
    with torch.inference_mode():
        for z in range(n):
            x = torch.from_numpy(intensity.apply(ph.hu[first + z]))[None, None].to(dev)
            naive[z] = net(x).argmax(1)[0].cpu().numpy().astype(np.uint8) + 1
    sync()
    naive_s = time.perf_counter() - t0
    inside = lung[first:first + n]
    agreement = float((naive[inside] == result.labels[first:first + n][inside]).mean())
    out = {"machine": machine, "volume": list(ph.hu.shape), "pixel_mm": 0.8,
           "segment_seconds": round(best, 3), "segment_seconds_all": [round(t, 3) for t in times],
           "seconds_per_slice": round(best / args.slices, 4), "peak_gpu_mb": None if peak is None else round(peak),
           "naive_seconds_per_slice": round(naive_s / n, 4), "speedup_vs_naive": round((naive_s / n) / (best / args.slices), 2),
           "agreement_with_naive_in_lung": round(agreement, 6),
           "note": "naive = whole slices, no crops: its labels differ by design (no per-lung normalization)"}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    benchmain.run_script(main)
