"""What rungs report about chunks, turned into results, errors and resends.

:class:`Outcomes` is the :class:`~asyncpool._rungs.base.Listener` every rung reports
to. It owns the set of chunks in flight: a chunk enters it when it is submitted and
leaves it in :meth:`Outcomes._settle`, called once per chunk, on the rung's final
report. Items that must run again (after a crash, a lost worker, a take-back) wait in
:attr:`Outcomes.again` (see :mod:`asyncpool._resends`), taking turns with new work.

After a crash the rung names the item that was running; the items before it ran but
their results died with the worker, the items after it never ran, and none of them is
to blame: they go out again, and only the suspect's crash count grows. Where the rung
cannot name the item (Dask), the chunk is split instead: in halves, or in up to 32
parts where one try cost several worker deaths (a Dask ``KilledWorker``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ._call import Call, CallState, Chunk, Crossing, Resend, by_timing, measured
from ._config import PoolConfig
from ._errors import (FunctionUnavailable, PoolClosed, SerializationError, WorkerCrashed,
                      exit_described, is_pool_made, pool_made)
from ._events import Counters, Emitter
from ._execute import SKIPPED
from ._rebalance import fixed_size, resend_parts
from ._resends import Resends
from ._sizing import blend

logger = logging.getLogger("asyncpool")


class Outcomes:
    """The rungs' listener: chunks in flight, their outcomes, and what to send again."""

    def __init__(self, config: PoolConfig, counters: Counters, emit: Emitter, *,
                 kick: Callable[[], None], settled: Callable[[object], None]) -> None:
        self.config = config
        self.counters = counters
        self.emit = emit
        self.kick = kick  # asks the engine for a flush
        #: Told when a chunk of a rung settles (the ladder closes drained rungs).
        self.settled = settled
        #: Chunks submitted and not finally reported.
        self.in_flight: set[Chunk] = set()
        #: Items to send again (a crash, a lost worker, a take-back).
        self.again = Resends()
        #: Set while the pool closes (lost items fail instead of going out again), and
        #: while it closes gracefully (what was taken back still goes out: calls wait).
        self.closing = self.finishing = False
        #: Chunks in flight that run with nothing beside them (see Resends.alone).
        self.alone: set[Chunk] = set()
        self._drained: Any = None

    def sent(self, chunk: Chunk, seconds: float = 0.0) -> None:
        """``chunk`` was submitted (which took ``seconds`` of the loop): it holds a
        slot of its rung until it settles."""
        self.in_flight.add(chunk)
        if chunk.alone:
            self.alone.add(chunk)
        for timing in chunk.blind:
            timing.blind += 1
        self.counters.chunks_submitted += 1
        for piece in chunk.pieces:
            piece.call.chunks.add(chunk)
        for timing, (count, spent) in by_timing(chunk, seconds=seconds).items():
            timing.observe_send(count, spent)
            if chunk.payload_bytes:
                timing.observe_bytes(count, chunk.payload_bytes * count // chunk.size)

    def rung_changed(self) -> None:
        self.kick()

    def chunk_progress(self, chunk: Chunk, first: int, upto: int, results: list[Any],
                       errors: dict[int, BaseException], nbytes: int = 0) -> None:
        chunk.reported = upto
        if nbytes:
            # The results weigh this together: known per item where they are all of
            # one function (spread over all, a big result weighed on a tiny function).
            timings = {p.call.timing for p, _, _, _ in chunk.between(first, upto)}
            if len(timings) == 1:
                timings.pop().observe_results(upto - first, nbytes)
        completed = failed = 0
        for piece, lo, hi, offset in chunk.between(first, upto):
            call = piece.call
            if call.state is not CallState.ACTIVE:
                continue
            at = offset + lo - first
            values = results[at:at + hi - lo]
            if values and values[0] is SKIPPED:
                continue
            mine = {p - offset - lo: _named(e, piece.start + p - offset)
                    for p, e in errors.items() if offset + lo <= p < offset + hi}
            call.deliver(piece.start + lo, values, mine)
            call.function_crashes = 0  # it loaded: only deaths in a row are its own
            completed, failed = completed + hi - lo - len(mine), failed + len(mine)
        self.counters.tasks_completed += completed
        self.counters.tasks_failed += failed

    def chunk_done(self, chunk: Chunk, upto: int, seconds: float | Sequence[float],
                   retried: int = 0) -> None:
        if retried:
            self.emit("task_retry", f"{retried} retr{'y' if retried == 1 else 'ies'} after "
                      "transient errors (no thread, process or memory for a moment)",
                      retries=retried)
        if upto > 0 and seconds:
            for timing, (count, spent) in by_timing(chunk, upto, seconds).items():
                timing.observe(count, spent)
            for call, (count, spent) in measured(chunk, upto, seconds,
                                                 lambda piece: piece.call).items():
                call.own_per_item = blend(call.own_per_item, spent / count)
        if upto < chunk.size:
            # The worker stopped early (retiring, or asked to): the rest goes elsewhere.
            self._again(chunk, max(upto, chunk.reported), chunk.size, Resend.MOVED)
        self._settle(chunk)

    def chunk_crashed(self, chunk: Chunk, culprit: int | None, exitcode: int | None,
                      deaths: int = 1, function: int = 0, shared: bool = False) -> None:
        first = chunk.reported
        for piece in chunk.pieces:
            piece.call.crashed = True
        if function:
            self._function_crashed(chunk, function, exitcode)
            return
        if culprit is None or culprit < first:
            if chunk.size - first == 1 and deaths > 1 and not chunk.suspect:
                # Dask lost it with every task on its worker: alone, it may well run.
                # (Should it crash there too, these deaths were its own: counted.)
                self._again(chunk, first, chunk.size, Resend.SUSPECT, deaths)
                self._settle(chunk)
                return
            if chunk.size - first > 1:
                # Not known which item did it: split the rest until it stands alone,
                # in up to 32 parts at once where each try costs several deaths (a
                # Dask KilledWorker), in halves elsewhere. The parts start their count
                # afresh: an innocent neighbour may have been blamed with the culprit.
                self._split(chunk, Resend.SPLIT, 32 if deaths > 1 else 2, suspect=True)
                self._settle(chunk)
                return
            culprit = first
        # Items before the culprit ran but their results died with the worker; those
        # after it never ran. Neither is to blame.
        self._again(chunk, first, culprit, Resend.INNOCENT, 0)
        self._again(chunk, culprit + 1, chunk.size, Resend.NOT_RUN, 0)
        alone = chunk.size - first == 1
        # Running when the fork server died (as every worker's item), anything may have
        # killed it: it goes again uncounted; at such a death again, it is blamed with
        # every item beside it and runs alone, and fails only after a death alone.
        blamed = not shared or (alone and (chunk.shared or chunk.alone))
        crashes = (chunk.crashes if alone else 0) + (deaths if blamed else 0)
        piece, index = chunk.locate(culprit)
        if crashes >= self.config.max_crashes_per_item and not (shared and not chunk.alone):
            how = exit_described(exitcode)
            error = WorkerCrashed(
                f"item {index} crashed its worker process {crashes} time(s) (last: {how}); "
                "it was not run again (run it by itself to debug it)",
                index=index, exitcode=exitcode)
            if piece.call.state is CallState.ACTIVE:
                piece.call.deliver(index, [None], {0: error})
                self.counters.tasks_failed += 1
        else:
            self._again(chunk, culprit, culprit + 1, Resend.SUSPECT, crashes,
                        alone=shared and blamed, shared=shared)
        self._settle(chunk)

    def _function_crashed(self, chunk: Chunk, function: int, exitcode: int | None) -> None:
        """Loading a function killed the worker: its calls fail once that happened as
        often as an item may crash, in a row; every other item goes out again, unblamed."""
        limit = self.config.max_crashes_per_item
        for call in {p.call for p in chunk.pieces if p.call.shipped.id == function}:
            if chunk.born <= call.function_crash_seen:
                continue  # one death of a wave of workers that were loading it at once
            call.function_crashes += 1
            call.function_crash_seen = Chunk.made  # all sent before this death
            if call.function_crashes >= limit:
                call.fail(FunctionUnavailable(
                    f"loading the function {call.shipped.name} killed its worker process "
                    f"{call.function_crashes} time(s) (last: {exit_described(exitcode)}); check "
                    "what unpickling it runs"))
        position = 0
        for piece in chunk.pieces:
            end = position + len(piece.items)
            self._again(chunk, max(position, chunk.reported), end, Resend.LOST, 0)
            position = end
        self._settle(chunk)

    def chunk_lost(self, chunk: Chunk, why: Resend = Resend.LOST) -> None:
        if self.closing and not self.finishing:
            # (Closing gracefully, what a worker lost goes again like the rest: an item
            # queued behind a crash failed as "closed while running".)
            self._closed_under(chunk)
        elif why is Resend.MOVED:  # taken back unstarted: sized on what is now known
            self._split(chunk, why, resend_parts(chunk, chunk.reported, self.config))
        else:
            self._again(chunk, chunk.reported, chunk.size, why)
        self._settle(chunk)

    def chunk_cut(self, chunk: Chunk, keep: int) -> None:
        first = max(keep, chunk.reported)
        self._split(chunk, Resend.MOVED, resend_parts(chunk, first, self.config), first=first)
        _let_go(chunk, chunk.cut(keep))
        self.kick()

    def chunk_unloadable(self, chunk: Chunk, error: BaseException) -> None:
        first = chunk.reported
        if chunk.size - first > 1:
            self._split(chunk, Resend.BISECT)
        else:
            self._item_error(chunk, first, Crossing.ARGUMENT_LOAD, error)
        self._settle(chunk)

    def chunk_undecodable(self, chunk: Chunk, first: int, upto: int,
                          error: BaseException) -> None:
        """Results [first, upto) came back but will not unpickle here: each item runs
        again alone, so only the item whose result is at fault fails."""
        chunk.reported = upto
        if upto - first == 1:
            self._item_error(chunk, first, Crossing.RESULT_LOAD, error)
            return
        for position in range(first, upto):
            self._again(chunk, position, position + 1, Resend.UNDECODABLE)

    def worker_crashed(self, message: str, deaths: int = 1, **details: Any) -> None:
        self.counters.worker_crashes += deaths
        self.emit("worker_crash", message, deaths=deaths, **details)

    def worker_recycled(self, message: str, **details: Any) -> None:
        self.counters.workers_recycled += 1
        self.emit("worker_recycled", message, **details)

    def rung_warning(self, message: str, **details: Any) -> None:
        self.emit("rung_warning", message, **details)

    # -- helpers -------------------------------------------------------------------

    def _settle(self, chunk: Chunk) -> None:
        """The one place a chunk leaves: after its rung's final report."""
        self.in_flight.discard(chunk)
        self.alone.discard(chunk)
        for timing in chunk.blind:
            timing.blind -= 1
        chunk.blind = ()
        _let_go(chunk, chunk.calls())
        rung = chunk.rung
        # Break the links a finished chunk holds, so no cycle keeps it alive.
        chunk.rung = None
        self.settled(rung)
        if self._drained is not None:
            self._drained.set()
        self.kick()

    def _again(self, chunk: Chunk, first: int, upto: int, why: Resend,
               crashes: int | None = None, suspect: bool = False,
               alone: bool = False, shared: bool = False) -> None:
        """Send positions [first, upto) of ``chunk`` again. Unless told otherwise, they
        keep the chunk's crash count when they are all of it (a suspect item that was
        lost with another's worker is still a suspect), and start afresh if not."""
        if upto <= first:
            return
        pieces = [p for p in chunk.pieces_between(first, upto)
                  if p.call.state is CallState.ACTIVE]
        if not pieces:
            return
        whole = (first, upto) == (0, chunk.size)
        if crashes is None:
            crashes = chunk.crashes if whole else 0
        if why is not Resend.MOVED:  # taken back unstarted from a busy worker: not a rerun
            self.counters.resubmitted_chunks += 1
        again = Chunk(pieces, crashes, suspect or why is Resend.SUSPECT)
        # Lost or taken back whole, it keeps its marks (a poison item's were reset: 36 runs).
        kept = whole and why in (Resend.LOST, Resend.MOVED)
        again.shared, alone = shared or (kept and chunk.shared), alone or (kept and chunk.alone)
        again.unexplained = chunk.unexplained if kept else 0
        again.place = (chunk.place[0], chunk.place[1] + first)
        self.emit("resubmit", f"resubmitting {again.size} item(s) ({why.value})",
                  size=again.size, reason=why.value)
        if alone:
            self.again.alone(again)
        elif why is Resend.SUSPECT:
            self.again.last(again)  # in a chunk of its own
        elif why is Resend.MOVED:
            self.again.moved(again)
        else:
            self.again.first(again)

    def _split(self, chunk: Chunk, why: Resend, parts: int = 2,
               suspect: bool = False, first: int | None = None) -> None:
        """Send positions [first, size) of ``chunk`` (its unreported rest by default)
        again in up to ``parts`` parts (halves by default), in order. Parts start their
        crash count afresh; a single part is as :meth:`_again` makes it (all of a
        suspect chunk taken back unstarted is still a suspect)."""
        first = chunk.reported if first is None else first
        rest = chunk.size - first
        count = min(parts, rest)
        if count <= 0:
            return
        bounds = [first + rest * i // count for i in range(count)]
        # Each goes to the head of the queue: the last first, so that they go in order.
        for lo, hi in reversed(list(zip(bounds, [*bounds[1:], chunk.size], strict=True))):
            self._again(chunk, lo, hi, why, None if count == 1 else 0, suspect=suspect)

    def _item_error(self, chunk: Chunk, position: int, where: Crossing,
                    cause: BaseException) -> None:
        piece, index = chunk.locate(position)
        if piece.call.state is not CallState.ACTIVE:
            return
        if where is Crossing.RESULT_LOAD:
            described = "its result"
            fix = "return plain data (built-in types, or classes importable in both processes)"
        else:
            item = piece.items[index - piece.start]
            if piece.call.star and isinstance(item, tuple | list):  # run(fn, *args)
                described = "its arguments ({})".format(
                    ", ".join(type(arg).__qualname__ for arg in item))
            elif piece.call.star:  # starmap: the item itself is not iterated here
                described = f"its arguments (a {type(item).__qualname__}, not a tuple)"
            else:
                described = f"its argument (a {type(item).__qualname__})"
            fix = ("pass plain, picklable data (no locks, sockets or generators; classes "
                   "importable by the workers)")
        error = SerializationError(f"item {index}: {described} {where.value}: {cause!r}; {fix}")
        error.index = index
        error.__cause__ = cause
        piece.call.deliver(index, [None], {0: error})
        self.counters.tasks_failed += 1

    def unpicklable(self, chunk: Chunk, errors: dict[int, BaseException],
                    cause: BaseException | None) -> None:
        """Some items of ``chunk`` cannot be pickled: they fail, the rest go again.
        Where none fails alone (an item nested too deep to pickle inside a chunk, but
        not by itself), the chunk is split, down to the item that fails alone."""
        if not errors:
            first = chunk.reported
            if chunk.size - first > 1:
                self._split(chunk, Resend.SPLIT)
                return
            errors = {first: cause or pool_made(SerializationError("the chunk could not be "
                                                                  "pickled"))}
        for position, cause in sorted(errors.items()):
            self._item_error(chunk, position, Crossing.ARGUMENT_DUMP, cause)
        start = 0
        for position in [*sorted(errors), chunk.size]:
            self._again(chunk, start, position, Resend.PICKLABLE)
            start = position + 1

    def _closed_under(self, chunk: Chunk) -> None:
        closed = PoolClosed("the pool was closed before this item finished")
        for piece, lo, hi, _ in chunk.between(chunk.reported, chunk.size):
            if piece.call.state is CallState.ACTIVE:
                piece.call.deliver(piece.start + lo, [None] * (hi - lo),
                                   dict.fromkeys(range(hi - lo), closed))
                self.counters.tasks_failed += hi - lo

    def alone_first(self) -> bool:
        """Whether a chunk to run alone waits, or runs for a call still waiting: until
        then nothing else goes out. (One whose call stopped no longer counts: its hung
        item held every other call.)"""
        return self.again.alone_waits() or any(
            p.call.state is CallState.ACTIVE for c in self.alone for p in c.pieces)

    def busy(self) -> bool:
        """Whether a chunk in flight runs for a call still waiting for it."""
        return len(self.in_flight) > len(self.orphans())

    def resend_waits(self) -> bool:
        """Whether items wait to go out again."""
        return self.again.waits()

    def next_resend(self, limit: int) -> Chunk | None:
        """The next items to send again, at most ``limit`` of them, if any wait."""
        return self.again.next(limit, self.config.target_chunk_seconds,
                               functools.partial(fixed_size, config=self.config))

    def abandoned(self, count: int) -> None:
        """A call ended leaving ``count`` of its items unfinished."""
        self.counters.tasks_abandoned += count

    # -- closing -------------------------------------------------------------------

    def close(self, kill: bool) -> None:
        """The pool closes: lost items fail; nothing new goes out, nor (``kill``) what
        goes again (a take-back answered as a graceful close began lost their items)."""
        self.closing = True
        self.finishing = not kill
        if kill:
            self.again.clear()

    def orphans(self) -> list[Chunk]:
        """Chunks still running items that nobody waits for (their calls timed out, were
        cancelled or failed). A chunk whose calls all finished has delivered every
        item and is only about to say so: it is no orphan."""
        return [c for c in self.in_flight
                if all(p.call.state is not CallState.ACTIVE for p in c.pieces)
                and any(p.call.state is CallState.ABANDONED for p in c.pieces)]

    def stop(self, chunks: list[Chunk], calls: set[int] | None = None) -> None:
        """Stop these chunks where they run (with ``calls``: only while an item of
        those runs). A rung that cannot lets them finish, and it is said."""
        for rung in {c.rung for c in chunks if c.rung is not None}:
            try:
                if not rung.kill([c for c in chunks if c.rung is rung], calls):
                    self.emit("rung_warning", f"the {rung.name} rung cannot stop running "
                              "tasks: those that started finish in the background "
                              "(those not started do not run)", rung=rung.name)
            except Exception:
                # The caller's own outcome (a deadline, a cancel) still goes first.
                logger.exception("the %s rung failed to stop chunks", rung.name)

    async def drained(self, coming: Callable[[], bool]) -> None:
        """Until every chunk in flight is an orphan and what goes again went (if it can:
        while workers start in place of lost ones, ``coming``, it waits for them)."""
        while True:
            while not self.in_flight <= set(self.orphans()):
                self._drained = anyio.Event()
                await self._drained.wait()
            if not self.again.waits():
                return
            waiting, was_coming = len(self.again), coming()
            await anyio.sleep(0.01)  # the flush that sends it
            if len(self.again) >= waiting and self.in_flight <= set(self.orphans()) and (
                    not was_coming and not coming()):
                # No rung or slot took it, nor will (a rung that came meanwhile is
                # given a turn: its first flush follows it).
                return


def _let_go(chunk: Chunk, calls: set[Call]) -> None:
    """``chunk`` holds no items of ``calls`` any more: one it was the last chunk of
    may be complete (its caller is woken)."""
    for call in calls:
        call.chunks.discard(chunk)
        if not call.chunks:
            call.wake()


def _named(error: BaseException, index: int) -> BaseException:
    """A serialization error found in a worker knows only its place in the chunk: name
    the item by its index in the input."""
    if type(error) is SerializationError and error.index is None and is_pool_made(error):
        named = SerializationError(f"item {index}: {error}")
        named.index = index
        named.__cause__ = error.__cause__
        return named
    return error

