"""What the bench scripts share: main()'s error handling and the ``__main__`` start.

A script runs as a file (``python bench/NAME.py``), so this folder is on its path and
``import benchmain`` finds this module; the tests load the scripts the same way
(Testing/Python/conftest.py, load_bench_script).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_main(prog: str, build_parser: Callable[[], argparse.ArgumentParser],
             run: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run; a problem with the input or a file (ILDSegError,
    OSError) is one line ``PROG: error: ...`` on stderr and exit status 2, as in ``ildseg``."""
    from ILDSegmentationLib.errors import ILDSegError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ILDSegError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def run_script(main: Callable[[], Optional[int]]) -> None:
    """A script's ``if __name__ == "__main__"``: the process settings of ``ildseg``
    (set before torch is imported: BENCHMARKS.md, threads), then ``main()``'s exit status."""
    from ILDSegmentationLib.commands.cli import set_process_defaults

    set_process_defaults()
    sys.exit(main())
