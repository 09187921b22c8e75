"""Statistics, and the typed events a pool reports to its hook and its logger."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
]

#: The level each event is logged at by the default hook.
LEVELS: dict[str, int] = {
    "creation_failed": logging.INFO,
    "fallback": logging.WARNING,
    "promotion": logging.INFO,
    "worker_crash": logging.WARNING,
    "worker_recycled": logging.DEBUG,
    "resubmit": logging.DEBUG,
    "task_retry": logging.INFO,
    "deadline": logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """One moment in a pool's life; ``details`` holds what is known of it."""

    kind: EventKind
    backend: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class EventHook(Protocol):
    def __call__(self, event: PoolEvent) -> None: ...


def log_event(event: PoolEvent) -> None:
    """The default hook: each event on the ``asyncpool`` logger as "<kind>: <message>"."""
    logger.log(LEVELS.get(event.kind, logging.INFO), "%s: %s", event.kind, event.message)


class Emitter:
    """Sends events to the logger and to the pool's ``on_event`` hook, if any."""

    def __init__(self, hook: EventHook | None, backend: Callable[[], str | None]) -> None:
        self.hooks: list[EventHook] = [log_event] + ([hook] if hook is not None else [])
        self._backend = backend

    def __call__(self, kind: EventKind, message: str, **details: Any) -> None:
        event = PoolEvent(kind, self._backend(), message, details)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("the on_event hook raised on a %s event; ignored", kind)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool's counters, from :meth:`ResilientPool.statistics`."""

    backend: str | None
    creation_attempts: int = 0
    creation_failures: int = 0
    fallbacks: int = 0
    promotions: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    chunks_submitted: int = 0
    worker_crashes: int = 0
    workers_recycled: int = 0
    resubmitted_chunks: int = 0
    #: Worker processes (threads, Dask threads) of the serving rung now.
    workers: int = 0
    #: Chunks out on rungs now, and the most the serving rung takes at once.
    chunks_in_flight: int = 0
    max_chunks_in_flight: int = 0
    #: Calls waiting for results now.
    active_calls: int = 0


@dataclass
class Counters:
    """The mutable counters behind :class:`PoolStatistics`."""

    creation_attempts: int = 0
    creation_failures: int = 0
    fallbacks: int = 0
    promotions: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    chunks_submitted: int = 0
    worker_crashes: int = 0
    workers_recycled: int = 0
    resubmitted_chunks: int = 0

    def snapshot(self, backend: str | None, **now: int) -> PoolStatistics:
        return PoolStatistics(backend=backend, **dataclasses.asdict(self), **now)
