"""Statistics, and the typed events a pool reports to its hook and its logger."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._errors import public
from ._functions import is_async

logger = logging.getLogger("asyncpool")
# A library does not decide where its logs go: without this, Python's last-resort
# handler would print our WARNINGs to stderr in applications that configure no logging.
logger.addHandler(logging.NullHandler())

EventKind = Literal[
    "creation_failed",
    "fallback",
    "promotion",
    "worker_crash",
    "worker_recycled",
    "resubmit",
    "task_retry",
    "deadline",
    "rung_warning",
]

#: The level each event is logged at by the default hook.
LEVELS: dict[EventKind, int] = {
    "creation_failed": logging.INFO,
    "fallback": logging.WARNING,
    "promotion": logging.INFO,
    "worker_crash": logging.WARNING,
    "worker_recycled": logging.DEBUG,
    "resubmit": logging.DEBUG,
    "task_retry": logging.INFO,
    "deadline": logging.WARNING,
    "rung_warning": logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """One moment in a pool's life, given to the `on_event` hook and logged.

    Examples:
        ```python
        def on_event(event: PoolEvent) -> None:
            if event.kind == "fallback":
                metrics.increment("pool.fallback", tags={"to": event.details["to"]})

        async with ResilientPool(on_event=on_event) as pool:
            ...
        ```
    """

    kind: EventKind
    """`creation_failed` (a rung did not start; it is tried again), `fallback` (the
    pool steps down a rung), `promotion` (it climbs back), `worker_crash` (a worker
    died running items), `worker_recycled` (a worker left after max_tasks_per_worker
    or max_worker_memory), `resubmit` (items sent again), `task_retry` (transient
    errors retried in a worker), `deadline` (a call's timeout passed), `rung_warning`
    (a rung runs below strength or cannot do what was asked: start every worker,
    replace a stuck thread, stop a running task, keep serving from its cluster)."""
    backend: str | None
    """The rung serving when it happened."""
    message: str
    """What happened, in words (also the log message)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What is known of it, by kind: `rung`, `attempt`, `error` (creation_failed);
    `failed`, `to` (fallback); `previous`, `to` (promotion); `pid`, `exitcode` or
    `deaths` (worker_crash); `pid` (worker_recycled); `size`, `reason` (resubmit);
    `retries` (task_retry); `unfinished` (deadline); `rung` (rung_warning)."""


class EventHook(Protocol):
    """What `on_event` takes: a callable of one [`PoolEvent`][asyncpool.PoolEvent].
    It runs on the event loop and must not block; an exception it raises is logged
    and ignored. Events are also logged on the ``asyncpool`` logger either way.

    Examples:
        ```python
        seen: list[PoolEvent] = []
        async with ResilientPool(on_event=seen.append) as pool:
            ...
        ```
    """

    def __call__(self, event: PoolEvent, /) -> object: ...


def log_event(event: PoolEvent) -> None:
    """The default hook: each event on the ``asyncpool`` logger as "<kind>: <message>"."""
    logger.log(LEVELS[event.kind], "%s: %s", event.kind, event.message)


class Emitter:
    """Sends events to the logger and to the pool's ``on_event`` hook, if any."""

    def __init__(self, hook: EventHook | None, backend: Callable[[], str | None]) -> None:
        if hook is not None and (not callable(hook) or is_async(hook)):  # (never awaited)
            raise TypeError(f"on_event={hook!r} is invalid: it must be a plain (not async) "
                            "callable, called on the loop with each PoolEvent")
        self._hooks: list[EventHook] = [log_event] + ([hook] if hook is not None else [])
        self._backend = backend

    def __call__(self, kind: EventKind, message: str, **details: Any) -> None:
        event = PoolEvent(kind, self._backend(), message, details)
        for hook in self._hooks:
            try:
                hook(event)
            except BaseException:  # its own; it runs where the pool's books are kept
                logger.exception("the on_event hook raised on a %s event; ignored", kind)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool's counters, from [`statistics`][asyncpool.ResilientPool.statistics].

    Examples:
        ```python
        stats = pool.statistics()
        log.info("%s: %d done, %d crashes", stats.backend, stats.tasks_completed,
                 stats.worker_crashes)
        ```
    """

    backend: str | None
    """The rung serving now (None when closed or between rungs)."""
    creation_attempts: int = 0
    """Tries to start a rung so far."""
    creation_failures: int = 0
    """Of those, the ones that failed."""
    fallbacks: int = 0
    """Steps down the ladder."""
    promotions: int = 0
    """Climbs back up."""
    tasks_completed: int = 0
    """Items that returned a result."""
    tasks_failed: int = 0
    """Items that ended with an exception (their own, or the pool's)."""
    tasks_abandoned: int = 0
    """Items of calls that ended first (a deadline, a cancellation, an error raised to
    the caller): not run, or run unseen. Completed, failed and abandoned add up to
    every item given; of an input of unknown length (a generator), to those read from
    it when the call ended (a few more may be read, and dropped, as it stops)."""
    chunks_submitted: int = 0
    """Chunks sent to rungs."""
    worker_crashes: int = 0
    """Workers that died unasked: running items, or between them (killed from
    outside, by the OOM killer say). On Dask, the deaths each lost task stood for:
    tasks that ran together on a worker count its deaths once each."""
    workers_recycled: int = 0
    """Workers replaced after max_tasks_per_worker or max_worker_memory."""
    resubmitted_chunks: int = 0
    """Chunks (or parts of chunks) sent again after a crash, a lost worker or a result
    that would not load (not those taken back unstarted from a busy worker)."""
    workers: int = 0
    """Worker processes (threads, Dask threads) serving now: at most ``max_workers``
    locally (a replacement started early, before the worker it replaces leaves, is
    not counted twice)."""
    chunks_in_flight: int = 0
    """Chunks out on rungs now."""
    max_chunks_in_flight: int = 0
    """The most chunks the serving rung takes at once."""
    active_calls: int = 0
    """Calls waiting for results now."""


@dataclass
class Counters:
    """The mutable counters behind [`PoolStatistics`][asyncpool.PoolStatistics]."""

    creation_attempts: int = 0
    creation_failures: int = 0
    fallbacks: int = 0
    promotions: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_abandoned: int = 0
    chunks_submitted: int = 0
    worker_crashes: int = 0
    workers_recycled: int = 0
    resubmitted_chunks: int = 0

    def snapshot(self, backend: str | None, **now: int) -> PoolStatistics:
        return PoolStatistics(backend=backend, **dataclasses.asdict(self), **now)


public(EventHook, PoolStatistics)
