#!/usr/bin/env python
"""Specificity on chest CTs without ILD (see ILDSegmentationLib/specificity.py).

    python bench/specificity.py [--model MODEL] [--json out.json] [--overlay-dir DIR] [--ct NAME ...]

Runs from a checkout without installing: the repository root is put on the path.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ILDSegmentationLib.specificity import main  # noqa: E402

if __name__ == "__main__":
    from ILDSegmentationLib.cli import set_process_defaults
    set_process_defaults()  # as `ildseg` does, before torch is imported (BENCHMARKS.md, threads)
    sys.exit(main())
