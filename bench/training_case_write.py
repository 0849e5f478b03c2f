"""How long writing one training case takes, the files the panel's "Add to training
set" writes (issue 29, item 8: the write runs on Slicer's GUI thread).

Writes a real CT (int16 HU), a lung mask and a sparse annotation (uint8) as NRRD the
way ``trainingset.add_case`` does, with gzip at SimpleITK's default level, at level 1
and without compression, and prints seconds and megabytes per file, with the machine.

    python bench/training_case_write.py [CT file, default ../shared/data/lidc-idri-0002]
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DEFAULT_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidc-idri-0002" / "lidc-idri-0002.nrrd"


def _time_write(image, path: Path, compress: bool, level: int = -1) -> float:
    start = time.perf_counter()
    sitk.WriteImage(image, str(path), compress, level)
    return time.perf_counter() - start


def main() -> int:
    ct_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CT
    if not ct_path.exists():
        print(f"no CT at {ct_path}: pass one", file=sys.stderr)
        return 2
    ct = sitk.ReadImage(str(ct_path))
    hu = sitk.GetArrayFromImage(ct)
    lung = (hu < -400).astype(np.uint8)  # a stand-in lung mask of the right size and sparsity
    annotation = np.zeros(hu.shape, np.uint8)
    annotation[hu.shape[0] // 2, 200:260, 120:200] = 1  # a few painted regions on one slice
    images = {"ct (int16)": ct, "lung mask (uint8)": sitk.GetImageFromArray(lung),
              "annotation (uint8)": sitk.GetImageFromArray(annotation)}
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"SimpleITK {sitk.Version.VersionString()}; CT {ct_path.name} {hu.shape[::-1]} (I, J, K)")
    print(f"{'file':<20} {'setting':<14} {'seconds':>8} {'MB':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for name, image in images.items():
            for setting, compress, level in (("gzip default", True, -1), ("gzip level 1", True, 1),
                                             ("uncompressed", False, -1)):
                path = Path(folder) / "x.nrrd"
                seconds = min(_time_write(image, path, compress, level) for _ in range(2))
                print(f"{name:<20} {setting:<14} {seconds:8.2f} {path.stat().st_size / 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
