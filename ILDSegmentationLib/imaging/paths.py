"""Operating-system errors on paths, said in one line that names the path.

Every input path is checked with :func:`check_input` before anything opens it: a
symlink loop, a name too long, a missing permission, a folder where a file is
expected (or the reverse), and special files (a FIFO, whose ``open`` would block
forever; a device such as ``/dev/zero``, which never ends) are refused as
:class:`~ILDSegmentationLib.errors.InputError`. Whatever ``OSError`` still escapes
(from a library, or a race) is turned into the same kind of line by the command line
with :func:`os_error_message`.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Optional, Union

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

_REASONS = {
    errno.ELOOP: "a symbolic link loop (too many levels of symbolic links)",
    errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "not found",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EEXIST: "already exists",
    errno.ENXIO: "no such device",
    errno.EIO: "input/output error",
}


def reason(e: OSError) -> str:
    """What went wrong, in words (lower case, no path)."""
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path(s) it names, then the problem."""
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{where}: {reason(e)}" if where else f"operating-system error: {reason(e)}"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def check_input(path: PathLike, what: str, folder: bool = False, file: bool = True) -> Path:
    """``path`` exists and can be read: a regular file (``file``) or a folder
    (``folder``) that can be listed. Otherwise InputError, naming ``what`` and the path.
    Never opens a FIFO or a device (by the type of ``stat``, before any ``open``)."""
    p = Path(path)
    try:
        st = os.stat(p)  # follows symlinks: a loop is ELOOP here
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(p):
            raise InputError(f"{what} {p}: a symbolic link to a missing file") from None
        raise InputError(f"{what} {p}: {reason(e) if e.errno != errno.ENOENT else 'file not found'}") from None
    expected = " or ".join(w for w, ok in (("a file", file), ("a folder", folder)) if ok)
    if stat.S_ISDIR(st.st_mode):
        if not folder:
            raise InputError(f"{what} {p}: is a folder, not a file")
        try:
            with os.scandir(p):
                pass
        except OSError as e:
            raise InputError(f"{what} {p}: cannot list the folder: {reason(e)}") from None
        return p
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {p}: is {_kind(st.st_mode)}, not {expected}")
    if not file:
        raise InputError(f"{what} {p}: is a file, not a folder")
    try:
        # A regular file by stat: opening cannot block; O_NONBLOCK covers a swap in between.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"{what} {p}: cannot be opened: {reason(e)}") from None
    os.close(fd)
    return p


def check_output_target(p: Path) -> None:
    """An existing output path must be a regular file (or a link to one), to be
    replaced: never a device, a FIFO or a socket (a rename as root would replace
    ``/dev/zero``), nor a folder."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"output path {p}: {reason(e)}") from None
        if e.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES):
            raise InputError(f"output path {p}: {reason(e)}") from None
        return
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"output path is a folder, not a file: {p}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"output path {p}: is {_kind(st.st_mode)}, not a file: give a file name")


def check_output_path(path: PathLike) -> None:
    """An output (file or folder) whose path the system cannot look up at all: a
    symlink loop, a name too long, no permission to search a folder on the way."""
    p = Path(path)
    try:
        os.stat(p)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES):
            raise InputError(f"output {p}: {reason(e)}") from None


def safe_name(text: str, fill: str = "_", max_length: Optional[int] = None) -> str:
    """A file or folder name made from any text (a case id from a CT's name): letters,
    digits, '.', '_' and '-' are kept, each run of other characters becomes ``fill``;
    no '.', '_' or ``fill`` at either end; "case" when nothing is left; at most
    ``max_length`` characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", fill, text).strip("._" + fill) or "case"
    return cleaned[:max_length] if max_length is not None else cleaned
