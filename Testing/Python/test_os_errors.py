"""Every operating-system error on a path is a clear error: a symlink loop, no
permission, a device file, a FIFO (never opened: that would block), a folder where a
file is expected and the reverse, a name too long give exit 2 and one line that names
the path, in every command, never exit 1. Backs docs/guarantees.md, "Paths the
system refuses". Permission cases run as an ordinary user (forked, as root)."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ILDSegmentationLib.commands import cli

from permissions import privileged, public_folder, run_unprivileged
from synthetic import random_model, two_lungs
from training_data import make_manifest

KINDS = ("symlink_loop", "no_permission", "device_file", "fifo", "folder_for_file", "file_for_folder",
         "name_too_long")
# Where the bad path goes: (command, slot), slot "in" (an input) or "out" (an output).
SLOTS = [("segment", "in"), ("segment", "out"), ("evaluate", "in"), ("evaluate", "out"), ("train", "in"),
         ("train", "out"), ("simulate", "in"), ("simulate", "out"), ("bench", "in"), ("bench", "out")]
# A folder is what the slot expects for these (so "folder_for_file" gives a file there).
FOLDER_SLOTS = {("train", "out"), ("simulate", "out")}

EXPECTED = {  # words the one line must hold, per kind (alternatives joined with |)
    "symlink_loop": r"symbolic link loop",
    "no_permission": r"permission denied",
    "device_file": r"device file|is a file|unsupported output format",
    "fifo": r"named pipe \(FIFO\)|is a file",
    "folder_for_file": r"is a folder, not a file|no DICOM series found in folder|is a file",
    "file_for_folder": r"is a file|not a folder|Not a directory",
    "name_too_long": r"too long",
}


@pytest.fixture(scope="module")
def world():
    """A folder every user can reach, with a small CT, a manifest and a model."""
    with public_folder() as d:
        hu, _ = two_lungs()
        sitk.WriteImage(sitk.GetImageFromArray(hu), str(d / "ct.nrrd"))
        manifest = make_manifest(d / "cases", 2, shape=(3, 48, 64))
        model = random_model(d).path
        for p in d.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield {"dir": d, "ct": d / "ct.nrrd", "manifest": manifest, "model": model}


def _bad_path(kind: str, d: Path, folder_slot: bool, ext: str) -> Path:
    if kind == "symlink_loop":
        os.symlink(d / f"loop-b{ext}", d / f"loop-a{ext}")
        os.symlink(d / f"loop-a{ext}", d / f"loop-b{ext}")
        return d / f"loop-a{ext}"
    if kind == "no_permission":
        locked = d / "locked"
        locked.mkdir()
        (locked / f"x{ext}").write_bytes(b"x")
        locked.chmod(0)  # neither list nor enter: every path under it is refused
        return locked / f"x{ext}"
    if kind == "device_file":
        return Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(d / f"fifo{ext}")
        return d / f"fifo{ext}"
    if kind == "folder_for_file":
        if folder_slot:  # the reverse: a file where a folder is expected
            (d / "plain-file").write_text("x")
            return d / "plain-file"
        (d / f"folder{ext}").mkdir()
        return d / f"folder{ext}"
    if kind == "file_for_folder":
        (d / "afile").write_text("x")
        return d / "afile" / f"x{ext}"
    if kind == "name_too_long":
        return d / ("n" * 300 + ext)
    raise AssertionError(kind)


def _argv(command: str, slot: str, bad: Path, w: dict, d: Path) -> list:
    run = ["--device", "cpu", "--quiet"]
    if command == "segment":
        ct, out = (bad, d / "labels.nrrd") if slot == "in" else (w["ct"], bad)
        return ["segment", str(ct), "-o", str(out), "--model", str(w["model"]), *run]
    if command == "evaluate":
        manifest, extra = (bad, []) if slot == "in" else (w["manifest"], ["--report", str(bad)])
        return ["evaluate", "--manifest", str(manifest), "--model", str(w["model"]), *run, *extra]
    if command == "train":
        manifest, out = (bad, d / "run") if slot == "in" else (w["manifest"], bad)
        return ["train", "--manifest", str(manifest), "--out", str(out), "--epochs", "1", "--val-fraction", "0.5",
                *run]
    if command == "simulate":
        ct, out = (bad, d / "sim") if slot == "in" else (w["ct"], bad)
        return ["simulate", "--ct", str(ct), "--out", str(out), "--quiet"]
    if command == "bench":
        extra = ["--ct", str(bad)] if slot == "in" else ["--ct", str(w["ct"]), "--json", str(bad)]
        return ["bench", "--quick", "--quiet", "--device", "cpu", *extra]
    raise AssertionError(command)


def _run(argv: list):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command,slot", SLOTS)
def test_os_error_on_a_path_is_one_line_exit_2(world, kind, command, slot, tmp_path):
    with public_folder() as d:
        ext = "" if (command, slot) in FOLDER_SLOTS else (".json" if command in ("evaluate", "bench") and slot == "out"
                                                          else ".csv" if command in ("evaluate", "train") else ".nrrd")
        bad = _bad_path(kind, d, (command, slot) in FOLDER_SLOTS, ext)
        argv = _argv(command, slot, bad, world, d)

        def check() -> None:
            rc, err = _run(argv)
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2, f"exit {rc}: {err}"
            assert len(lines) == 1 and lines[0].startswith("ildseg: error: "), err
            assert "internal error" not in err
            # The line names the path (its last part at least) and the problem.
            assert bad.name[:40] in lines[0] or bad.parent.name in lines[0], lines[0]
            assert re.search(EXPECTED[kind], lines[0]), (kind, lines[0])

        try:
            if kind == "no_permission":
                run_unprivileged(check)  # permission bits do not stop root
            else:
                check()
        finally:
            if (d / "locked").exists():
                (d / "locked").chmod(0o755)


def test_fifo_given_as_input_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the type is checked first."""
    from ILDSegmentationLib.errors import InputError
    from ILDSegmentationLib.imaging.io import read_ct
    os.mkfifo(tmp_path / "ct.nrrd")
    with pytest.raises(InputError, match=r"ct.nrrd: is a named pipe \(FIFO\)"):
        read_ct(tmp_path / "ct.nrrd")


def test_output_over_a_device_file_is_refused_even_for_root(tmp_path):
    """A rename over /dev/null as root would replace the device: refused before any work."""
    from ILDSegmentationLib.imaging.atomicfile import check_writable
    from ILDSegmentationLib.errors import InputError
    os.mkfifo(tmp_path / "out.nrrd")
    for target in (tmp_path / "out.nrrd", Path("/dev/null")):
        with pytest.raises(InputError, match="not a file"):
            check_writable(target)


def test_oserror_that_escapes_is_exit_2_naming_the_path(monkeypatch, tmp_path, capsys):
    """Whatever OSError a library raises late (a folder removed mid-run) is one line, exit 2."""
    import errno

    def boom(args):
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "late.nrrd"))
    monkeypatch.setattr(cli, "_commands", lambda: {"architecture": boom})
    assert cli.main(["architecture"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ildseg: error: {tmp_path / 'late.nrrd'}: permission denied"
