"""Write-then-rename, so a crash, a full disk or a cancel never leaves a file
that looks complete."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Union

from ..errors import InputError
from .paths import check_output_target, reason

PathLike = Union[str, "os.PathLike[str]"]


#: Extensions a temporary name keeps, lower case, so that writers (ITK picks its writer by
#: the extension, case-sensitively) write the right format under any spelling: ".MHA" made
#: ITK write a header and a raw file elsewhere and leave the named file empty.
_KNOWN_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".json",
                     ".csv", ".safetensors")


def _suffixes(name: str) -> str:
    lower = name.lower()
    for ext in _KNOWN_EXTENSIONS:  # compound ones first
        if lower.endswith(ext):
            return ext
    return Path(name).suffix.lower()


def check_writable(path: PathLike) -> Path:
    """Fail early, before any work, when an output cannot be written.

    Besides the permission bits, a file is really created (and removed) in the
    folder: ``os.access`` says yes to root on a folder it cannot write (/proc, a
    read-only bind mount, root-squashed NFS), and the work would be lost at the end."""
    p = _check_target(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=str(p.parent))
    except OSError as e:
        raise InputError(f"output folder is not writable: {p.parent} ({e.strerror or e})") from None
    os.close(fd)
    _remove(probe)
    return p


def _check_target(path: PathLike) -> Path:
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        folder_stat = os.stat(folder)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise InputError(f"output folder does not exist: {folder}") from None
        if e.errno == errno.ENOTDIR:  # e.g. "notes.txt/sub/out.nrrd"
            raise InputError(f"output folder {folder}: a part of the path is a file, not a folder") from None
        raise InputError(f"output folder {folder}: {reason(e)}") from None
    if not stat.S_ISDIR(folder_stat.st_mode):  # e.g. "notes.txt/out.nrrd"
        raise InputError(f"output folder is a file, not a folder: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {folder}")
    name_max = _name_max(folder)
    # The temporary name adds a dot before and ~20 characters after: say so plainly.
    if len(os.fsencode(p.name)) + 24 > name_max:
        raise InputError(f"output name is too long: {p.name[:40]}... ({len(os.fsencode(p.name))} bytes; "
                         f"this file system allows {name_max}, and ildseg needs about 24 more for a temporary name)")
    check_output_target(p)
    return p


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success rename it to ``path``,
    on any failure remove it. File permissions follow the umask like a normal file."""
    p = _check_target(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".part{_suffixes(p.name)}", dir=str(p.parent))
    except OSError as e:
        raise InputError(f"cannot write to {p.parent}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes 0600 files; give the result the permissions of a normal file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except OSError as e:
        _remove(tmp)
        raise InputError(f"cannot write {p}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
