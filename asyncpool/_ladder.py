"""The ladder: which rung serves, starting rungs with backoff, falling back, climbing.

It owns the serving rung and the lock around changing it. Starting a rung is retried
``creation_attempts`` times with exponential backoff when the failure is transient (no
thread, no process, no memory); a cluster that does not answer gets one attempt (one
connect timeout, see ``ONE_ATTEMPT``). Then the next rung down is tried. A pool below
its top rung retries the higher ones in the background and climbs back when one starts.
A rung that is replaced, or stops serving, drains: the chunks it holds finish there,
and it is closed once it holds none.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import InitializerFailed, PoolClosed, PoolUnavailable
from ._events import Counters, Emitter
from ._retry import RungUnavailable, RungUnsupported, backoff_delays, is_transient
from ._rungs import (ONE_ATTEMPT, STAND_IN, Listener, Rung, RungState, clean_up_cluster,
                     create_rung)

if TYPE_CHECKING:
    from ._config import PoolConfig
    from ._loop import Background, Loop


class Ladder:
    """The serving rung and its lock; rungs it starts report to ``listener``."""

    def __init__(self, config: PoolConfig, listener: Listener, counters: Counters,
                 emit: Emitter, loop: Loop, *, kick: Callable[[], None],
                 fail_all: Callable[[BaseException], None]) -> None:
        self.config = config
        self.listener = listener
        #: The engine's: called when a rung serves again, and with the error when
        #: none can.
        self.kick = kick
        self.fail_all = fail_all
        self.counters = counters
        self.emit = emit
        self.loop = loop
        self.serving: Rung | None = None
        #: Position of the serving rung in ``config.ladder`` (0 is the top).
        self.index = 0
        #: Rungs that no longer take chunks but still hold some.
        self.draining: list[Rung] = []
        self.closed = False
        #: Why the last rung failed to start, for the error when none of them can.
        self.last_error: BaseException | None = None
        #: Rungs this platform cannot run: never tried again.
        self.unsupported: set[str] = set()
        self._lock = loop.lock()
        self._rebuild: Background | None = None
        self._promoter: Background | None = None
        self._closers: set[Background] = set()
        #: The open under way (cancelled by a close: what it started stops), and set
        #: once it is over (what a close waits for).
        self._opening: Any = None
        self._opened: Any = None
        #: Tries the last _create made (fewer than asked when one said not again).
        self._tried = 0
        #: The initializer failed when a rung (re)started, and when: until
        #: ``promote_after`` later, calls fail with it at once rather than fork again.
        self._init_failure: tuple[InitializerFailed, float] | None = None

    def resume(self) -> None:
        """Workers someone stopped (SIGSTOP) go on: a graceful close waits for what they
        run."""
        for rung in self.rungs():
            rung.resume()

    def rungs(self) -> list[Rung]:
        return [r for r in [self.serving, *self.draining] if r is not None]

    async def open(self) -> None:
        """Start the first rung that can start (or, with warm_start, threads at once
        while processes start in the background)."""
        done = self._opened = self.loop.event()
        try:
            with self.loop.stoppable() as self._opening:  # (cancelled by a close)
                await self._open()
        finally:
            self._opening = None
            done.set()
        if self.closed:  # by another task meanwhile: what this started stays alive
            await self.aclose(kill=True)

    async def _open(self) -> None:
        ladder = self.config.ladder
        async with self._lock:
            stand_in = next((STAND_IN[name] for name in ladder if name in STAND_IN),
                            None) if self.config.warm_start else None
            if stand_in in ladder:
                # The stand-in at once, with the same retries as any rung; if it cannot
                # start either, the ladder is climbed down as without warm_start.
                assert stand_in is not None
                rung = await self._create(stand_in, self.config.creation_attempts)
                if rung is not None:
                    self._install(rung, ladder.index(stand_in), promote_after=0.0)
            if self.serving is None:
                await self._climb_down()

    def rung_to_send_to(self) -> Rung | None:
        """The rung to send to now; None while one is being (re)built. Not a plain
        getter: with no usable rung it starts rebuilding one (read ``serving`` to
        only look)."""
        rung = self.serving
        if rung is not None and rung.usable:
            return rung
        if not self.closed and self._rebuild is None:
            self._rebuild = self.loop.spawn(self._rebuild_now)
        return None

    def coming(self) -> bool:
        """Whether room may come without a chunk finishing: a rung being (re)built, or
        the serving one starting workers in place of lost ones."""
        rung = self.serving
        return self._rebuild is not None or (rung is not None and rung.replacing())

    async def _rebuild_now(self) -> None:
        try:
            async with self._lock:
                rung = self.serving
                if rung is not None and rung.usable:
                    return
                failed = self._init_failure
                if failed is not None and time.monotonic() < failed[1] + (
                        self.config.promote_after):
                    # The same one (its time is kept), its traceback not grown by
                    # each raise; each call gets its own copy (see fail_all).
                    raise failed[0].with_traceback(None)
                start = 0
                crashed = rung is not None and rung.state is RungState.CRASHED
                was = self.index
                if rung is not None:
                    if crashed and isinstance(rung.failure, InitializerFailed):
                        # Its initializer kills or fails its workers: it is not run on
                        # a lower rung instead (in this process it could take the
                        # process down), nor at once on this one (an initializer that
                        # hangs made the calls wait for it twice). Calls fail with its
                        # error for promote_after, then the rung is tried again.
                        self._retire(rung)
                        self.serving = None
                        raise rung.failure
                    if crashed and self.index + 1 < len(self.config.ladder):
                        # A rung that crashed (a lost cluster, no worker can be forked)
                        # is not tried again now: the promoter climbs back to it later.
                        start = self.index + 1
                    self._retire(rung)
                    self.serving = None
                await self._climb_down(start)
                self._init_failure = None
                if crashed and self.index > was:
                    ladder = self.config.ladder
                    why = "stopped serving"
                    if rung is not None and rung.failure is not None:
                        why += f" ({rung.failure})"
                    self._fell(ladder[was], why, ladder[self.index])
        except Exception as error:
            # Nothing can serve: every waiting call learns why.
            if isinstance(error, InitializerFailed) and (
                    self._init_failure is None or self._init_failure[0] is not error):
                self._init_failure = error, time.monotonic()
            self.fail_all(error)
        finally:
            self._rebuild = None
            self.kick()

    def _fell(self, name: str, why: str, to: str, *, stays: bool = False) -> None:
        """Count and report that rung ``name`` gave way to rung ``to``."""
        self.counters.fallbacks += 1
        then = f"the pool stays on the {to} rung" if stays else f"falling back to the {to} rung"
        self.emit("fallback", f"the {name} rung {why}; {then}", failed=name, to=to)

    async def _climb_down(self, start: int = 0) -> None:
        ladder = self.config.ladder
        for index, name in enumerate(ladder):
            if index < start or name in self.unsupported:
                continue
            attempts = 1 if name in ONE_ATTEMPT else self.config.creation_attempts
            rung = await self._create(name, attempts)
            if rung is not None:
                self._install(rung, index)
                return
            if index + 1 < len(ladder):
                why = ("cannot run here" if name in self.unsupported else
                       f"could not start after {self._tried} attempt(s)")
                self._fell(name, why, ladder[index + 1])
        raise PoolUnavailable.after(self.last_error)

    async def _create(self, name: str, attempts: int) -> Rung | None:
        """Try to start rung ``name`` up to ``attempts`` times; None if it could not."""
        config = self.config
        delays = backoff_delays(config.backoff_initial, config.backoff_factor,
                                config.backoff_max, config.backoff_jitter)
        for attempt in range(1, attempts + 1):
            if self.closed:
                raise PoolClosed("the pool was closed")
            self.counters.creation_attempts += 1
            self._tried = attempt
            try:
                return await create_rung(name, config, self.listener, self.loop)
            except RungUnsupported as exc:
                self.last_error = exc
                self.unsupported.add(name)
                self.emit("creation_failed", f"the {name} rung cannot run here: {exc}",
                          rung=name, error=exc)
                return None
            except Exception as exc:
                if not is_transient(exc):
                    self.counters.creation_failures += 1
                    self.emit("creation_failed", f"starting the {name} rung failed: "
                              f"{exc!r}", rung=name, attempt=attempt, error=exc)
                    raise
                # The machine's own error, where the rung's says what it stopped.
                self.last_error = exc.__cause__ if isinstance(
                    exc, RungUnavailable) and exc.__cause__ is not None else exc
                self.counters.creation_failures += 1
                self.emit("creation_failed", f"starting the {name} rung failed (attempt "
                          f"{attempt} of {attempts}): {exc!r}", rung=name, attempt=attempt,
                          error=exc)
                if not getattr(exc, "again", True):
                    return None
            if attempt < attempts:
                # Freed memory and reaped objects may be what the next try needs.
                gc.collect()
                await anyio.sleep(next(delays))
        return None

    def _install(self, rung: Rung, index: int, promote_after: float | None = None) -> None:
        old, self.serving, self.index = self.serving, rung, index
        if old is not None:
            self._retire(old)
        if index > 0 and self._promoter is None:
            delay = self.config.promote_after if promote_after is None else promote_after
            self._promoter = self.loop.spawn(self._promote, delay)
        self.kick()

    def _retire(self, rung: Rung) -> None:
        rung.retire()
        if rung.in_flight == 0 or rung.state is RungState.CRASHED:
            self._close_later(rung, rung.state is RungState.CRASHED)
        else:
            self.draining.append(rung)

    def settled(self, holder: object) -> None:
        """A chunk of the rung ``holder`` got its final report: close the rung if it
        drained."""
        for rung in self.draining:
            if rung is holder and rung.in_flight == 0:
                self.draining.remove(rung)
                self._close_later(rung, False)
                return

    def _close_later(self, rung: Rung, kill: bool) -> None:
        async def close() -> None:
            try:
                await rung.aclose(kill)
            finally:
                self._closers.discard(task)

        task = self.loop.spawn(close)
        self._closers.add(task)

    async def _promote(self, delay: float) -> None:
        """Climb back up the ladder in the background, backing off while it fails."""
        try:
            while self.index > 0 and not self.closed:
                await anyio.sleep(delay)
                if await self._promote_once():
                    delay = self.config.promote_after
                else:
                    delay = min(max(delay, self.config.promote_after) * 2,
                                self.config.promote_max)
        finally:
            self._promoter = None

    async def _promote_once(self) -> bool:
        """Try each rung above the serving one, best first; True if one started."""
        for index, name in enumerate(self.config.ladder[: self.index]):
            if name in self.unsupported:
                continue
            try:
                rung = await self._create(name, 1)
            except InitializerFailed as exc:
                # Warm started on threads: the initializer fails (or hangs) only in
                # worker processes. Trying again would fail the same way.
                self.unsupported.add(name)
                self._fell(name, f"cannot start, its initializer fails there ({exc})",
                           self.config.ladder[self.index], stays=True)
                rung = None
            except Exception:
                rung = None  # _create said why (it was said twice)
            if rung is None:
                continue
            async with self._lock:
                if self.closed:
                    await rung.aclose(True)
                    return True
                before = self.serving.name if self.serving is not None else None
                self._install(rung, index)
            self.counters.promotions += 1
            self.emit("promotion", f"promoted from the {before} rung to the {name} rung",
                      previous=before, to=name)
            return True
        return False

    def abandon(self, pid: int) -> None:
        """Its pool, opened in process ``pid``, was dropped unclosed: said, and every
        rung stops now (see Rung.abandon); nothing in a child forked from there."""
        if os.getpid() != pid:
            return
        logging.getLogger("asyncpool").warning(
            "a ResilientPool was dropped without being closed: its workers are killed "
            "(use `async with ResilientPool()`, or await aclose())")
        self.closed = True
        for rung in self.rungs():
            rung.abandon()
        for task in (self._promoter, self._rebuild):
            if task is not None:
                self.loop.call_soon_threadsafe(task.cancel)

    async def aclose(self, kill: bool) -> None:
        self.closed = True
        if self._opening is not None:
            # Workers starting (an initializer that hangs, say) are killed now: the
            # close waited for nothing, and the open for start_timeout.
            self._opening.cancel()
        for task in (self._promoter, self._rebuild):
            if task is not None:
                task.cancel()
        rungs = self.rungs()
        self.serving, self.draining = None, []
        with anyio.CancelScope(shield=True):
            if self._opened is not None:
                await self._opened.wait()
                rungs += self.rungs()  # installed as the open was cancelled
                self.serving, self.draining = None, []
            for rung in rungs:
                await rung.aclose(kill)
            for task in [t for t in (self._promoter, self._rebuild) if t is not None]:
                await task.wait()
            while self._closers:
                await self._closers.pop().wait()
            await clean_up_cluster(self.config, self.loop)
