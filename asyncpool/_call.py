"""The units of work: a call, the pieces of its input, and the chunks that carry them.

A :class:`Call` is one run/map/starmap/imap: its input, its items' outcomes and its
waiter. A :class:`Piece` is a run of consecutive items of one call, and a
:class:`Chunk` the pieces (of one or more calls) that travel and run together.

The engine takes pieces of the input with :meth:`Call.take` and hands outcomes back
with :meth:`Call.deliver`; the caller's task waits on :meth:`Call.wait` and reads what
arrived. A call never holds a slot of the pool, so however it ends (finished, failed,
timed out, cancelled, its input raising) it cannot leak one.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._errors import AsyncPoolError, FunctionUnavailable, RemoteError, is_pool_made
from ._options import CallOptions
from ._sizing import Timing, assemble
from ._source import Source

if TYPE_CHECKING:
    from ._functions import Shipped

K = TypeVar("K")

_ids = itertools.count(1)
_NONE: frozenset[int] = frozenset()


def _name_item(error: BaseException, index: int) -> None:
    """Say which item raised a task's own error (the pool's errors name it already):
    one note, this call's (one object raised again on the thread rung kept the first)."""
    try:  # past the class's own __setattr__ (a frozen dataclass's refuses any)
        notes = [n for n in getattr(error, "__notes__", None) or ()
                 if not str(n).startswith("asyncpool:")]
        object.__setattr__(error, "__notes__",
                           [*notes, f"asyncpool: raised by item {index} of the input"])
    except BaseException:  # noqa: BLE001 - a type that refuses notes (a SystemExit too)
        pass


class Mode(enum.Enum):
    LIST = "list"            # run, map, starmap: every result, in input order
    ORDERED = "ordered"      # imap: streamed in input order
    UNORDERED = "unordered"  # imap(ordered=False): streamed as they finish


class Crossing(enum.Enum):
    """Where an item failed to cross between the parent and a worker."""

    ARGUMENT_DUMP = "could not be pickled"
    ARGUMENT_LOAD = "could not be unpickled in the worker"
    RESULT_LOAD = "could not be unpickled in the parent"


class Resend(enum.Enum):
    """Why items of a chunk are sent again (the ``reason`` of a resubmit event)."""

    #: Taken back unstarted (from a busy worker, or cut short behind a long item):
    #: not a rerun.
    MOVED = "moved"
    #: The item that may have killed its worker, alone and last.
    SUSPECT = "suspect"
    #: A part of a chunk that crashed, not knowing which item did it.
    SPLIT = "split"
    #: Ran before the item that crashed its worker.
    INNOCENT = "innocent"
    #: Came after the item that crashed its worker.
    NOT_RUN = "not run"
    #: Their worker was killed, retired or shut down, or their rung stopped serving.
    LOST = "lost"
    #: A half of a chunk whose pickle failed, to find the item at fault.
    BISECT = "bisect"
    #: Their results would not unpickle in the parent: each runs alone.
    UNDECODABLE = "undecodable"
    #: The items of a chunk that pickle, without those that did not.
    PICKLABLE = "picklable"


#: ``partial`` lists at most this many items past those read from an input (a sequence
#: whose length is 10**13 raised MemoryError at the deadline).
PARTIAL_LIMIT = 1 << 24


def by_priority(ready: deque[Call]) -> None:
    """Dask's ``priority=`` among the calls at hand too (most of a call's items wait
    here, not on the cluster, which chooses among a few): the highest goes first."""
    if any(call.options.priority for call in ready):
        best = max(ready, key=lambda call: call.options.priority)
        ready.remove(best)
        ready.appendleft(best)


class CallState(enum.Enum):
    ACTIVE = "active"
    FINISHED = "finished"
    ABANDONED = "abandoned"  # failed, timed out or cancelled: its results are dropped


