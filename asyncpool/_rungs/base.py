"""What every rung is: a place chunks run, reporting each outcome to one listener.

A rung owns its capacity. ``offer()`` says whether a chunk can go now (and how many
items it may hold), ``submit()`` sends it, and from then on the rung reports exactly
one final outcome for it to the :class:`Listener` (done, crashed, lost or unloadable),
after any number of partial results. ``in_flight`` counts the chunks a rung holds: a
chunk leaves it just before its final report, in one place per rung (the process
rung's count is what its workers hold), and leaves the engine's chunks in flight on
that report.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._call import Resend

if TYPE_CHECKING:
    from .._call import Chunk


class RungState(enum.Enum):
    """A rung's life; only the rung's own methods change it."""

    SERVING = "serving"    # takes new chunks
    DRAINING = "draining"  # retired: finishes what it holds, takes nothing new
    CRASHED = "crashed"    # cannot run anything; what it held was reported lost
    CLOSED = "closed"


#: The moves a rung's life allows; any other is ignored (a rung closed, or crashed,
#: stays so).
MOVES = {
    RungState.SERVING: {RungState.DRAINING, RungState.CRASHED, RungState.CLOSED},
    RungState.DRAINING: {RungState.CRASHED, RungState.CLOSED},
    RungState.CRASHED: {RungState.CLOSED},
    RungState.CLOSED: set(),
}


class Listener(Protocol):
    """Where a rung reports what happened to each chunk (the engine's outcomes,
    :class:`~asyncpool._outcomes.Outcomes`)."""

    #: The pool is closing: a chunk given back now is sent again only if the close
    #: is graceful (nothing is taken back from a busy worker any more).
    closing: bool

    def chunk_progress(self, chunk: Chunk, first: int, upto: int, results: list[Any],
                       errors: dict[int, BaseException], nbytes: int = 0) -> None:
        """Positions [first, upto) of ``chunk`` finished (errors by position);
        ``nbytes``: what their results weighed, pickled (0: not pickled)."""

    def chunk_done(self, chunk: Chunk, upto: int, seconds: float | Sequence[float],
                   retried: int = 0) -> None:
        """Final: the chunk ended; positions from ``upto`` on did not run. ``seconds``
        is the time its items took (in all, or for each piece), ``retried`` the
        retries of transient errors."""

    def chunk_crashed(self, chunk: Chunk, culprit: int | None, exitcode: int | None,
                      deaths: int = 1, function: int = 0, shared: bool = False) -> None:
        """Final: the worker died while running the item at position ``culprit``
        (None: not known which), or while loading the function with id ``function``;
        nothing unreported came back. ``deaths`` is how many worker deaths the report
        stands for (Dask reports one for several); ``shared``: every worker died with
        it (their fork server did), so any item running then may be the one."""

    def chunk_lost(self, chunk: Chunk, why: Resend = Resend.LOST) -> None:
        """Final: the unreported items did not run through any fault of theirs (a
        worker that was killed, retired or shut down, or a chunk the rung took back
        before it ran, ``why=Resend.MOVED``): send them again."""

    def chunk_cut(self, chunk: Chunk, keep: int) -> None:
        """Only the first ``keep`` items of ``chunk`` will run where it is (the rest
        waited behind a long item): send the rest again now."""

    def chunk_unloadable(self, chunk: Chunk, error: BaseException) -> None:
        """Final: the worker could not unpickle the chunk's arguments."""

    def chunk_undecodable(self, chunk: Chunk, first: int, upto: int,
                          error: BaseException) -> None:
        """Results [first, upto) came back but do not unpickle here."""

    def rung_changed(self) -> None:
        """The rung has room again, or broke: look at the ladder again."""

    def worker_crashed(self, message: str, deaths: int = 1, **details: Any) -> None:
        """Workers died (``deaths`` of them) running chunks (an event, statistics)."""

    def worker_recycled(self, message: str, **details: Any) -> None:
        """A worker leaves after max_tasks_per_worker or max_worker_memory."""

    def rung_warning(self, message: str, **details: Any) -> None:
        """The rung runs below strength, or cannot do what was asked (an event)."""


