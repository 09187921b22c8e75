"""The options of one call (``run``, ``map``, ``starmap``, ``imap``), defined once.

`CallKwargs` is what the public methods accept as ``**options`` (so mypy checks
each name and type), and `CallOptions` the validated, frozen record the engine
reads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ._config import PoolConfig, check_integer, check_number, did_you_mean
from ._errors import public
from ._functions import is_async

CancelRunning = Literal["finish", "kill"]
ProgressCallback = Callable[[int, int | None], object]
Progress = bool | ProgressCallback | None


class CallKwargs(TypedDict, total=False):
    """The per-call options of `run`, `map`, `starmap` and `imap`, as keywords. Each
    may be left out. A misspelt one raises ``TypeError`` (with "did you mean"), a
    value out of range ``ValueError``.

    Examples:
        ```python
        results = await pool.map(fn, items, timeout=10, chunk_size=100,
                                 return_exceptions=True)
        ```
    """

    timeout: float | None
    """Seconds for the whole call: waiting for a worker, a rate limit, the input or a
    rung starting included; then [`DeadlineExceeded`][asyncpool.DeadlineExceeded].
    Default `None` (or `inf`): no deadline."""
    kill_on_timeout: bool
    """At the deadline, kill the workers running this call's items (and what they
    started). Default `False`: they finish unseen."""
    cancel_running: CancelRunning
    """When the calling task is cancelled: `"finish"` (default) lets the running items
    finish unseen, `"kill"` kills their workers. Items not yet started never run."""
    chunk_size: int | None
    """Items per chunk for this call. Default `None`: sized from the items' measured
    time and size. No effect on `run` (one item)."""
    rate_limit: float | None
    """Items started per second for this call, on top of the pool's own limit.
    Default `None`: no limit."""
    progress: Progress
    """`True` draws a tqdm bar (if tqdm is installed; else a log line at INFO every
    2 s), a callable is called as `progress(done, total)` as items finish (`total` is
    `None` for an input of unknown length). Default `None`: nothing."""
    resources: dict[str, float] | None
    """Dask: the resources each task needs (`submit(resources=...)`). Ignored, with a
    DEBUG log, when the pool has no Dask cluster; so are the three below."""
    workers: str | list[str] | None
    """Dask: the workers its tasks may run on."""
    allow_other_workers: bool
    """Dask: whether other workers may run them when those are busy."""
    priority: int
    """Dask: the tasks' priority."""


@dataclass(frozen=True, slots=True)
class CallOptions:
    """The validated options of one call."""

    timeout: float | None = None
    kill_on_timeout: bool = False
    cancel_running: CancelRunning = "finish"
    chunk_size: int | None = None
    rate_limit: float | None = None
    progress: Progress = None
    resources: dict[str, float] | None = None
    workers: str | list[str] | None = None
    allow_other_workers: bool = False
    priority: int = 0
    return_exceptions: bool = False

    @classmethod
    def build(cls, return_exceptions: bool = False, own: tuple[str, ...] = (), /,
              **options: Any) -> CallOptions:
        """The options of one call; ``own`` names the method's other keywords (for
        "did you mean"). Only the caller's options are keywords."""
        if not options and return_exceptions is False:
            return _DEFAULT
        if not isinstance(return_exceptions, bool):
            raise TypeError(f"return_exceptions={return_exceptions!r} is invalid: it "
                            "must be True or False")
        names = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in names:
                if name in _POOL_FIELDS:
                    raise TypeError(f"{name} is a setting of the pool, not of a call: "
                                    f"ResilientPool({name}=...)")
                if name == "ordered":
                    raise TypeError("ordered is an option of imap (map and starmap keep "
                                    "input order)")
                hint = did_you_mean(name, [*names, *own], cutoff=0.7) or (
                    f"; keyword arguments for the function go through "
                    f"functools.partial(fn, {name}=...)")
                raise TypeError(f"unknown option {name!r}{hint}")
        made = cls(return_exceptions=return_exceptions, **options)
        made._check()
        return made

    def _check(self) -> None:
        for name in ("timeout", "rate_limit"):
            # inf: no deadline, or no limit (its documented meaning).
            check_number(self, name, low=0.0, strict=True, optional=True, inf_is_none=True)
        for name in ("kill_on_timeout", "allow_other_workers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} is invalid: it must be "
                                "True or False")
        if self.cancel_running not in ("finish", "kill"):
            raise ValueError(f"cancel_running={self.cancel_running!r} is invalid: use "
                             "'finish' or 'kill'")
        check_integer(self, "chunk_size", low=1, optional=True)
        progress = self.progress
        # `is`, not `in`: 0, 0.0 and 1+0j equal False or True.
        if progress is not None and type(progress) is not bool and (
                not callable(progress) or is_async(progress)):  # (never awaited)
            raise TypeError(f"progress={progress!r} is invalid: use True, False, None or "
                            "a plain (not async) callable(done, total)")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"priority={self.priority!r} is invalid: it must be an integer")
        if not -2**63 <= self.priority < 2**63:  # (the scheduler dropped the worker)
            raise ValueError(f"priority={self.priority!r} is invalid: it must fit in 64 "
                             "bits (-2**63 to 2**63 - 1)")
        resources = self.resources
        if resources is not None and not (isinstance(resources, dict) and all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in resources.items())):
            raise TypeError(f"resources={resources!r} is invalid: it must be a dict of "
                            "resource names to amounts, such as {'GPU': 1}, or None")
        for key, amount in (resources or {}).items():
            if not 0 <= amount < math.inf:  # (nan, inf: a task no worker ever meets)
                raise ValueError(f"resources={resources!r} is invalid: {key!r} must be a "
                                 "finite amount, 0 or more")
        workers = self.workers
        if workers is not None and not (isinstance(workers, str) or (
                isinstance(workers, list | tuple | set)
                and all(isinstance(w, str) for w in workers))):
            raise TypeError(f"workers={workers!r} is invalid: it must be a worker's address "
                            "or name, a list of them, or None")

    @property
    def kill_on_cancel(self) -> bool:
        """Whether cancelling the call kills the workers running its items."""
        return self.cancel_running == "kill"

    @property
    def placed(self) -> bool:
        """Whether its tasks ask for workers with ``resources`` or by name (Dask)."""
        return self.resources is not None or self.workers is not None

    @property
    def dask(self) -> dict[str, Any]:
        """The options passed to Dask's ``submit`` on the dask rung."""
        found: dict[str, Any] = {}
        if self.resources is not None:
            found["resources"] = self.resources
        if self.workers is not None:
            found["workers"] = self.workers
            found["allow_other_workers"] = self.allow_other_workers
        if self.priority:
            found["priority"] = self.priority
        return found


_DEFAULT = CallOptions()
#: The options a call takes (a pool given one is told so).
PER_CALL = frozenset(f.name for f in dataclasses.fields(CallOptions))
#: Settings of the pool that a call does not take (said so, not "did you mean").
_POOL_FIELDS = frozenset(f.name for f in dataclasses.fields(PoolConfig)) | {"on_event"}


public(CallKwargs)
