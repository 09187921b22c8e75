"""Items waiting to go out again, and the order they go in.

Four kinds wait here, each in a queue of its own. An item running at two deaths that
took every worker goes first, alone. Items of a chunk whose worker died (and those after a
result that would not load) go next: they were running. Items taken back unstarted
from a busy worker (see :mod:`asyncpool._rebalance`) go next, back where they first
stood, the calls with the fewest items left first (taking turns among equals), and
with them a suspect (an item that may have killed its worker, sent alone), which
otherwise goes last.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator

from ._call import Call, CallState, Chunk

#: Calls whose turns are remembered at most; beyond, the memory starts afresh.
TURNS_KEPT = 4096
#: The items left of a call whose input's length is unknown, while it is read.
UNKNOWN_LEFT = 1 << 40


class Resends:
    """The chunks to send again (iterated in the order they go)."""

    def __init__(self) -> None:
        self._first: deque[Chunk] = deque()
        self._moved: list[Chunk] = []  # by where their items first stood
        self._last: deque[Chunk] = deque()
        self._alone: deque[Chunk] = deque()
        #: When each call's items taken back last went out again (see _take).
        self._turns: dict[int, int] = {}
        self._turn = 0

    def __iter__(self) -> Iterator[Chunk]:
        return itertools.chain(self._alone, self._first, self._moved, self._last)

    def __len__(self) -> int:
        return len(self._alone) + len(self._first) + len(self._moved) + len(self._last)

    def first(self, chunk: Chunk) -> None:
        """``chunk`` goes before all the others (it was running)."""
        self._first.appendleft(chunk)

    def last(self, chunk: Chunk) -> None:
        """``chunk`` goes after all the others (a suspect, alone)."""
        self._last.append(chunk)

    def alone(self, chunk: Chunk) -> None:
        """``chunk`` (an item running at two deaths of the fork server) goes before
        all the others, with nothing running beside it: blamed with every item running
        beside it, an innocent one failed with the poison item."""
        chunk.alone = True
        self._alone.append(chunk)

    def alone_waits(self) -> bool:
        """Whether a chunk waits to run alone (those whose calls all ended are dropped)."""
        while self._alone and not _live(self._alone[0]):
            self._alone.popleft()
        return bool(self._alone)

    def moved(self, chunk: Chunk) -> None:
        """``chunk``, taken back unstarted, goes where its items first stood, before
        what was sent after them: taken back together, a running chunk's rest and the
        chunks queued behind it went in the reverse order (the first of sixteen small
        maps finished third)."""
        chunk.moved = True
        moved = self._moved
        at = next((i for i, other in enumerate(moved) if other.place > chunk.place),
                  len(moved))
        moved.insert(at, chunk)

    def waits(self) -> bool:
        """Whether items wait (chunks whose calls all ended are dropped)."""
        for queue in (self._alone, self._first, self._last):
            while queue and not _live(queue[0]):
                queue.popleft()
        self._moved = [c for c in self._moved if _live(c)]
        return bool(self)

    def next(self, limit: int, target: float = 0.0,
             chosen: Callable[[Call], int | None] = lambda call: None) -> Chunk | None:
        """The next items to send again, at most ``limit`` of them, if any wait (and
        of those taken back, what is now known to take about ``target`` seconds, or
        the chunk size the caller ``chosen``)."""
        while self:
            chunk = self._take()
            pieces = [p for p in chunk.pieces if p.call.state is CallState.ACTIVE]
            if not pieces:
                continue
            size = sum(len(p.items) for p in pieces)
            per_item = max((p.call.per_item or 0.0) for p in pieces)
            fixed = max((chosen(p.call) or 0) for p in pieces)
            if fixed:
                # Its own size: taken back on a loaded machine (a worker slow to
                # report), a call's chunks of 100 went out again one item at a time.
                limit = min(limit, fixed)
            elif chunk.moved and target and per_item:
                # Taken back in a few parts (not one per item, which flooded the loop),
                # each goes out a target's worth at a time: a part of 120 ms held a
                # small call that arrived meanwhile behind it.
                limit = min(limit, max(1, int(target / per_item)))
            if size > limit:
                # Too big for this worker's remaining tasks: send the head now; the
                # rest keeps its place.
                rest = Chunk(Chunk(pieces).pieces_between(limit, size), chunk.crashes,
                             chunk.suspect)
                rest.place = (chunk.place[0], chunk.place[1] + limit)
                if chunk.moved:
                    self.moved(rest)
                else:
                    self._first.appendleft(rest)
                pieces = Chunk(pieces).pieces_between(0, limit)
            going = Chunk(pieces, chunk.crashes, chunk.suspect)
            going.place = chunk.place  # taken back again, it goes back there
            going.alone, going.shared = chunk.alone, chunk.shared
            going.unexplained = chunk.unexplained if size <= limit else 0
            return going
        return None

    def clear(self) -> None:
        self._alone.clear()
        self._first.clear()
        self._moved.clear()
        self._last.clear()

    def _take(self) -> Chunk:
        """The next chunk: one to run alone, then one that was running; then, of those
        taken back and the first suspect, the one of the call with the fewest items
        left, the calls served longest ago first among equals. (By where they first
        stood alone, a small map whose items were cut from the head of a chunk went
        behind two big maps' items, 2 s late; a suspect that waited for every
        taken-back chunk waited 6 s while cuts kept coming; taking turns alone, sixteen
        small maps arriving together all finished near the end.)"""
        for queue in (self._alone, self._first):
            if queue:
                return queue.popleft()
        moved, turns = self._moved, self._turns

        def rank(chunk: Chunk) -> tuple[int, int]:
            return min((_left(p.call), turns.get(p.call.id, -1)) for p in chunk.pieces)

        best: tuple[int, int] | None = None
        at = -1
        for index, chunk in enumerate(moved):
            key = rank(chunk)
            if best is None or key < best:
                best, at = key, index
        if self._last and (best is None or rank(self._last[0]) < best):
            chunk = self._last.popleft()
        else:
            chunk = moved.pop(at)
        if len(turns) >= TURNS_KEPT:
            turns.clear()
        self._turn += 1
        for piece in chunk.pieces:
            turns[piece.call.id] = self._turn
        return chunk


def _live(chunk: Chunk) -> bool:
    return any(p.call.state is CallState.ACTIVE for p in chunk.pieces)


def _left(call: Call) -> int:
    """Items of ``call`` not finished yet, its input's unread ones included (an input
    of unknown length still read counts as endless)."""
    unread = call.source.remaining
    if unread is None:
        unread = 0 if call.source.done else UNKNOWN_LEFT
    return unread + call.pulled - call.finished