class Call:
    """The engine's record of one call."""

    def __init__(self, fn: Any, shipped: Shipped, star: bool, source: Source,
                 options: CallOptions, timing: Timing, mode: Mode,
                 event: Callable[[], Any]) -> None:
        self.id = next(_ids)
        self.fn = fn
        self.shipped = shipped
        self.star = star
        self.source = source
        self.options = options
        self.timing = timing
        self.mode = mode
        self.state = CallState.ACTIVE
        #: Items taken from the input so far (the index of the next one).
        self.pulled = 0
        #: Items with an outcome so far, and those handed to the caller (imap).
        self.finished = 0
        self.consumed = 0
        #: Chunks holding items of this call. Invariant: chunk in self.chunks iff some
        #: piece of chunk has call self and the chunk's rung has not reported it final.
        self.chunks: set[Chunk] = set()
        #: Finished values by the input index of their first item.
        self.segments: dict[int, list[Any]] = {}
        #: Offsets, in the segment starting at the key, of items that failed (their
        #: value is the exception): a task may also *return* an exception.
        self.failed_at: dict[int, frozenset[int]] = {}
        #: Unordered imap: (values, failed offsets) in finishing order.
        self.arrived: deque[tuple[list[Any], frozenset[int]]] = deque()
        #: Why the whole call failed (its input raised, no rung can serve, the pool
        #: closed), and the first item's exception (unless return_exceptions).
        self.error: BaseException | None = None
        self.first_error: BaseException | None = None
        #: A worker died running items of this call (its chunks then report each
        #: result as it is made, so another crash loses none).
        self.crashed = False
        #: Worker deaths while loading this call's function (it fails at the limit).
        #: Chunks made before the last one counted were already on their way when it
        #: happened: their deaths are the same event, seen by several workers at once.
        self.function_crashes = 0
        self.function_crash_seen = 0
        #: Seconds an item of this very call took, once measured (its function's
        #: timing serves all its calls: a call of tiny items among calls of big ones,
        #: judged by theirs, went one item a chunk).
        self.own_per_item: float | None = None
        #: When the caller stops waiting for it (anyio's clock; set as it starts to).
        self.deadline = math.inf
        self._make_event = event
        self._event: Any = None

    # -- the engine's side ---------------------------------------------------------

    @property
    def wants_input(self) -> bool:
        return (self.state is CallState.ACTIVE and self.error is None
                and self.first_error is None and not self.source.done)

    def input_failed(self) -> bool:
        """Whether the input raised; the call then fails with that exception."""
        error = self.source.error
        if error is not None and self.error is None:
            self.error = error
            self.wake()
        return error is not None

    def take(self, count: int) -> Piece | None:
        items = self.source.take(count)
        self.input_failed()
        if not items:
            if self.source.done:
                self.wake()
            return None
        piece = Piece(self, self.pulled, items)
        self.pulled += len(items)
        return piece

    def deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Items ``[start, start + len(values))`` finished; ``errors`` by offset."""
        if self.state is not CallState.ACTIVE:
            return
        if errors:
            values = list(values)
            for offset, exc in errors.items():
                values[offset] = exc
            first = errors[min(errors)]
            if self.first_error is None and not self.options.return_exceptions:
                self.first_error = first
                self.name_item(first, start + min(errors))
            # A function the workers cannot load fails the whole call once, even with
            # return_exceptions: every item would fail the same way.
            if (self.error is None and isinstance(first, FunctionUnavailable)
                    and is_pool_made(first)):
                self.error = first
            if self.first_error is not None or self.error is not None:
                self.source.close()  # it reads no more: what it let through never goes
        failed_at = frozenset(errors) if errors else _NONE
        if self.mode is Mode.UNORDERED:
            self.arrived.append((values, failed_at))
        else:
            self.segments[start] = values
            if errors:
                self.failed_at[start] = failed_at
        self.finished += len(values)
        self.wake()

    def name_item(self, error: BaseException, index: int) -> None:
        """Say in a note that input item ``index`` raised ``error``, a task's own (the
        pool's errors name their item; a RemoteError is a task's)."""
        if self.source.total != 1 and (isinstance(error, RemoteError) or not isinstance(
                error, AsyncPoolError)):
            _name_item(error, index)

    def end(self) -> None:
        """Its caller is gone: finished if every outcome came, else abandoned."""
        if self.state is CallState.ACTIVE:
            self.state = CallState.FINISHED if self.complete else CallState.ABANDONED

    def fail(self, error: BaseException) -> None:
        """The whole call fails with ``error`` (no rung to run it, a function the
        workers cannot load, a chunk that could not be sent, the pool closed)."""
        if self.error is None:
            self.error = error
        self.source.close()
        self.wake()

    @property
    def per_item(self) -> float | None:
        """Seconds an item takes, if measured: this call's own where its function's
        are not quicker; where they are slower, halfway (geometrically) between, as
        its items may turn as slow as the function's others (judged by its quick
        first items alone, a chunk of 20 slow ones held a worker 2 s)."""
        own, shared = self.own_per_item, self.timing.per_item
        if own is None or shared is None or own >= shared:
            return own if own is not None else shared
        return math.sqrt(own * shared)

    @property
    def complete(self) -> bool:
        return self.source.done and self.finished >= self.pulled

    @property
    def backlog(self) -> int:
        """Items taken from the input and not yet handed to the caller."""
        return self.pulled - (self.finished if self.mode is Mode.LIST else self.consumed)

    # -- the caller's side ---------------------------------------------------------

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        """Until something new arrives (every task waiting wakes: two consumers of one
        stream, each waiting, and one woke only when the other's wait replaced its)."""
        if self._event is None:
            self._event = self._make_event()
        await self._event.wait()

    def let_go(self) -> None:
        """The caller has what it gets: the error raised holds the frames that hold
        this call, which must not hold that error (a cycle) or the other results."""
        self.segments, self.failed_at, self.arrived = {}, {}, deque()
        self.error = self.first_error = self.source.error = None

    def results(self) -> list[Any]:
        """Every value in input order (``run``/``map``), once complete."""
        if len(self.segments) == 1:
            return next(iter(self.segments.values()))
        return assemble(self.segments)

    def partial(self, start: int = 0) -> list[Any]:
        """What finished, from input index ``start``, MISSING where nothing did."""
        if self.mode is Mode.UNORDERED:
            return [v for values, _ in self.arrived for v in values]
        # Items read from the input and not finished stand as MISSING.
        total = self.source.total
        if total is None or total - start > PARTIAL_LIMIT:  # (not a list of 10**13)
            total = self.pulled + self.source.buffered
        return assemble(self.segments, start=start, total=total)

    def next_ordered(self) -> tuple[list[Any], frozenset[int]] | None:
        """The values that follow those already handed over, in input order, and the
        offsets among them of the items that failed (their values are exceptions)."""
        values = self.segments.pop(self.consumed, None)
        if values is None:
            return None
        failed_at = self.failed_at.pop(self.consumed, _NONE)
        self.consumed += len(values)
        return values, failed_at

    def next_unordered(self) -> tuple[list[Any], frozenset[int]] | None:
        if not self.arrived:
            return None
        values, failed_at = self.arrived.popleft()
        self.consumed += len(values)
        return values, failed_at

    def __repr__(self) -> str:
        return (f"<Call {self.id} {self.state.value} pulled={self.pulled} "
                f"finished={self.finished}>")


class Piece:
    """Items ``[start, start + len(items))`` of one call's input."""

    __slots__ = ("call", "start", "items")

    def __init__(self, call: Call, start: int, items: list[Any]) -> None:
        self.call, self.start, self.items = call, start, items

    def __repr__(self) -> str:
        return f"<Piece call={self.call.id} [{self.start}, {self.start + len(self.items)})>"


class Holder(Protocol):
    """What a chunk knows of the rung holding it (a :class:`~asyncpool._rungs.Rung`,
    which imports this module)."""

    @property
    def name(self) -> str: ...
    def cancel(self, calls: Iterable[int]) -> None: ...
    def kill(self, chunks: Iterable[Chunk], calls: set[int] | None = None) -> bool: ...


class Chunk:
    """Pieces of one or more calls that travel and run together.

    Positions number the items of all pieces in order. Results come back in slices
    that cover positions in order, so ``reported`` is where the next slice starts.
    """

    __slots__ = ("pieces", "size", "crashes", "reported", "rung", "seq",
                 "payload_bytes", "born", "place", "moved", "suspect", "blind", "expected",
                 "alone", "shared", "unexplained")
    #: Chunks made so far in this process: each is numbered (``born``) in order.
    made = 0

    def __init__(self, pieces: list[Piece], crashes: int = 0, suspect: bool = False) -> None:
        self.pieces = pieces
        self.size = sum(len(p.items) for p in pieces)
        #: Crashes of this very set of items (meaningful for a single item).
        self.crashes = crashes
        self.reported = 0
        #: The rung holding the chunk, set by the rung.
        self.rung: Holder | None = None
        self.seq = 0
        self.payload_bytes = 0
        #: Part of a chunk whose worker died, culprit unknown: a rung whose workers
        #: run several chunks in one process (Dask) runs it alone.
        self.suspect = suspect
        #: The timings of its functions whose cost was unknown when it was made (see
        #: Timing.blind): it counts among their chunks out blind until it settles.
        self.blind: tuple[Timing, ...] = ()
        #: Seconds its items are expected to take, where known (set by its rung).
        self.expected = 0.0
        Chunk.made += 1
        self.born = Chunk.made
        #: Where its items stood when they were first sent: (the first chunk they went
        #: in, their position there). Parts sent again keep it (see in_order).
        self.place = (self.born, 0)
        #: Taken back unstarted from a busy worker, it waits to go again.
        self.moved = False
        #: Runs with nothing beside it (see Resends.alone).
        self.alone = False
        #: Its item was running when the fork server died (see Outcomes.chunk_crashed).
        self.shared = False
        #: Workers that died on their own holding it next, not begun (see Death.blame).
        self.unexplained = 0

    def between(self, first: int, upto: int) -> Iterator[tuple[Piece, int, int, int]]:
        """(piece, lo, hi, offset): the piece's own items [lo, hi) that lie within
        positions [first, upto), and the position of the piece's first item."""
        offset = 0
        for piece in self.pieces:
            end = offset + len(piece.items)
            if end > first and offset < upto:
                yield piece, max(first, offset) - offset, min(upto, end) - offset, offset
            if end >= upto:
                return
            offset = end

    def pieces_between(self, first: int, upto: int) -> list[Piece]:
        """New pieces holding positions [first, upto) (for sending them again)."""
        return [Piece(piece.call, piece.start + lo, piece.items[lo:hi])
                for piece, lo, hi, _ in self.between(first, upto) if hi > lo]

    def locate(self, position: int) -> tuple[Piece, int]:
        """The piece holding ``position``, and that item's index in its call's input."""
        for piece, lo, _, _ in self.between(position, position + 1):
            return piece, piece.start + lo
        raise IndexError(position)

    def calls(self) -> set[Call]:
        return {piece.call for piece in self.pieces}

    def cut(self, keep: int) -> set[Call]:
        """Only positions [0, keep) are its own now (its worker runs no more of it);
        the calls it no longer holds items of."""
        before = self.calls()
        self.pieces, self.size = self.pieces_between(0, keep), keep
        return before - self.calls()

    def __repr__(self) -> str:
        return f"<Chunk seq={self.seq} size={self.size} pieces={self.pieces}>"


def by_timing(chunk: Chunk, upto: int | None = None,
              seconds: float | Sequence[float] = 0.0) -> dict[Timing, tuple[int, float]]:
    """Items of the chunk's first ``upto`` positions by the timing of their function,
    with the seconds they took: ``seconds`` given for each piece (each run of the
    worker), or in all (then shared by count)."""
    return measured(chunk, upto, seconds, lambda piece: piece.call.timing)


def measured(chunk: Chunk, upto: int | None, seconds: float | Sequence[float],
             key: Callable[[Piece], K]) -> dict[K, tuple[int, float]]:
    """As :func:`by_timing`, by ``key(piece)``."""
    upto = chunk.size if upto is None else upto
    found: dict[K, tuple[int, float]] = {}
    for index, (piece, lo, hi, _) in enumerate(chunk.between(0, upto)):
        if isinstance(seconds, float | int):
            spent = seconds * (hi - lo) / upto
        elif index < len(seconds):
            spent = seconds[index]
        else:
            break  # not measured
        count, total = found.get(key(piece), (0, 0.0))
        found[key(piece)] = (count + hi - lo, total + spent)
    return found
