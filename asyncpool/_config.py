"""PoolConfig: every setting of a pool, validated once at construction."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypedDict

from ._functions import is_async, name_of

RungName = Literal["process", "thread", "inline"]
RUNGS: tuple[str, ...] = ("process", "thread", "inline")
#: The most workers a pool may have.
MAX_WORKERS = 1024


def usable_cores() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return min(count, MAX_WORKERS)


@dataclass(frozen=True)
class PoolConfig:
    """Settings of a [`ResilientPool`][asyncpool.ResilientPool]; every field is validated.

    A value of the wrong type raises ``TypeError`` and a value out of range
    ``ValueError``, each naming the field. Where a limit may be lifted, ``None`` lifts it
    (``math.inf`` means the same for the time limits and ``rate_limit``).

    Examples:
        ```python
        config = PoolConfig(max_workers=4, max_tasks_per_worker=1000)
        async with ResilientPool(config=config) as pool:  # or the fields as keywords
            ...
        ```
    """

    max_workers: int = dataclasses.field(default_factory=usable_cores)
    """Worker processes (and threads on the thread rung). Default: usable cores."""
    rungs: tuple[RungName, ...] = ("process", "thread", "inline")
    """The ladder, highest first. The pool never climbs above the first entry."""
    creation_attempts: int = 3
    """Tries per rung before stepping down, with exponential backoff between them."""
    backoff_initial: float = 0.2
    """First wait (seconds) between tries to start a rung."""
    backoff_factor: float = 2.0
    """Each wait is this many times the last."""
    backoff_max: float = 5.0
    """The longest wait (seconds)."""
    backoff_jitter: float = 0.1
    """Each wait is multiplied by a random factor in [1 - jitter, 1 + jitter]."""
    promote_after: float = 5.0
    """Seconds on a lower rung before the first try to climb back; doubles on failure."""
    promote_max: float = 60.0
    """The longest wait (seconds) between tries to climb back."""
    chunk_size: int | None = None
    """Items per chunk; None sizes chunks from measured item time."""
    target_chunk_seconds: float = 0.02
    """Auto chunking aims at chunks that take about this long in a worker. Workers send
    results back as they finish (every 5 ms), so a long chunk delays no caller; 20 ms
    keeps the per-chunk round trip (~0.1 ms) near 0.5% and the tail short."""
    max_chunk_size: int = 16384
    """The most items auto chunking puts in one chunk."""
    max_chunks_in_flight: int | None = None
    """Chunks out at once on the local rungs; None means 3 x max_workers (one running
    and two waiting in each worker, so a worker never idles while the loop is busy).
    The Dask rung takes twice the cluster's threads instead."""
    task_retries: int = 2
    """Times an item raising a transient resource error is retried inside the worker."""
    max_crashes_per_item: int = 2
    """Times an item may crash its worker before it is reported as WorkerCrashed."""
    start_timeout: float | None = 60.0
    """Seconds new workers (and their initializer) may take to start."""
    warm_start: bool = False
    """Serve on threads the moment the pool opens while processes start (those threads
    run ``initializer`` in this process)."""
    reuse_workers: bool = False
    """On close, park the idle process workers for the next pool with the same
    settings; ``ResilientPool.close_idle_workers()`` or interpreter exit stops them."""
    rate_limit: float | None = None
    """Items per second started across the pool; None for no limit."""
    initializer: Callable[..., object] | None = dataclasses.field(default=None,
                                                                   compare=False)
    """Called as ``initializer(*initargs)`` once in each worker process before its
    first task (and in each replacement), once per thread on the thread rung, once per
    pool inline. If it raises, or does not return within ``start_timeout``, opening the
    pool fails with InitializerFailed."""
    initargs: tuple[Any, ...] = dataclasses.field(default=(), compare=False)
    """The arguments of ``initializer``."""
    max_tasks_per_worker: int | None = None
    """A worker process that ran this many items is replaced after its chunk."""
    max_worker_memory: int | None = None
    """A worker process that holds more than this many bytes of resident memory after
    an item is replaced (the rest of its chunk goes to another worker). Read between
    items, not while one runs: what an item allocates and frees again is not seen, and
    one that takes more than the machine has is the OS's to stop (a crash)."""
    dask_address: str | None = None
    """A Dask scheduler ("tcp://host:8786"): puts a "dask" rung on top of the ladder
    (needs the ``dask`` extra)."""
    dask_client: Any = dataclasses.field(default=None, compare=False, repr=False)
    """An existing asynchronous ``distributed.Client`` to serve from instead (the pool
    does not close it)."""
    dask_connect_timeout: float = 5.0
    """Seconds an unreachable scheduler (or one with no worker) may cost before the
    pool serves locally."""

    def __post_init__(self) -> None:
        given: object = self.rungs  # any type: a caller's mistake is named below
        rungs = (given,) if isinstance(given, str) else given
        if not isinstance(rungs, tuple | list):
            _type_error("PoolConfig.rungs", self.rungs, "a tuple of rung names")
        object.__setattr__(self, "rungs", tuple(rungs))
        # Each worker holds a process (or a thread) and three descriptors: beyond this,
        # a pool would exhaust the machine before it opened.
        check_integer(self, "max_workers", low=1, high=MAX_WORKERS)
        for name in ("creation_attempts", "max_chunk_size", "max_crashes_per_item"):
            check_integer(self, name, low=1)
        for name in ("chunk_size", "max_chunks_in_flight", "max_tasks_per_worker",
                     "max_worker_memory"):
            check_integer(self, name, low=1, optional=True)
        check_integer(self, "task_retries", low=0)
        # Waits: an infinite one would wait for good.
        for name in ("backoff_initial", "backoff_max", "promote_after", "promote_max"):
            check_number(self, name, low=0.0, finite=True)
        check_number(self, "backoff_factor", low=1.0, finite=True)
        check_number(self, "backoff_jitter", low=0.0, high=1.0)
        check_number(self, "target_chunk_seconds", low=0.0, high=3600.0, strict=True,
                     finite=True)
        check_number(self, "dask_connect_timeout", low=0.0, strict=True, finite=True)
        for name in ("start_timeout", "rate_limit"):
            check_number(self, name, low=0.0, strict=True, optional=True, inf_is_none=True)
        for name in ("warm_start", "reuse_workers"):
            if not isinstance(getattr(self, name), bool):
                _type_error(f"PoolConfig.{name}", getattr(self, name), "True or False")
        initializer: object = self.initializer
        if initializer is not None and not callable(initializer):
            _type_error("PoolConfig.initializer", initializer, "a callable or None")
        if initializer is not None and is_async(initializer):
            raise TypeError(f"PoolConfig.initializer={name_of(initializer)} is an async "
                            "function: "
                            "nothing would await it in the workers; pass a plain "
                            "function (one may call asyncio.run inside)")
        initargs: object = self.initargs
        if not isinstance(initargs, tuple):
            _type_error("PoolConfig.initargs", initargs, "a tuple")
        address: object = self.dask_address
        if address is not None and not isinstance(address, str):
            _type_error("PoolConfig.dask_address", self.dask_address,
                        'a scheduler address such as "tcp://host:8786"')
        client: object = self.dask_client
        if client is not None and not (hasattr(client, "submit")
                                       and hasattr(client, "scheduler")):
            _type_error("PoolConfig.dask_client", client, "a distributed.Client made with "
                        "asynchronous=True (or pass dask_address)")
        ladder_ok = (
            len(self.rungs) > 0
            and all(isinstance(r, str) and r in RUNGS for r in self.rungs)
            and len(set(self.rungs)) == len(self.rungs)
            and list(self.rungs) == sorted(self.rungs, key=RUNGS.index)
        )
        if not ladder_ok:
            unknown = [r for r in self.rungs if isinstance(r, str) and r not in RUNGS]
            hint = did_you_mean(unknown[0], RUNGS) if unknown else ""
            raise ValueError(f"PoolConfig.rungs={self.rungs!r} is invalid: a non-empty, "
                             f"ordered selection of {RUNGS} without repeats{hint}")

    @property
    def ladder(self) -> tuple[str, ...]:
        """The rungs, with "dask" on top when a cluster was given."""
        if self.dask_address is not None or self.dask_client is not None:
            return ("dask", *self.rungs)
        return tuple(self.rungs)

    @property
    def in_flight(self) -> int:
        return self.max_chunks_in_flight or 3 * self.max_workers

    @classmethod
    def build(cls, config: PoolConfig | None, options: dict[str, Any],
              per_call: frozenset[str] = frozenset()) -> PoolConfig:
        """``config`` with ``options`` applied; an unknown option says what it meant,
        one of ``per_call`` (a call's options) where it goes."""
        if config is not None and not isinstance(config, PoolConfig):
            raise TypeError(f"config= takes a PoolConfig, not a {type(config).__name__}: "
                            "PoolConfig(**settings) makes one, or pass the settings as "
                            "keywords: ResilientPool(max_workers=2, ...)")
        names = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name == "ordered":
                raise TypeError("ordered is an option of imap, not of the pool: "
                                "pool.imap(fn, items, ordered=False)")
            if name in per_call and name not in names:
                raise TypeError(f"{name} is an option of each call, not of the pool: "
                                f"pool.map(fn, items, {name}=...)")
            if name not in names:
                hint = did_you_mean(name, names | {"config", "on_event"})
                raise TypeError(f"unknown option {name!r}{hint} (the options are "
                                "PoolConfig's fields, config= and on_event=)")
        return dataclasses.replace(config, **options) if config else cls(**options)


