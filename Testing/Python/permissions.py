"""File modes and privileges for tests.

- :func:`umask` sets the process umask for a block (subprocesses started inside it
  inherit it), so a test knows the mode a normal file gets: 0o666 & ~umask.
- :func:`assert_normal_modes` checks that outputs got exactly that mode (``mkstemp``
  makes 0o600 files: a write-then-rename that forgets to fix the mode leaves them so).
- :func:`run_unprivileged` and :func:`unprivileged_command` run a check, or a command,
  as an ordinary user.
  Permission bits do not stop root, and CI runs as root: there the check runs in a
  forked child (or a subprocess) under uid/gid 65534 ("nobody"); only where that is
  impossible (no CAP_SETUID) does the test skip. :func:`public_folder` gives a folder
  that user can reach (pytest's own temporary folders are 0o700 and root's).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Sequence, Union

import pytest

REPO = Path(__file__).resolve().parents[2]

NOBODY = 65534


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Union[str, Path]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_normal_modes(paths: Iterable[Union[str, Path]], expected: int) -> None:
    """Every path is a file with mode ``expected`` (written out by the caller, e.g.
    0o640 under umask 027)."""
    paths = list(paths)
    assert paths, "no outputs to check"
    wrong = {str(p): oct(mode_of(p)) for p in paths if mode_of(p) != expected}
    assert not wrong, f"outputs without mode {oct(expected)}: {wrong}"


def files_in(folder: Path) -> list:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def privileged() -> bool:
    return os.geteuid() == 0


def drop_privileges() -> None:
    """In a forked child: become uid/gid 65534 with no supplementary groups."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def unprivileged_command(cmd: Sequence[str]) -> List[str]:
    """``cmd`` to run as an ordinary user: as it is when this process is not root, else
    under ``setpriv`` as uid/gid 65534 (util-linux; it runs the interpreter even where
    the venv's python lies under a folder only root may enter, as /root here)."""
    if not privileged():
        return [str(c) for c in cmd]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot run the command as an ordinary user")
    _skip_unless_checkout_readable()
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *map(str, cmd)]


def _skip_unless_checkout_readable() -> None:
    """An ordinary user must read the checkout to import the package (lazily imported
    modules too). A checkout inside a folder only root may enter (``mktemp -d`` makes
    0700 ones) cannot be; then say so and skip instead of failing on an import."""
    folders = [REPO, *REPO.parents]
    if all(os.stat(f).st_mode & stat.S_IXOTH for f in folders) and os.stat(REPO).st_mode & stat.S_IROTH:
        return
    pytest.skip(f"an ordinary user (uid {NOBODY}) cannot read this checkout ({REPO}): clone it into a folder "
                "others may enter to run the permission checks")


@contextlib.contextmanager
def public_folder() -> Iterator[Path]:
    """A fresh folder that every user can read and traverse, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="ildseg-test-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_unprivileged(check: Callable[[], None]) -> None:
    """Run ``check()`` as an ordinary user: directly when this process is not root,
    else in a forked child under uid/gid 65534. A failure in the child fails the test
    with the child's traceback."""
    if not privileged():
        check()
        return
    _skip_unless_checkout_readable()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        code = 0
        try:
            try:
                drop_privileges()
            except OSError as e:
                os.write(write, f"cannot drop privileges: {e}".encode())
                code = 3
            else:
                check()
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            os.write(write, traceback.format_exc().encode())
            code = 1
        finally:
            os.close(write)
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        report = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        pytest.skip(report)
    assert code == 0, f"the unprivileged check failed (exit {code}):\n{report}"
