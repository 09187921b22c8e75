"""When workers that reach ``max_tasks_per_worker`` are replaced.

A replacement starts early enough that no call waits for it (its initializer may take
longer than the leaving worker's last chunks), yet never more than ``max_workers``
workers run items: the replacement waits for the worker it replaces, which runs on to
its limit, or leaves once it has been idle for :data:`IDLE_SECONDS` (a pool gone quiet
keeps no more than ``max_workers``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._death import ProcState

if TYPE_CHECKING:
    from .._call import Chunk
    from .._config import PoolConfig
    from ._proc import Proc

#: A worker near its limit, with its replacement ready, leaves after this long idle.
IDLE_SECONDS = 1.0


class Recycling:
    def __init__(self, config: PoolConfig) -> None:
        self.limit = config.max_tasks_per_worker
        self.workers = config.max_workers
        #: How long (s) the last worker took to start, its initializer included.
        self.start_seconds = 0.0
        #: Workers near their limit whose replacement was started.
        self.leaving: set[Proc] = set()
        self._forked: dict[Proc, float] = {}

    def forked(self, proc: Proc) -> None:
        self._forked[proc] = time.monotonic()

    def ready(self, proc: Proc) -> None:
        forked = self._forked.pop(proc, None)
        if forked is not None:
            self.start_seconds = time.monotonic() - forked

    def gone(self, proc: Proc) -> None:
        self.leaving.discard(proc)
        self._forked.pop(proc, None)

    def spent(self, proc: Proc) -> bool:
        """It reached its limit: it leaves after the chunks it holds."""
        return self.limit is not None and proc.tasks >= self.limit

    def serves(self, proc: Proc) -> bool:
        """It is ready and will take chunks."""
        return proc.state is ProcState.READY and not proc.killed and not self.spent(proc) and (
            not proc.inbox.holding)

    def live(self, procs: Iterable[Proc]) -> int:
        """Workers that will take chunks: starting or ready, and not about to leave
        (at its limit, replaced early, killed, or its initializer failed)."""
        return sum(1 for p in procs if p.state in (ProcState.STARTING, ProcState.READY)
                   and not p.killed and p.init_error is None and not p.inbox.holding
                   and p not in self.leaving and not self.spent(p))

    def replace_early(self, proc: Proc, chunk: Chunk) -> bool:
        """``proc`` took ``chunk``: True if its replacement should start now, as it will
        leave sooner than a worker takes to start (twice over), and it ran half its
        quota (one whose whole quota is that short, under bursts with pauses, went
        after each burst, its quota not used: 2.5x the forks)."""
        if self.limit is None or proc in self.leaving or not chunk.expected or (
                2 * proc.tasks < self.limit):
            return False
        left = (self.limit - proc.tasks) * chunk.expected / chunk.size
        if left > 2 * self.start_seconds:  # (a start may take longer under load)
            return False
        self.leaving.add(proc)
        return True

    def room(self, procs: Iterable[Proc]) -> int:
        """How many ready workers may run items: those leaving that still run their
        last chunks count against max_workers."""
        return self.workers - sum(
            1 for p in procs if p.chunks and not p.killed and (
                p.state is ProcState.RETIRING or self.spent(p)))

    def idle_leavers(self, procs: list[Proc]) -> list[Proc]:
        """Workers to retire now: idle for :data:`IDLE_SECONDS`, their replacements
        ready (one idle between two calls runs on: its quota is not cut short)."""
        ready = sum(1 for p in procs if self.serves(p) and p not in self.leaving)
        if ready < self.workers:
            return []
        idle_since = time.monotonic() - IDLE_SECONDS
        return [p for p in self.leaving if p.state is ProcState.READY and not p.chunks
                and p.heard <= idle_since]
