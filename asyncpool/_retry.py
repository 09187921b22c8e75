"""Which errors are transient, and how long to wait before trying again.

Worker processes import this module: it imports nothing heavy.
"""

from __future__ import annotations

import errno
TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Iterator

# Out of processes or threads, memory, or file descriptors.
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


class RungUnavailable(Exception):
    """A rung could not start for a reason that may pass (a busy machine, a cluster
    that does not answer yet): the ladder backs off and tries again, or steps down
    (at once with ``again=False``: another try now would fail the same way, as late)."""

    def __init__(self, *args: object, again: bool = True) -> None:
        super().__init__(*args)
        self.again = again


class RungUnsupported(RungUnavailable):
    """This platform cannot run the rung at all (no fork on Windows): the ladder steps
    down at once, and never tries to climb back to it."""


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` means "the machine is short of threads, processes or memory now"."""
    if isinstance(exc, RungUnavailable):
        return True
    # CPython raises a bare RuntimeError, told apart only by its words.
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def retry_again(exc: BaseException, attempt: int, retries: int) -> bool:
    """Whether an item that raised ``exc`` on its ``attempt``-th try (0: the first)
    is tried again: an ``Exception`` that is transient, up to ``retries`` more times
    (``task_retries``). The one rule for the worker's loop and the inline rung's."""
    try:
        return attempt < retries and isinstance(exc, Exception) and is_transient(exc)
    except BaseException:  # its own attribute lookups raise (isinstance reads __class__)
        return False


def backoff_delays(
    initial: float, factor: float, maximum: float, jitter: float
) -> Iterator[float]:
    """Exponential waits with multiplicative jitter: initial, initial*factor, ..."""
    import random  # not at the top: worker processes import this module

    delay = initial
    while True:
        yield min(maximum, delay) * random.uniform(1 - jitter, 1 + jitter)
        delay *= factor


def task_retry_delays() -> Iterator[float]:
    """The waits before a task's retries (``task_retries``) after a transient error:
    50 ms, doubling up to 1 s, 10% jitter. Short: the machine ran out of threads or
    processes for a moment, and the item is waited for meanwhile."""
    return backoff_delays(0.05, 2.0, 1.0, 0.1)
