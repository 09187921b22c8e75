"""Which errors are transient, and how long to wait before trying again."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator

from loky.process_executor import BrokenProcessPool

_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM})


class RungUnavailable(Exception):
    """A rung's service could not be reached (a Dask scheduler that did not answer)."""


def is_transient(exc: BaseException, *, starting: bool = False) -> bool:
    """True if ``exc`` means "the machine is short of threads, processes or memory now".

    ``BrokenProcessPool`` counts only while a rung is ``starting``: a pool that breaks
    later broke because a worker died, which the crash ledger handles instead.
    """
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if starting and isinstance(exc, (BrokenProcessPool, RungUnavailable)):
        return True
    return False


def backoff_delays(
    initial: float, factor: float, maximum: float, jitter: float
) -> Iterator[float]:
    """Exponential waits with multiplicative jitter: initial, initial*factor, ..."""
    delay = initial
    while True:
        yield min(maximum, delay) * random.uniform(1 - jitter, 1 + jitter)
        delay *= factor
