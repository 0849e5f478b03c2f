"""Progress of a command: a bar on the terminal (:class:`ProgressBar`), or lines for a
parent process (:class:`ProgressLines`, what ``ildseg segment --progress-lines`` prints).

A parent (the Slicer panel's job, :mod:`ILDSegmentationLib.slicer.background`) runs
``ildseg`` as a child process and reads its stdout: each progress line is
``ildseg-progress FRACTION MESSAGE``. Both ends of that protocol live here.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Optional, Tuple

#: First word of a machine-readable progress line.
PROGRESS_PREFIX = "ildseg-progress"


class ProgressLines:
    """A progress callback (fraction 0..1, message) that prints
    ``ildseg-progress 0.4213 slice 12 of 40`` lines on stdout for a parent process.

    At most one line per ``min_interval_s`` (the engine reports every slice batch),
    but always the first and the last (fraction 1). Flushed at once: a pipe is
    block-buffered otherwise, and the parent would see nothing until the end."""

    def __init__(self, stream: Optional[IO[str]] = None, min_interval_s: float = 0.2) -> None:
        self.stream = stream
        self.min_interval_s = min_interval_s
        self._last = -1e9

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < self.min_interval_s:
            return
        self._last = now
        stream = self.stream or sys.stdout
        text = " ".join(str(message).split())  # one line, whatever the message holds
        stream.write(f"{PROGRESS_PREFIX} {min(max(float(fraction), 0.0), 1.0):.4f} {text}\n")
        stream.flush()

    def close(self) -> None:
        pass


def parse_progress_line(line: str) -> Optional[Tuple[float, str]]:
    """(fraction, message) of a progress line, or None for any other line."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != PROGRESS_PREFIX:
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    if not 0.0 <= fraction <= 1.0:
        return None
    return fraction, parts[2] if len(parts) > 2 else ""


class ProgressBar:
    """tqdm on a terminal; silent when stderr is not a TTY or with --quiet."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=1000, disable=True if quiet else None, unit="‰", leave=False,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.set_description_str(message[:48], refresh=False)
        self.bar.update(max(0, int(fraction * 1000) - self.bar.n))

    def close(self) -> None:
        self.bar.close()
