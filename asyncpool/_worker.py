"""What runs inside a worker: one chunk of items, each with its own outcome.

A chunk travels as bytes that the parent pickled (so a bad argument is found in the
parent, with its item) and comes back as bytes the worker pickled (so a bad result is
found in the worker, with its item). Errors keep their traceback as text.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._errors import SerializationError
from ._retry import backoff_delays, is_transient

class Outcomes(NamedTuple):
    """What a chunk came back with."""

    results: list[Any]
    #: position in the chunk -> (exception, its traceback as text); None if none failed
    errors: dict[int, tuple[BaseException, str]] | None
    #: time spent running the items, for chunk sizing
    seconds: float
    #: retries made after transient errors, for the task_retry event
    retried: int = 0


def capture(exc: BaseException) -> tuple[BaseException, str]:
    return exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def run_items(fn: Callable[..., Any], items: Sequence[Any], star: bool, retries: int) -> Outcomes:
    """Call ``fn`` on each item; one item's exception never touches the others."""
    results: list[Any] = []
    append = results.append
    errors: dict[int, tuple[BaseException, str]] | None = None
    retried = 0
    start = time.perf_counter()
    for position, item in enumerate(items):
        try:
            append(fn(*item) if star else fn(item))
        except Exception as exc:
            if retries and is_transient(exc):
                ok, value, attempts = _retry(fn, item, star, retries)
                retried += attempts
                if ok:
                    append(value)
                    continue
                exc = value
            append(None)
            if errors is None:
                errors = {}
            errors[position] = capture(exc)
    return Outcomes(results, errors, time.perf_counter() - start, retried)


def _retry(fn: Callable[..., Any], item: Any, star: bool,
           retries: int) -> tuple[bool, Any, int]:
    # The item ran short of threads or memory: wait off the loop (we are in a worker)
    # and try again, as the pool does when it creates a rung.
    delays = backoff_delays(0.05, 2.0, 1.0, 0.1)
    error: BaseException | None = None
    for attempt in range(1, retries + 1):
        time.sleep(next(delays))
        try:
            return True, (fn(*item) if star else fn(item)), attempt
        except Exception as exc:
            if not is_transient(exc):
                return False, exc, attempt
            error = exc
    return False, error, retries


def run_chunk(payload: bytes, marker_dir: str | None, key: str) -> bytes:
    """The function a process rung runs: unpickle, run, pickle, mark start and end.

    While the chunk runs, ``marker_dir`` holds a file ``<key>.<pid>``: after a crash the
    parent reads which chunk was running in which dead worker.
    """
    marker = None
    if marker_dir is not None:
        marker = os.path.join(marker_dir, f"{key}.{os.getpid()}")
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        try:
            fn, items, star, retries = pickle.loads(payload)
        except Exception as exc:
            return pickle.dumps(("unpickle", capture(_as_picklable(exc))), pickle.HIGHEST_PROTOCOL)
        outcome = run_items(fn, items, star, retries)
        return _dump_outcome(outcome)
    finally:
        if marker is not None:
            os.unlink(marker)


def _dump_outcome(outcome: Outcomes) -> bytes:
    try:
        return pickle.dumps(("ok", *outcome), pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    # Some result or exception would not pickle: find it, item by item, and put an
    # error in its place so the rest of the chunk still comes home.
    results, errors, seconds, retried = outcome
    errors = dict(errors or {})
    for position, value in enumerate(results):
        error = errors.get(position)
        try:
            # The same pickler as the final dump below: what cloudpickle can take by
            # value, plain pickle may still refuse.
            pickle.dumps(value if error is None else error, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            what = "result" if error is None else "exception"
            bad = value if error is None else error[0]
            results[position] = None
            errors[position] = capture(
                SerializationError(
                    f"the {what} of this item is a {type(bad).__qualname__}, which cannot "
                    f"be pickled back to the parent ({exc!r}); return plain data instead"
                )
            )
    return pickle.dumps(("ok", results, errors, seconds, retried), pickle.HIGHEST_PROTOCOL)


def _as_picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return SerializationError(repr(exc))


def noop() -> int:
    return os.getpid()
