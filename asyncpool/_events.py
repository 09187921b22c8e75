"""Statistics and the typed events a pool reports to its ``on_event`` hook."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

EventKind = Literal[
    "creation_failed",
    "fallback",
    "promotion",
    "worker_crash",
    "resubmit",
    "task_retry",
    "deadline",
]


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """One moment in a pool's life; ``details`` holds what is known of it."""

    kind: EventKind
    backend: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class EventHook(Protocol):
    def __call__(self, event: PoolEvent) -> None: ...


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
    resubmitted_chunks: int = 0
    chunks_in_flight: int = 0


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
    resubmitted_chunks: int = 0

    def snapshot(self, backend: str | None, in_flight: int) -> PoolStatistics:
        return PoolStatistics(
            backend=backend, chunks_in_flight=in_flight, **dataclasses.asdict(self)
        )
