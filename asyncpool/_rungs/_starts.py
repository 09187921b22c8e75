"""What the process rung's supervisor knows of its forks: the workers starting, by when
each must be ready, and its backoff while starts fail.

Failures are counted in rounds. Workers forked together that die together (an OOM
killer's sweep, one bad moment) are one failed try, not one each: with ``max_workers``
at ``creation_attempts`` or more, a single such moment spent every attempt, with no
backoff between them, and the rung gave up at once.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .._errors import InitializerFailed
from .._retry import RungUnavailable, backoff_delays
from ._death import ProcState, had_its_time, initializer_failure, server_stopped

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._config import PoolConfig
    from ._proc import Proc

#: The least pause (s) before the next fork after a failed try: with a backoff of 0,
#: a fork that failed at once was tried again without the supervisor ever awaiting
#: (the event loop froze).
FLOOR = 0.01


class Starts:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        #: Each starting worker: by when it must be ready, and the round it was forked in.
        self.starting: dict[Proc, tuple[float, int]] = {}
        #: Failed tries since a worker last started.
        self.failures = 0
        self._round = 0  # failed tries ever: a round's workers fail it once
        self._retry_at = 0.0  # no fork before this (backoff)
        #: A worker's initializer hung past start_timeout: trying again costs as long.
        self.hung = False
        self._delays = self._fresh()

    def _fresh(self) -> Iterator[float]:
        config = self.config
        return backoff_delays(config.backoff_initial, config.backoff_factor,
                              config.backoff_max, config.backoff_jitter)

    def backoff(self) -> float:
        """Seconds until the next fork may go (0: now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def out_of_attempts(self) -> bool:
        return self.failures >= self.config.creation_attempts

    def forked(self, proc: Proc) -> None:
        self.starting[proc] = (
            time.monotonic() + (self.config.start_timeout or math.inf), self._round)

    def next_deadline(self) -> float:
        """Seconds until the first starting worker is late (inf: none starts)."""
        now = time.monotonic()
        return min([deadline - now for deadline, _ in self.starting.values()],
                   default=math.inf)

    def any_started(self) -> bool:
        return any(p.started.is_set() for p in self.starting)

    def settle(self) -> BaseException | None:
        """Take the workers whose start ended off the list (killing one past its
        deadline); the error of the last that failed, if any."""
        error: BaseException | None = None
        for proc, (deadline, forked_in) in list(self.starting.items()):
            failed: BaseException | None = None
            if proc.init_error is not None:  # a fork failed, or the initializer did
                failed = initializer_failure(proc.init_error, proc.pid is not None,
                                             self.config.initializer) or proc.init_error
            elif proc.state is ProcState.STARTING and time.monotonic() >= deadline:
                failed = self._late(had_its_time(proc, deadline, self.config.start_timeout))
                proc.kill()
                if proc.pid is None and server_stopped(proc.server):
                    # Stopped (SIGSTOP): every other try would wait as long for it.
                    self.failures = self.config.creation_attempts
            elif proc.state is ProcState.STARTING:
                continue
            else:  # it started: what failed before is behind us
                self.failures, self._retry_at, self._delays = 0, 0.0, self._fresh()
                self.hung = False
            del self.starting[proc]
            if failed is not None:
                error = failed
                if forked_in == self._round:
                    self.failed()
        return error

    def _late(self, forked: bool) -> BaseException:
        """A worker past its start deadline: workers start in milliseconds, so with an
        initializer it is what hangs (as when the pool opened); unless the fork server
        did not fork it (stopped, say)."""
        initializer = self.config.initializer
        if initializer is not None and forked:
            self.hung = True
            return InitializerFailed.timed_out(initializer, self.config.start_timeout)
        return RungUnavailable("a new worker did not start in time" + (
            "" if forked else " (the fork server did not fork it in time)"))

    def failed(self) -> None:
        """A try failed (a fork, or a round's start): back off before the next."""
        self.failures += 1
        self._round += 1
        self._retry_at = time.monotonic() + max(FLOOR, next(self._delays))
