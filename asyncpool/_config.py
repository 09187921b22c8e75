"""PoolConfig: every setting of a pool, validated once at construction."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

Rung = Literal["process", "thread", "inline"]
RUNGS: tuple[str, ...] = ("process", "thread", "inline")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PoolConfig:
    """Settings of a :class:`~asyncpool.ResilientPool`; every field is validated."""

    #: Worker processes (and threads on the thread rung). Default: usable cores.
    max_workers: int = dataclasses.field(default_factory=_cpu_count)
    #: The ladder, highest first. The pool never climbs above the first entry.
    rungs: tuple[Rung, ...] = ("process", "thread", "inline")
    #: Tries per rung before stepping down, with exponential backoff between them.
    creation_attempts: int = 3
    backoff_initial: float = 0.2
    backoff_factor: float = 2.0
    backoff_max: float = 5.0
    #: Each wait is multiplied by a random factor in [1 - jitter, 1 + jitter].
    backoff_jitter: float = 0.1
    #: Seconds on a lower rung before the first try to climb back; doubles on failure.
    promote_after: float = 5.0
    promote_max: float = 60.0
    #: Items per chunk; None sizes chunks from measured item time.
    chunk_size: int | None = None
    #: Auto chunking aims at chunks that take about this long in a worker. 50 ms keeps the
    #: per-chunk round trip (~0.5 ms through loky) under 1% while the tail stays short.
    target_chunk_seconds: float = 0.05
    max_chunk_size: int = 16384
    #: Chunks in flight across the pool; None means 2 x max_workers.
    max_chunks_in_flight: int | None = None
    #: Times an item raising a transient resource error is retried inside the worker.
    task_retries: int = 2
    #: Times an item may crash its worker before it is reported as WorkerCrashed.
    max_crashes_per_item: int = 2
    #: Seconds the first (warm-up) task of a new process rung may take.
    start_timeout: float = 60.0
    #: Serve on threads the moment the pool opens while processes start off the loop.
    warm_start: bool = False
    #: On close, park the healthy process workers for the next pool of the same size
    #: (which then starts in about a millisecond); ResilientPool.close_idle_workers()
    #: or interpreter exit stops them.
    reuse_workers: bool = False
    #: Items per second started across the pool (aiolimiter); None for no limit.
    rate_limit: float | None = None
    #: A Dask scheduler ("tcp://host:8786") or an existing distributed.Client: puts a
    #: "dask" rung on top of the ladder (needs ``pip install 'asyncpool[dask]'``).
    dask_address: str | None = None
    dask_client: Any = dataclasses.field(default=None, compare=False, repr=False)
    #: Seconds an unreachable scheduler may cost before the pool serves locally.
    dask_connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise ValueError(f"PoolConfig.{field}={value!r} is invalid: {allowed}")

        def positive_int(field: str) -> None:
            value = getattr(self, field)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            need(ok, field, "it must be an integer >= 1")

        def number(field: str, *, low: float = 0.0, strict: bool = False) -> None:
            value = getattr(self, field)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (value > low if strict else value >= low)
            need(ok, field, f"it must be a number {'>' if strict else '>='} {low}")

        positive_int("max_workers")
        positive_int("creation_attempts")
        positive_int("max_chunk_size")
        positive_int("max_crashes_per_item")
        if self.chunk_size is not None:
            positive_int("chunk_size")
        if self.max_chunks_in_flight is not None:
            positive_int("max_chunks_in_flight")
        number("backoff_initial")
        number("backoff_factor", low=1.0)
        number("backoff_max")
        number("backoff_jitter")
        need(self.backoff_jitter <= 1, "backoff_jitter", "it must be between 0 and 1")
        number("promote_after")
        number("promote_max")
        number("target_chunk_seconds", strict=True)
        number("start_timeout", strict=True)
        number("dask_connect_timeout", strict=True)
        need(self.dask_address is None or isinstance(self.dask_address, str),
             "dask_address", 'it must be a scheduler address such as "tcp://host:8786"')
        task_retries_ok = isinstance(self.task_retries, int) and self.task_retries >= 0
        need(task_retries_ok, "task_retries", "it must be an integer >= 0")
        if self.rate_limit is not None:
            number("rate_limit", strict=True)
        rungs = tuple(self.rungs) if not isinstance(self.rungs, str) else (self.rungs,)
        object.__setattr__(self, "rungs", rungs)
        ladder_ok = (
            len(rungs) > 0
            and all(r in RUNGS for r in rungs)
            and len(set(rungs)) == len(rungs)
            and list(rungs) == sorted(rungs, key=RUNGS.index)
        )
        need(ladder_ok, "rungs", f"a non-empty, ordered selection of {RUNGS} without repeats")

    @property
    def ladder(self) -> tuple[str, ...]:
        """The rungs, with "dask" on top when a cluster was given."""
        if self.dask_address is not None or self.dask_client is not None:
            return ("dask", *self.rungs)
        return tuple(self.rungs)

    @property
    def in_flight(self) -> int:
        return self.max_chunks_in_flight or 2 * self.max_workers
