"""Outputs get the mode of a normal file (0o666 & ~umask), not mkstemp's 0o600.

Every output is written to a temporary name and renamed (atomicfile.py); ``mkstemp``
makes that temporary file 0o600, which would leave results unreadable to the
colleague, the group share or the web server that should read them. The end-to-end
tests of each command check their outputs' modes as well (``permissions.py``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ILDSegmentationLib.imaging.atomicfile import atomic_path
from ILDSegmentationLib.errors import InputError

from permissions import mode_of, umask

# umask -> the mode open() gives a new file, written out.
NORMAL_MODE = {0o022: 0o644, 0o027: 0o640, 0o077: 0o600, 0o002: 0o664}


@pytest.mark.parametrize("mask", sorted(NORMAL_MODE))
def test_atomic_path_gives_the_mode_of_a_normal_file(tmp_path, mask):
    with umask(mask):
        with atomic_path(tmp_path / "out.json") as tmp:
            Path(tmp).write_text("{}")
        (tmp_path / "plain.json").write_text("{}")
        # Over an existing file too (a rerun into the same folder).
        with atomic_path(tmp_path / "out.json") as tmp:
            Path(tmp).write_text("[]")
    assert mode_of(tmp_path / "out.json") == NORMAL_MODE[mask] == mode_of(tmp_path / "plain.json")
    assert (tmp_path / "out.json").read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "plain.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "out.json").write_text("old")
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises((InputError, KeyboardInterrupt)):
            with atomic_path(tmp_path / "out.json") as tmp:
                Path(tmp).write_text("half")
                raise error
        assert (tmp_path / "out.json").read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
