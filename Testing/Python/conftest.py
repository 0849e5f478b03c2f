"""Shared fixtures. Real CT lives outside the repository (../shared/data, or
$ILDSEG_TEST_DATA); tests that need it skip with the reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# What the ildseg command sets for its own process (cli.set_process_defaults; the
# library no longer sets it at import): OpenMP threads sleep instead of spinning,
# which matters on the shared 2-core machine the tests run on (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ILDSEG_TEST_DATA", REPO.parent / "shared" / "data"))
DICOM_DIR = DATA / "lung-pet-ct-dx-A0002"
RICORD = DATA / "ricord-000082" / "ricord-000082-5mm.nii.gz"


def load_bench_script(name: str):
    """bench/NAME.py as a module (bench/ is a folder of scripts, not a package). Loaded
    once per session; bench/ goes on the path, as when a script runs, so that a script
    finds its siblings (medseg_finetune imports real_disease, all import benchmain)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    bench = str(REPO / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real CT not available at {path} (set ILDSEG_TEST_DATA to the shared data folder)")
    return path


@pytest.fixture
def dicom_dir() -> Path:
    return _need(DICOM_DIR)


@pytest.fixture
def ricord_path() -> Path:
    return _need(RICORD)


@pytest.fixture(scope="session")
def default_model():
    from ILDSegmentationLib.engine.modelfile import load_model
    return load_model()
