"""The project's own error types.

Every problem a user can cause (bad file, bad mask, bad model) raises a subclass of
:class:`ILDSegError` with a one-line message that names the problem. The CLI turns
these into ``ildseg: error: <message>`` and exit code 2; the Slicer panel shows them
with ``slicer.util.errorDisplay``.
"""
from __future__ import annotations

import threading
from typing import Callable, Union


class ILDSegError(Exception):
    """Base class of every error the user can act on."""


class InputError(ILDSegError):
    """The CT, the lung mask or an output location cannot be used."""


class LungMaskError(ILDSegError):
    """The lung mask is empty, does not overlap the CT, or no lung could be found."""


class ModelFileError(ILDSegError):
    """A model file is missing, corrupt, unsafe or of another architecture."""


class Cancelled(ILDSegError):
    """The user cancelled a running job; nothing was written."""


class DeviceError(ILDSegError):
    """The requested compute device is not available."""


#: How callers ask a long job to stop: a threading.Event, or a callable that returns
#: True once the user cancelled (e.g. a Qt button's flag).
CancelCheck = Union[Callable[[], bool], threading.Event, None]


def is_cancelled(cancel: CancelCheck) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())
