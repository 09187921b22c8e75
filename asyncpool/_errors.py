"""The exceptions asyncpool raises.

::

    AsyncPoolError
     +-- PoolClosed            a call on a pool that was closed
     +-- WorkerCrashed         an item whose worker died every time it ran
     +-- SerializationError    an item, function or result that cannot cross to a worker
     +-- DeadlineExceeded      (also TimeoutError) map/imap ran past `timeout`; `.partial`

A task's own exception reaches the caller unchanged, with the worker's traceback as its
``__cause__`` (a :class:`RemoteTraceback`). Cancellation exceptions pass through untouched.
"""

from __future__ import annotations

from typing import Any, Final


class _Missing:
    """The type of :data:`MISSING`: a result that was not computed."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "asyncpool.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: Stands in ``DeadlineExceeded.partial`` for every item that had not finished.
MISSING: Final = _Missing()


class AsyncPoolError(Exception):
    """Base class of every error asyncpool raises itself."""


class PoolClosed(AsyncPoolError, RuntimeError):
    """The pool was closed (or never entered with ``async with``)."""


class WorkerCrashed(AsyncPoolError):
    """An item killed the worker process that ran it, each time it was tried."""

    def __init__(self, message: str, *, index: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.index = index
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_crash, (str(self), self.index, self.exitcode))


def _rebuild_crash(message: str, index: int | None, exitcode: int | None) -> WorkerCrashed:
    return WorkerCrashed(message, index=index, exitcode=exitcode)


class SerializationError(AsyncPoolError, TypeError):
    """An argument, function or result could not be pickled or unpickled."""


class DeadlineExceeded(AsyncPoolError, TimeoutError):
    """``map``/``imap`` passed its deadline.

    ``partial`` lists, in input order, every result that had finished and
    :data:`MISSING` for the rest. For ``imap`` it starts at input index ``start``
    (the first item not yet yielded); for ``map`` ``start`` is 0.
    """

    def __init__(self, message: str, partial: list[Any], start: int = 0):
        super().__init__(message)
        self.partial = partial
        self.start = start


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
