"""The thread rung: a fixed set of threads, all started up front.

``ThreadPoolExecutor`` starts threads inside ``submit()`` after queueing the item, so a
failed thread start there raises while the item stays queued: sending it again would run
it twice. Starting every thread here means ``submit`` never starts one.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import anyio

from .. import _wire
from .._errors import InitializerFailed
from .._execute import cut_after_running, execute
from .._rebalance import STUCK_SECONDS
from .._remote import portable
from .._loop import preload
from .._share import initialize
from .._retry import RungUnavailable
from .base import Listener, Rung, RungState

if TYPE_CHECKING:
    from .._call import Chunk
    from .._config import PoolConfig
    from .._loop import Loop

logger = logging.getLogger("asyncpool")

class _Look:
    """Queued to wake an idle thread blocked with nothing running: a chunk now runs."""


_LOOK = _Look()
#: A running chunk's progress is the worker's ([_wire.SEQ, POSITION, LOADING]) and,
#: at this index, when it was last heard of (see _take_back).
_HEARD = 3


class ThreadRung(Rung):
    name = "thread"

    def __init__(self, config: PoolConfig, listener: Listener, loop: Loop) -> None:
        super().__init__()
        self.config, self.listener, self.loop = config, listener, loop
        self._queue: queue.SimpleQueue[Chunk | _Look | None] = queue.SimpleQueue()
        #: Calls whose items are no longer wanted (read by the threads). A call leaves
        #: with its last chunk here, so that a service's timeouts do not pile up.
        self._cancelled: set[int] = set()
        #: How many chunks held here (queued or running) carry each call.
        self._holding: collections.Counter[int] = collections.Counter()
        self.threads: list[threading.Thread] = []
        self._init_errors: list[BaseException] = []
        #: The chunk each thread runs, with its copy of the items' lists (which
        #: _take_back may cut) and its progress (see _HEARD); and the threads left
        #: running an item that was to be killed: a new thread serves in place of
        #: each (see kill).
        self._running: dict[threading.Thread, tuple[Chunk, list[Any], list[Any]]] = {}
        self._stuck: set[threading.Thread] = set()
        #: Threads that left when told to (see aclose), and the closer's wake-up.
        self._done: set[threading.Thread] = set()
        self._exits: Any = None
        #: Their chunks: their threads report nothing more; and those already reported
        #: lost (their slots free), whose reports are dropped. Each running chunk's
        #: hand-over (see _handover), for kill to take what finished in it.
        self._detached: set[Chunk] = set()
        self._lost: set[Chunk] = set()
        self._handing: dict[Chunk, list[Any]] = {}
        #: Chunks submitted and not finally reported (on the loop: its in_flight), with
        #: the calls each holds (a chunk cut short holds fewer pieces, not fewer places).
        self._open: dict[Chunk, set[int]] = {}
        #: The idle thread that looks at the running chunks (see _take_back).
        self._looker: threading.Thread | None = None
        self._started = 0

    @classmethod
    async def create(cls, config: PoolConfig, listener: Listener, loop: Loop) -> ThreadRung:
        rung = cls(config, listener, loop)
        preload(loop)  # else the first call with a deadline imports it on the loop
        ready = _Ready(loop)
        for index in range(config.max_workers):
            try:
                rung._start(ready)
            except RuntimeError:
                if not rung.threads:
                    raise
                listener.rung_warning(f"thread rung started {index} of "
                                      f"{config.max_workers} threads", rung=cls.name)
                break
        if config.initializer is not None:
            # Each thread runs the initializer before it takes a chunk.
            try:
                with anyio.fail_after(config.start_timeout):
                    await ready.all(len(rung.threads))
            except TimeoutError:
                await rung.aclose(kill=True)
                raise InitializerFailed.timed_out(config.initializer,
                                                  config.start_timeout) from None
            if rung._init_errors:
                await rung.aclose(kill=False)
                error = rung._init_errors[0]
                raise InitializerFailed.raised(config.initializer, error,
                                               "in a thread") from error
        return rung

    def _start(self, ready: _Ready | None = None) -> None:
        thread = threading.Thread(target=self._work, args=(ready,), daemon=True,
                                  name=f"asyncpool-thread-{self._started}")
        thread.start()
        self._started += 1
        self.threads.append(thread)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    @property
    def workers(self) -> int:
        return len(self.threads) - len(self._stuck)

    @property
    def capacity(self) -> int:
        return self.config.in_flight

    def offer(self) -> int | None:
        ok = self.state is RungState.SERVING and self.in_flight < self.config.in_flight
        return None if ok else 0

    def submit(self, chunk: Chunk) -> None:
        chunk.rung = self
        calls = {piece.call.id for piece in chunk.pieces}
        self._holding.update(calls)
        self._open[chunk] = calls
        self._queue.put(chunk)

    def cancel(self, calls: Iterable[int]) -> None:
        self._cancelled.update(call for call in calls if call in self._holding)

    def _work(self, ready: _Ready | None) -> None:
        config = self.config
        me = threading.current_thread()
        if config.initializer is not None:
            try:
                initialize(config.initializer, config.initargs)
            except BaseException as exc:
                if ready is None:  # in place of a stuck thread: it does not serve
                    self.loop.call_soon_threadsafe(functools.partial(self._left, me, exc))
                    return
                self._init_errors.append(exc)
            if ready is not None:
                self.loop.call_soon_threadsafe(ready.one)
        while True:
            try:
                # While other threads run chunks with items behind the running one,
                # one idle thread looks at them now and then.
                looks = self._looker in (None, me) and self._cuttable()
                if looks:
                    self._looker = me
                chunk = self._queue.get(timeout=STUCK_SECONDS if looks else None)
            except queue.Empty:
                self._take_back()
                continue
            finally:
                if self._looker is me:
                    self._looker = None
            if chunk is None:
                self._done.add(me)
                self.loop.call_soon_threadsafe(self._exited)
                return
            if isinstance(chunk, _Look):
                continue
            if chunk in self._detached:  # stopped before it started (see kill)
                self.loop.call_soon_threadsafe(functools.partial(self._forget, chunk))
                continue
            runs = [(p.call.fn, p.call.star, p.call.id, list(p.items)) for p in chunk.pieces]
            progress = [chunk.seq, -1, 0, time.monotonic()]
            self._running[me] = (chunk, runs, progress)
            if self._queue.empty() and len(self._running) < self.workers:
                self._queue.put(_LOOK)  # a thread blocked idle looks at this one
            skip = _Skip(self, chunk)
            report = functools.partial(self._tick, chunk, progress, skip)
            handing: list[Any] = []
            self._handing[chunk] = handing
            try:
                execute(runs, config.task_retries, report, progress, skip=skip,
                        late=functools.partial(report, end=None), shared=handing,
                        each=True)
            except BaseException:  # pragma: no cover - execute catches what items raise
                logger.exception("a thread of the thread rung failed")
            self._handing.pop(chunk, None)
            del chunk, runs, report, handing, skip
            self._running.pop(me, None)
            if me in self._stuck:
                # Its stuck item ended: the thread that took its place stays.
                self.loop.call_soon_threadsafe(functools.partial(self._left, me))
                return

    def _take_back(self) -> None:
        """In an idle thread, with nothing queued: a chunk not heard of for
        STUCK_SECONDS runs a long item; the items behind it are cut off (as a worker
        process cuts its chunk) and sent again, here."""
        if self.state is not RungState.SERVING or self.listener.closing or (
                self.in_flight >= self.config.in_flight):
            return  # (every slot taken: the rest would wait for one all the same)
        now = time.monotonic()
        for thread, (chunk, runs, progress) in list(self._running.items()):
            if thread in self._stuck or now - progress[_HEARD] < STUCK_SECONDS:
                continue
            keep = cut_after_running(runs, progress)
            if keep is not None:
                self.loop.call_soon_threadsafe(functools.partial(self._was_cut, chunk, keep))

    def _cuttable(self) -> bool:
        """Whether a thread (not left on a stopped call's item) runs a chunk with
        items behind the one it runs."""
        return any(thread not in self._stuck and progress[_wire.POSITION] + 1 < sum(
            len(items) for _, _, _, items in runs)
            for thread, (_, runs, progress) in list(self._running.items()))

    def _was_cut(self, chunk: Chunk, keep: int) -> None:
        if chunk in self._open and chunk not in self._detached:  # else it ended first
            self.listener.chunk_cut(chunk, keep)

    def _exited(self) -> None:
        if self._exits is not None:
            self._exits.set()

    def _left(self, thread: threading.Thread, error: BaseException | None = None) -> None:
        self._stuck.discard(thread)
        if thread in self.threads:
            self.threads.remove(thread)
        if error is not None:  # a thread started in place of a stuck one: it leaves
            self.listener.rung_warning(f"a thread started in place of a stuck one leaves: "
                                       f"the initializer raised {error!r}", rung=self.name)
            self._unless_served(InitializerFailed.raised(self.config.initializer, error,
                                                         "in a new thread"))

    def _unless_served(self, failure: BaseException) -> None:
        """If no thread serves (each runs a stopped call's item) and no new one could
        start, stop serving: what waits for a thread goes elsewhere, and the ladder
        decides what next."""
        if self.state is RungState.SERVING and all(t in self._stuck for t in self.threads):
            self._out_of_service(failure)
            while True:
                try:
                    chunk = self._queue.get_nowait()
                except queue.Empty:
                    break
                if chunk is not None and not isinstance(chunk, _Look):
                    self._give_back(chunk)
            self.listener.rung_changed()

    def kill(self, chunks: Iterable[Chunk], calls: set[int] | None = None) -> bool:
        """Threads cannot be stopped: each running one of these chunks is left to
        finish it (what else it holds of those calls is skipped), and a new thread
        serves in its place meanwhile, so a hung item does not take a thread for good.
        False: the items run on. Chunks not started yet are taken off (the thread in
        place of a stopped one ran them, after a close with kill)."""
        wanted = set(chunks)
        running = list(self._running.items())
        started = {chunk for _, (chunk, _, _) in running}
        for chunk in wanted - started:
            if chunk in self._open and chunk not in self._detached and (
                    calls is None or all(p.call.id in calls for p in chunk.pieces)):
                self._detached.add(chunk)
                self._lose(chunk)
        for thread, (chunk, _, progress) in running:
            at = progress[_wire.POSITION]
            if calls is not None and not (0 <= at < chunk.size
                                          and chunk.locate(at)[0].call.id in calls):
                continue  # it runs a live call's item: it runs on, then skips theirs
            if chunk in wanted and thread not in self._stuck and (
                    self.state is RungState.SERVING):
                self._stuck.add(thread)
                # Its slot is freed and what it holds of live calls goes elsewhere;
                # the thread stops after the item it runs, reporting nothing more.
                # What finished before that item, and what the thread reported
                # already, are told first (else they ran again elsewhere).
                handing, taken = self._handing.get(chunk), None
                if handing:
                    with handing[0].lock:  # (the thread hands over under it too)
                        taken = handing[0].take()
                        self._detached.add(chunk)
                else:  # (it has not begun: nothing to take)
                    self._detached.add(chunk)
                if taken is not None:
                    self._tick_now(chunk, *taken)
                self.loop.call_soon_threadsafe(functools.partial(self._lose, chunk))
                try:
                    self._start()
                except RuntimeError as exc:
                    self.listener.rung_warning(f"the thread rung could not start a thread in "
                                               f"place of one stuck on a stopped call's "
                                               f"item: {exc!r}", rung=self.name)
                    self._unless_served(RungUnavailable(
                        f"every thread runs a stopped call's item and no new one can "
                        f"start ({exc})"))
        return False

    def _tick(self, chunk: Chunk, progress: list[Any], skip: _Skip, first: int, upto: int,
              results: list[Any], errors: dict[int, BaseException],
              end: tuple[list[float], int] | None) -> tuple[AbstractSet[int], bool]:
        progress[_HEARD] = time.monotonic()
        if chunk in self._detached:
            if end is not None:
                self.loop.call_soon_threadsafe(functools.partial(self._forget, chunk))
            return skip, True
        self._tick_now(chunk, first, upto, results, errors, end)
        return skip, False

    def _tick_now(self, chunk: Chunk, first: int, upto: int, results: list[Any],
                  errors: dict[int, BaseException],
                  end: tuple[list[float], int] | None = None) -> None:
        """Results to report on the loop, after those told before them."""
        results = list(results)
        errors = {position: portable(exc) if not isinstance(exc, Exception) else exc
                  for position, exc in errors.items()}
        self.loop.call_soon_threadsafe(
            functools.partial(self._report, chunk, first, upto, results, errors, end))

    def _report(self, chunk: Chunk, first: int, upto: int, results: list[Any],
                errors: dict[int, BaseException], end: tuple[list[float], int] | None) -> None:
        if chunk in self._lost:
            if end is not None:
                self._forget(chunk)
            return  # reported lost already (see kill)
        if upto > first:
            self.listener.chunk_progress(chunk, first, upto, results, errors)
        if end is not None:
            self._release(chunk)
            self._forget(chunk)  # (detached as it ended: nothing more to give back)
            self.listener.chunk_done(chunk, upto, *end)

    def _lose(self, chunk: Chunk) -> None:
        """A detached chunk is given back, unless it ended (a report told before)."""
        if chunk in self._open:
            self._lost.add(chunk)
            self._give_back(chunk)

    def _forget(self, chunk: Chunk) -> None:
        self._detached.discard(chunk)
        self._lost.discard(chunk)

    def _give_back(self, chunk: Chunk) -> None:
        """``chunk`` leaves unfinished: its slot is freed, what is left goes elsewhere."""
        self._release(chunk)
        self.listener.chunk_lost(chunk)

    def _release(self, chunk: Chunk) -> None:
        """The chunk no longer holds a slot here (nor a place for its calls)."""
        calls = self._open.pop(chunk, set())
        holding = self._holding
        for call in calls:
            holding[call] -= 1
            if holding[call] <= 0:
                del holding[call]
                self._cancelled.discard(call)

    def abandon(self) -> None:
        super().abandon()
        for _ in list(self.threads):
            self._queue.put(None)

    async def aclose(self, kill: bool) -> None:
        # Threads cannot be killed; they finish what they run and exit (they are
        # daemons, so a stuck task does not hold the interpreter at exit).
        self._move(RungState.CLOSED)
        for _ in list(self.threads):
            self._queue.put(None)
        if not kill:  # each finishes its chunk, then says it left
            leaving = [t for t in self.threads if t not in self._stuck]
            while True:
                self._exits = self.loop.event()
                if all(t in self._done or not t.is_alive() for t in leaving):
                    break
                await self._exits.wait()


class _Ready:
    """Counts, on the loop, the threads through their initializer (without polling)."""

    def __init__(self, loop: Loop) -> None:
        self.count, self.expected, self.event = 0, 0, loop.event()

    def one(self) -> None:
        self.count += 1
        if self.expected and self.count >= self.expected:
            self.event.set()

    async def all(self, expected: int) -> None:
        self.expected = expected
        if self.count < expected:
            await self.event.wait()


class _Skip(AbstractSet[int]):
    """The calls whose items a thread's chunk skips (and retries no more): those
    cancelled, and all of them once the chunk was detached (its thread left to a
    killed call's item, it retried that item till its backoff ran out)."""

    __slots__ = ("rung", "chunk")

    def __init__(self, rung: ThreadRung, chunk: Chunk) -> None:
        self.rung, self.chunk = rung, chunk

    def __contains__(self, call: object) -> bool:
        return call in self.rung._cancelled or self.chunk in self.rung._detached

    def __iter__(self) -> Iterator[int]:
        return iter(self.rung._cancelled)

    def __len__(self) -> int:
        return len(self.rung._cancelled)