def _say_unknown_fields(init: Any) -> Any:
    """PoolConfig's own ``__init__``, saying what a misspelt field meant (Python's own
    error says only "unexpected keyword argument")."""
    names = sorted(f.name for f in dataclasses.fields(PoolConfig))

    @functools.wraps(init)
    def checked(self: PoolConfig, *args: Any, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in names:
                raise TypeError(f"PoolConfig has no field {name!r}"
                                f"{did_you_mean(name, names)}")
        init(self, *args, **kwargs)
    return checked


setattr(PoolConfig, "__init__", _say_unknown_fields(PoolConfig.__init__))  # noqa: B010


class PoolOptions(TypedDict, total=False):
    """The keyword options of [`ResilientPool`][asyncpool.ResilientPool]: the fields of
    [`PoolConfig`][asyncpool.PoolConfig] other than ``max_workers`` (the pool's own
    argument), each with the same type and meaning. A type checker reports a misspelt
    or mistyped one; at run time it raises ``TypeError`` (with "did you mean") or
    ``ValueError``.

    Examples:
        ```python
        options: PoolOptions = {"start_timeout": 30.0, "max_tasks_per_worker": 1000}
        async with ResilientPool(4, **options) as pool:
            ...
        ```
    """

    rungs: tuple[RungName, ...]
    creation_attempts: int
    backoff_initial: float
    backoff_factor: float
    backoff_max: float
    backoff_jitter: float
    promote_after: float
    promote_max: float
    chunk_size: int | None
    target_chunk_seconds: float
    max_chunk_size: int
    max_chunks_in_flight: int | None
    task_retries: int
    max_crashes_per_item: int
    start_timeout: float | None
    warm_start: bool
    reuse_workers: bool
    rate_limit: float | None
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    max_tasks_per_worker: int | None
    max_worker_memory: int | None
    dask_address: str | None
    dask_client: Any
    dask_connect_timeout: float


def _label(obj: object, name: str) -> str:
    """How an error names the field: ``PoolConfig.timeout``, or a call's ``timeout``."""
    return f"PoolConfig.{name}" if isinstance(obj, PoolConfig) else name


def _type_error(label: str, value: object, wanted: str) -> NoReturn:
    raise TypeError(f"{label}={value!r} is invalid: it must be {wanted}")


def did_you_mean(name: str, names: Iterable[str], cutoff: float = 0.6) -> str:
    """A hint naming the one of ``names`` closest to a misspelt ``name`` ("; did you
    mean 'x'?"), or "" if none is close."""
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_integer(obj: object, name: str, *, low: int, high: int | None = None,
                  optional: bool = False) -> None:
    """``obj.name`` is an integer in bounds (or None, if ``optional``)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    label = _label(obj, name)
    bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
    if not isinstance(value, int) or isinstance(value, bool):
        _type_error(label, value, f"an integer {bound}" + (" or None" if optional else ""))
    if value < low or (high is not None and value > high):
        raise ValueError(f"{label}={value!r} is invalid: it must be an integer {bound}")


def check_number(obj: object, name: str, *, low: float, high: float | None = None,
                 strict: bool = False, optional: bool = False, finite: bool = False,
                 inf_is_none: bool = False) -> None:
    """``obj.name`` is a number in bounds (or None, if ``optional``; ``inf`` becomes
    None if ``inf_is_none``)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    label = _label(obj, name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        _type_error(label, value, "a number" + (" or None" if optional else ""))
    if inf_is_none and value == math.inf:
        object.__setattr__(obj, name, None)
        return
    if isinstance(value, int) and abs(value) > 1e300:  # beyond a float: math would overflow
        raise ValueError(f"{label}={value} is invalid: it is too large; use a number up "
                         "to 1e300" + (" (or inf)" if inf_is_none else ""))
    ok = not math.isnan(value) and (value > low if strict else value >= low)
    ok = ok and (high is None or value <= high) and (not finite or math.isfinite(value))
    if not ok:
        bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high else "")
        raise ValueError(f"{label}={value!r} is invalid: it must be a "
                         f"{'finite ' if finite else ''}number {bound}")
