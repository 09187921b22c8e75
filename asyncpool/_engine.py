"""The engine: every call's items, packed into chunks, out to a rung and back.

::

    callers (tasks)           the engine, on the loop                the serving rung
    ---------------           ----------------------                ----------------
    run / map / imap  --->  ready calls (round robin)
      makes a Call            |  flush(), once per loop turn
                              v  and whenever a rung has room
                           Chunk = pieces of one or more calls ---> offer() / submit()
                                                                        |
                                                      a worker process, thread or
                                                      the loop runs the items; results
                                                      come back every ~5 ms, through a
                                                      socket read by the loop or
                                                      call_soon_threadsafe from a thread
                                                                        |
    call.wait() <--- Call.deliver <--- chunk_progress <-----------------+
                                       chunk_done / crashed / lost / unloadable:
                                       the chunk's final report; its slot frees
                                       and the engine flushes again

Where each step lives: packing and dispatch here; a chunk's reports, settling,
bisection after a crash and resends in :mod:`asyncpool._outcomes` (their order in
:mod:`asyncpool._resends`, cutting an over-long chunk in :mod:`asyncpool._rebalance`);
a call's results in order in :mod:`asyncpool._call`; its deadline and what its caller
sees in :mod:`asyncpool._consume`; which rung serves in :mod:`asyncpool._ladder`.

Concurrent calls share chunks (what callers bring in one loop turn, or while every
slot is busy, goes out together); a call whose items are all out never waits for a
slot again, and each caller's results reach it as its own items finish. A rung's
capacity is its own (see :mod:`asyncpool._rungs.base`): calls hold no slot, so no
way a call ends can leak one.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import anyio

from ._call import Call, CallState, Chunk, Piece, by_priority
from ._config import PoolConfig
from ._errors import PoolClosed, fresh
from ._events import Counters, Emitter
from ._ladder import Ladder
from ._loop import Loop
from ._outcomes import Outcomes
from ._rebalance import fixed_size
from ._rungs import ChunkUnpicklable, Rung
from ._sizing import TARGET_CHUNK_BYTES, Timing, guided_cap

logger = logging.getLogger("asyncpool")

#: Pickled bytes a call streams ahead of its caller at most (out, or done unconsumed).
WINDOW_BYTES = 32 << 20
#: The longest (s) one flush spends building and sending chunks before it lets the
#: loop run (and continues on the next turn).
FLUSH_SLICE = 0.002
#: A flush that ran this much (s) past its slice lets due timers go before it goes on.
LONG_FLUSH = 0.005


def build_engine(config: PoolConfig, counters: Counters, emit: Emitter,
                 loop: Loop) -> Engine:
    """An engine with its ladder and the listener its rungs report to. Each is given,
    when made, what it calls on the others (the engine, made last, through closures)."""
    engine: Engine
    outcomes = Outcomes(config, counters, emit, kick=lambda: engine.kick(),
                        settled=lambda rung: ladder.settled(rung))
    ladder = Ladder(config, outcomes, counters, emit, loop, kick=lambda: engine.kick(),
                    fail_all=lambda error: engine.fail_all(error))
    engine = Engine(config, ladder, outcomes, emit, loop)
    return engine


class Engine:
    """Takes every call's items to the serving rung, in chunks.

    Its collaborators, given: the :class:`~asyncpool._ladder.Ladder` (which rung
    serves), the :class:`~asyncpool._outcomes.Outcomes` that its rungs report to
    (chunks in flight, resends) and the event emitter. The ladder and the listener
    ask the engine for a flush (``kick``), the ladder fails every call when no rung
    can serve, and the listener tells the ladder when a chunk settles (it closes
    drained rungs).
    """

    def __init__(self, config: PoolConfig, ladder: Ladder, outcomes: Outcomes,
                 emit: Emitter, loop: Loop) -> None:
        self.config, self.emit, self.loop = config, emit, loop
        self.outcomes = outcomes
        self.ladder = ladder
        #: Calls that may have input to send, served in turn.
        self.ready: deque[Call] = deque()
        #: Calls held back until their caller catches up (see window_items).
        self.stalled: set[Call] = set()
        self.calls: set[Call] = set()
        #: Items of live calls whose input has a known length, not yet sent.
        self.pending = 0
        self._scheduled = False
        #: Whether new items go before those that go again (see _next).
        self._fresh_turn = False
        #: Set once closed: a second close meanwhile waits for the first.
        self._closed: anyio.Event | None = None

    @property
    def in_flight(self) -> set[Chunk]:
        return self.outcomes.in_flight

    # -- calls ---------------------------------------------------------------------

    def add(self, call: Call) -> None:
        if self._closed is not None:
            # A stream first read once the pool closed waited for good.
            call.fail(PoolClosed("the pool was closed"))
            return
        self.calls.add(call)
        self.pending += call.source.remaining or 0
        self.ready.append(call)
        self.kick()

    def resume(self, call: Call) -> None:
        """A call may have something to send again (input arrived, room freed)."""
        if call.input_failed() or call.source.done or call.error is not None:
            call.wake()  # its input ended (or failed): the caller may be complete
        if self._closed is not None:
            return  # nothing new goes out (a stream still read ran all it had)
        if call in self.stalled:
            if self._over_window(call):
                self._stall(call)  # (what it let through since waits too)
            else:
                self.stalled.discard(call)
                self.ready.append(call)
        elif call.wants_input and call not in self.stalled and call not in self.ready:
            self.ready.append(call)
        self.kick()

    def _stall(self, call: Call) -> None:
        """``call``'s caller is behind: it waits, and what its input let through waits
        with it, holding no other call (a paused imap held every rate-limited one)."""
        self.stalled.add(call)
        call.source.idle()

    def finish(self, call: Call, *, kill: bool = False) -> None:
        """The call is over (done, failed, timed out or cancelled): forget it."""
        call.end()
        if call in self.calls:
            self.pending -= call.source.remaining or 0
            if call.state is CallState.ABANDONED:
                # Items taken and unfinished, and those still to come (of an input of
                # unknown length, those read from it and not taken).
                total = call.source.total
                ahead = call.source.buffered if total is None else total - call.pulled
                self.outcomes.abandoned(call.pulled - call.finished + ahead)
        self.calls.discard(call)
        self.stalled.discard(call)
        held = list(call.chunks)
        if held and call.state is CallState.ABANDONED:
            for rung in {chunk.rung for chunk in held if chunk.rung is not None}:
                try:
                    rung.cancel([call.id])
                except Exception:
                    logger.exception("the %s rung failed to cancel a call", rung.name)
            if kill:
                self.outcomes.stop(held, {call.id})
        if self.outcomes.closing:
            self.outcomes.stop(self.outcomes.orphans())
        if not call.shipped.lasting:
            for rung in self.ladder.rungs():
                rung.forget(call.shipped.id)
        self.kick()

    def fail_all(self, error: BaseException) -> None:
        """No rung can run anything: every waiting call fails with ``error`` (a copy
        each)."""
        for call in list(self.calls):
            call.fail(fresh(error))

    # -- sending -------------------------------------------------------------------

    def kick(self) -> None:
        """Flush at the end of this loop turn (once, however often it is asked)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.outcomes.closing and not self.outcomes.finishing:
            return
        if self.stalled:
            for call in [c for c in self.stalled if not self._over_window(c)]:
                self.stalled.discard(call)
                self.ready.append(call)
        stop = time.perf_counter() + FLUSH_SLICE
        while self._work_waits():
            now = time.perf_counter()
            if now > stop:
                # The rest next turn: readers go first, and after a long chunk timers
                # too (a chunk size the caller chose, of items slow to pickle, sent
                # three chunks of 0.1 s back to back, each turn's continuation going
                # before due timers).
                if now > stop + LONG_FLUSH:
                    self._scheduled = True
                    self.loop.call_after_timers(self._flush)
                else:
                    self.kick()
                return
            rung = self.ladder.rung_to_send_to()
            if rung is None:
                return  # the ladder is (re)building; it kicks when a rung serves
            room = rung.offer()
            if room == 0:
                return
            chunk = self._next(rung, room)
            if chunk is None:
                return
            # What sending costs the loop's thread, in CPU time: on a loaded machine a
            # send preempted midway took long, and shrank the caller's chosen chunks.
            started = time.thread_time()
            try:
                try:
                    rung.submit(chunk)
                except ChunkUnpicklable as exc:
                    self.outcomes.unpicklable(chunk, exc.errors, exc.__cause__)
                    continue
            except Exception as exc:
                # A fault of ours: the chunk's calls fail with it rather than wait
                # for items that went nowhere. A chunk the rung took before it failed
                # is in flight all the same: it settles like any other.
                logger.exception("asyncpool failed to send a chunk; its calls fail")
                if chunk.rung is not None:
                    self.outcomes.sent(chunk)
                for call in chunk.calls():
                    call.fail(exc)
                continue
            self.outcomes.sent(chunk, time.thread_time() - started)

    def _work_waits(self) -> bool:
        """Whether a chunk could be sent now: calls that ended leave the queues here,
        so that no rung is (re)built for them."""
        ready = self.ready
        while ready and not ready[0].wants_input:
            ready.popleft()
        return self.outcomes.resend_waits() or bool(ready)

    def _next(self, rung: Rung, room: int | None) -> Chunk | None:
        """Items that go again and new ones take turns: a request arriving behind a
        map whose chunks were cut short (or lost with a worker) waited for every item
        that went again first."""
        limit = self.config.max_chunk_size if room is None else room
        if self.outcomes.alone_first():
            # A suspect blamed with every item beside it runs with nothing else (beside
            # items of stopped calls alone: waiting for them, a hung one held the pool).
            return None if self.outcomes.busy() else self.outcomes.next_resend(limit)
        if rung.name == "dask":
            by_priority(self.ready)
        if self._fresh_turn:
            self._fresh_turn = False
            chunk = self._new_chunk(limit, self._lanes(rung), self._target(rung))
            if chunk is not None:
                return chunk
        chunk = self.outcomes.next_resend(limit)
        if chunk is not None:
            self._fresh_turn = True
            return chunk
        return self._new_chunk(limit, self._lanes(rung), self._target(rung))

    def _lanes(self, rung: Rung) -> int:
        return max(1, rung.lanes or self.config.max_workers)

    def _target(self, rung: Rung | None) -> float:  # (seconds of work in a chunk there)
        return max(self.config.target_chunk_seconds, rung.least_chunk_seconds if rung else 0)

    def _new_chunk(self, limit: int, lanes: int, target: float | None = None) -> Chunk | None:
        target = self.config.target_chunk_seconds if target is None else target
        budget = target
        pieces: list[Piece] = []
        count = known = 0
        # Guided scheduling over every call whose input has a known length: as the work
        # left shrinks, so do chunks, and the last ones finish together.
        cap = guided_cap(self.pending, lanes)
        unknown: set[Timing] = set()
        # Every call's items in the chunk share its bytes (pickled on the loop).
        room: float = TARGET_CHUNK_BYTES
        visits = len(self.ready)
        while self.ready and count < limit and budget > 0 and visits > 0:
            visits -= 1
            call = self.ready.popleft()
            # One with nothing at hand comes back as its input arrives (taken for a
            # call alone in its chunk, it ended the chunk, and those behind waited).
            if not call.wants_input or not call.source.available():
                continue
            if self._over_window(call):
                self._stall(call)
                continue
            fixed = fixed_size(call, self.config)
            # A call with its own chunk size, or with Dask options for its tasks, gets
            # chunks of its own.
            alone = fixed is not None or bool(call.options.dask)
            if alone and pieces:
                self.ready.appendleft(call)
                break
            timing = call.timing
            if timing.per_item is None and timing.blind >= lanes and timing not in unknown:
                self.ready.append(call)  # until a chunk of its function comes back
                continue
            per_item = call.per_item
            cost = per_item if per_item is not None else target / timing.ramp
            if pieces and budget < cost:
                # Less than one of its items fits: it heads the next chunk rather than
                # go to the back of the queue for one item (calls then took turns in
                # pairs, the second of each pair getting an item a chunk).
                self.ready.appendleft(call)
                break
            want = fixed or max(1, int(budget / max(cost, 1e-9)))
            # A chunk size the caller chose is kept as it is, unless sending it would
            # hold the loop long (its chunks of 100 went out as 78 to 134 chunks in
            # 3,000 where one item in fifty was slow to pickle).
            want = min(want, limit - count,
                       timing.held_cap() if fixed else timing.send_cap(),
                       max(1, self.window_items(call)))
            weight = 0.0
            if not fixed:
                want, weight = call.source.weigh(want, room, call.timing.bytes_per_item)
            if weight:
                if pieces and weight > room:
                    self.ready.appendleft(call)  # in the next chunk
                    break
                want = min(want, max(1, int(room / weight)))
            counted = call.source.remaining is not None
            if cap is not None and counted and fixed is None:
                if known >= cap:
                    # This chunk has its share: the next call's items go to another
                    # worker (two callers in one chunk would wait on each other).
                    self.ready.appendleft(call)
                    break
                want = min(want, cap - known)
            piece = call.take(max(1, want))
            if call.error is not None:
                self.loop.call_soon(call.wake)
            if piece is not None:
                pieces.append(piece)
                count += len(piece.items)
                if counted:
                    known += len(piece.items)
                    self.pending -= len(piece.items)
                budget -= cost * len(piece.items)
                room -= weight * len(piece.items)
                if timing.per_item is None:
                    unknown.add(timing)
            if call.wants_input and call.source.available():
                self.ready.append(call)
            if alone:
                break
        for timing in unknown:
            timing.grow()
        if not pieces:
            return None
        chunk = Chunk(pieces)
        chunk.blind = tuple(unknown)
        return chunk

    def window_items(self, call: Call) -> int:
        """How many more items ``call`` may take from its input now.

        A call holds at most enough items for every slot to be busy four times over (and at
        most :data:`WINDOW_BYTES` of them, by their arguments' or their results' bytes)
        between its input and its caller: taken and running, or finished and not yet
        handed over by ``imap``.
        """
        serving = self.ladder.serving
        slots = serving.capacity if serving is not None else self.config.in_flight
        items = 4 * slots * self._per_chunk(call)
        weight = call.timing.weight
        if weight:
            items = min(items, max(1, int(WINDOW_BYTES / weight)))
        return items - call.backlog

    def read_ahead(self, call: Call) -> int:
        """How many items a fed input may hold read and not yet taken: a small chunk,
        or a quarter of a big one (within the window). The thread reading it keeps up,
        and what it read ahead costs little memory (2M strings: +7 MB, not +45)."""
        per_chunk = self._per_chunk(call)
        return min(self.window_items(call), max(per_chunk // 4, min(per_chunk, 256)))

    def _per_chunk(self, call: Call) -> int:
        fixed = fixed_size(call, self.config)
        if fixed:
            return fixed  # the caller's own (items of 20 ms went 24 to a chunk, not 100)
        per_chunk = self.config.max_chunk_size
        if call.per_item is not None:
            per_chunk = max(1, min(per_chunk, int(self._target(self.ladder.serving)
                                                  / max(call.per_item, 1e-9))))
        return per_chunk

    def _over_window(self, call: Call) -> bool:
        return self.window_items(call) <= 0

    # -- closing -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None and self._closed.is_set()

    async def aclose(self, kill: bool) -> None:
        """Stop. Without ``kill`` the running items of live calls finish; items nobody
        waits for any more are stopped; what was never sent fails with PoolClosed.
        Called again meanwhile, it waits for the first close (``kill`` stops what that
        one waits for)."""
        outcomes = self.outcomes
        if self._closed is not None:
            if kill:
                self._kill_all()
            try:
                await self._closed.wait()
            except BaseException:  # its caller's deadline, as for the first
                self._kill_all()
                raise
            return
        self._closed = anyio.Event()
        outcomes.close(kill)
        self.ready.clear()
        self.stalled.clear()
        outcomes.stop(list(outcomes.in_flight) if kill else outcomes.orphans())
        try:
            if not kill:
                self.ladder.resume()  # (a worker someone stopped would not end its items)
                try:
                    # Its caller's deadline or a cancellation ends this wait, killing.
                    await outcomes.drained(self.ladder.coming)
                except BaseException:
                    kill = True
                    self._kill_all()
                    raise
        finally:
            with anyio.CancelScope(shield=True):
                # Killed chunks are reported as their workers die; a thread cannot be
                # killed, so one still running an orphan is left to finish on its own.
                await self.ladder.aclose(kill or bool(outcomes.in_flight))
            for call in list(self.calls):
                call.fail(PoolClosed("the pool was closed"))
            self._closed.set()

    def _kill_all(self) -> None:
        """A close turns to killing: nothing goes out any more, what runs stops."""
        self.outcomes.close(kill=True)
        self.outcomes.stop(list(self.outcomes.in_flight))
