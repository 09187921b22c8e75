"""The inline rung: items run in a task of the event loop itself.

It needs no thread and no process, so it cannot fail to start: it is the ladder's last
rung. It runs one chunk at a time and gives the loop a turn at least every
:data:`SLICE` seconds (between items: an item itself is not interrupted).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import InitializerFailed
from .._retry import retry_again, task_retry_delays
from .._execute import SKIPPED, own_frames_dropped, plain
from .._remote import portable
from .._loop import preload
from .._share import initialize
from .base import Listener, Rung, RungState

if TYPE_CHECKING:
    from .._call import Chunk
    from .._config import PoolConfig
    from .._loop import Background, Loop

#: The inline rung gives the loop a turn at least this often (seconds).
SLICE = 0.002
#: Loop turns it gives at each slice.
TURNS = 4


class InlineRung(Rung):
    name = "inline"

    def __init__(self, config: PoolConfig, listener: Listener, loop: Loop) -> None:
        super().__init__()
        self.config, self.listener, self.loop = config, listener, loop
        self._cancelled: set[int] = set()
        self._running: Background | None = None
        self._retried = 0

    @classmethod
    async def create(cls, config: PoolConfig, listener: Listener, loop: Loop) -> InlineRung:
        preload(loop)  # else the first call with a deadline imports it on the loop
        if config.initializer is not None:
            # On the loop itself (this rung has no thread to run it in): it cannot be
            # interrupted, so start_timeout is checked when it returns.
            started = time.monotonic()
            try:
                initialize(config.initializer, config.initargs)
            except BaseException as exc:  # whatever it raises (a KeyboardInterrupt, a
                # CancelledError of its own) is its failure, as on the other rungs
                raise InitializerFailed.raised(config.initializer, exc,
                                               "on the event loop") from exc
            spent = time.monotonic() - started
            if config.start_timeout is not None and spent > config.start_timeout:
                raise InitializerFailed.timed_out(
                    config.initializer, config.start_timeout,
                    f" (it ran {spent:.1f} s on the event loop, where the inline rung "
                    "runs it)")
        return cls(config, listener, loop)

    def offer(self) -> int | None:
        return None if self.state is RungState.SERVING and self.in_flight == 0 else 0

    def submit(self, chunk: Chunk) -> None:
        chunk.rung = self
        self._in_flight += 1
        self._running = self.loop.spawn(self._run, chunk)

    def cancel(self, calls: Any) -> None:
        self._cancelled.update(calls)

    async def _run(self, chunk: Chunk) -> None:
        results: list[Any] = []
        errors: dict[int, BaseException] = {}
        first = position = 0
        self._retried = 0
        started = last = time.perf_counter()
        try:
            for piece in chunk.pieces:
                fn, star, call = piece.call.fn, piece.call.star, piece.call.id
                deadline = piece.call.deadline
                for item in piece.items:
                    if call in self._cancelled or anyio.current_time() >= deadline:
                        results.append(SKIPPED)
                    else:
                        # What the task raises, whatever it is (a KeyboardInterrupt, a
                        # CancelledError of its own), is its item's error; only the
                        # waits between tries are the loop's, and cancelled with it.
                        value = await self._call(fn, item, star, piece.call)
                        try:
                            plain(value)
                        except TypeError as exc:
                            value = _Raised(exc)
                        if type(value) is _Raised:
                            results.append(None)
                            # Nothing crosses: an Exception comes as it is (as on
                            # the thread rung), a BaseException as a RemoteError.
                            error = own_frames_dropped(value.error)
                            errors[position] = error if isinstance(error, Exception) else (
                                portable(error))
                            # Its traceback leads back to this frame (through the
                            # frames it was raised in): no local of it may stay here.
                            del error
                        else:
                            results.append(value)
                        del value
                    position += 1
                    if time.perf_counter() - last >= SLICE:
                        self.listener.chunk_progress(chunk, first, position, results, errors)
                        results, errors, first = [], {}, position
                        # A few turns: a caller's cancel scope that expired meanwhile
                        # is delivered, its call ended, before the next item starts.
                        for _ in range(TURNS):
                            await anyio.lowlevel.checkpoint()
                        last = time.perf_counter()
        finally:
            if position > first:
                self.listener.chunk_progress(chunk, first, position, results, errors)
            self._in_flight -= 1
            # One chunk at a time: no chunk of a cancelled call is left to skip.
            self._cancelled.clear()
            self.listener.chunk_done(chunk, position, time.perf_counter() - started,
                                     self._retried)
            # A task's error holds this frame (its caller's caller) while it lives.
            del results, errors

    async def _call(self, fn: Any, item: Any, star: bool, call: Any) -> Any:
        retries = self.config.task_retries
        delays = task_retry_delays()
        for attempt in range(retries + 1):
            try:
                return fn(*item) if star else fn(item)
            except BaseException as exc:
                if not retry_again(exc, attempt, retries):
                    return _Raised(exc)
                until = anyio.current_time() + next(delays)
                while True:  # (the caller may stop waiting meanwhile: then, no retry)
                    now = anyio.current_time()
                    if call.id in self._cancelled or now >= call.deadline:
                        return _Raised(exc)
                    if now >= until:
                        break
                    await anyio.sleep(min(until - now, 0.01))
            self._retried += 1

    async def aclose(self, kill: bool) -> None:
        self._move(RungState.CLOSED)
        if self._running is not None:
            if kill:
                self._running.cancel()
            await self._running.wait()


class _Raised:
    """What a task raised (a result of its own may be any object, an exception too)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
