"""Write-then-rename, so a crash, a full disk or a cancel never leaves a file
that looks complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import InputError

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
    if not folder.is_dir():
        if folder.exists():  # e.g. "notes.txt/out.nrrd"
            raise InputError(f"output folder is a file, not a folder: {folder}")
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {folder}")
    if p.is_dir():
        raise InputError(f"output path is a folder, not a file: {p}")
    return p


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