class Rung:
    """One rung of the ladder."""

    name: ClassVar[str] = ""

    #: How many items run at once where this rung runs them (None: max_workers).
    lanes: int | None = None
    #: Auto-sized chunks hold at least this many seconds of work here (beside
    #: ``target_chunk_seconds``): where each chunk costs milliseconds to send.
    least_chunk_seconds = 0.0

    def __init__(self) -> None:
        self._state = RungState.SERVING
        #: Chunks submitted and not yet finally reported (the process and thread
        #: rungs count what they hold instead). It equals the chunks of this rung in the
        #: engine's own ledger, ``Outcomes.in_flight``, save between a final report
        #: and the engine's settling of it.
        self._in_flight = 0
        #: Why the rung stopped serving, once it CRASHED (if it knows).
        self.failure: BaseException | None = None

    @property
    def state(self) -> RungState:
        """Where it is in its life (changed by its own methods only)."""
        return self._state

    @property
    def in_flight(self) -> int:
        """Chunks submitted and not yet finally reported."""
        return self._in_flight

    def _move(self, state: RungState) -> bool:
        """Go to ``state`` if its life allows it (see :data:`MOVES`)."""
        if state not in MOVES[self._state]:
            return False
        self._state = state
        return True

    def _out_of_service(self, error: BaseException | None = None) -> None:
        """It can run nothing more (``error`` says why, if known); the caller tells the
        listener once what it held has been handed on."""
        if self._move(RungState.CRASHED) and error is not None:
            self.failure = error

    def offer(self) -> int | None:
        """0 if no chunk can go now; else the most items the next chunk may hold
        (None: any number)."""
        raise NotImplementedError

    def submit(self, chunk: Chunk) -> None:
        """Send ``chunk``; never blocks. Raises ChunkUnpicklable if some item cannot
        be pickled, before taking it. Once it set ``chunk.rung`` it holds the chunk,
        and owes its final report, even if it raises after that."""
        raise NotImplementedError

    def cancel(self, calls: Iterable[int]) -> None:
        """The items of these calls are no longer wanted: skip the ones not started."""

    def resume(self) -> None:
        """Its workers that someone stopped (SIGSTOP) go on (the pool closes)."""

    def forget(self, fn_id: int) -> None:
        """A call's function is no longer needed where this rung runs things."""

    def kill(self, chunks: Iterable[Chunk], calls: set[int] | None = None) -> bool:
        """Stop these chunks where they run (with ``calls``: only while an item of
        those calls runs, never another caller's); False if this rung cannot."""
        return False

    def retire(self) -> None:
        """Take no new chunks; close once the held ones are reported."""
        if self._state is RungState.SERVING:
            self._move(RungState.DRAINING)

    @property
    def workers(self) -> int:
        """How many workers (processes, threads) serve now."""
        return 1

    @property
    def capacity(self) -> int:
        """The most chunks this rung holds at once."""
        return 1

    @property
    def usable(self) -> bool:
        return self.state is RungState.SERVING

    def replacing(self) -> bool:
        """Whether workers start in place of lost ones (room comes without a chunk
        finishing)."""
        return False

    async def aclose(self, kill: bool) -> None:
        """Stop: ``kill`` stops running work; otherwise what runs finishes (the ladder
        closes a rung gracefully once the engine has no chunk left on it)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Its pool was dropped unclosed: stop now, with no await (from a finalizer,
        perhaps on another thread), killing what runs."""
        self._move(RungState.CLOSED)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.value} in_flight={self.in_flight}>"


class ChunkUnpicklable(Exception):
    """Some items of a chunk cannot be pickled: ``errors`` maps their positions to
    the reason."""

    def __init__(self, errors: dict[int, BaseException]) -> None:
        super().__init__(errors)
        self.errors = errors


def unpicklable_items(chunk: Chunk) -> dict[int, BaseException]:
    """Which items of a chunk cannot be pickled, by position, and why."""
    import cloudpickle

    errors: dict[int, BaseException] = {}
    position = 0
    for piece in chunk.pieces:
        for item in piece.items:
            try:
                cloudpickle.dumps(item, 5)
            except (Exception, SystemExit) as exc:
                errors[position] = exc
            position += 1
    return errors
