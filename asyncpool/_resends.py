"""Items waiting to go out again, and the order they go in.

Three kinds wait here. Items of a chunk whose worker died (and those after a result
that would not load) go first: they were running. A suspect, an item that may have
killed its worker, goes last, alone. Items taken back unstarted from a busy worker
(see :mod:`asyncpool._rebalance`) go back where they first stood, and the calls they
belong to take turns among them, as calls do with new work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from ._call import CallState, Chunk

#: Calls whose turns are remembered at most; beyond, the memory starts afresh.
TURNS_KEPT = 4096


class Resends:
    """The queue of chunks to send again (in the order they go)."""

    def __init__(self) -> None:
        self._queue: deque[Chunk] = deque()
        #: When each call's items taken back last went out again (see _take).
        self._turns: dict[int, int] = {}
        self._turn = 0

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def first(self, chunk: Chunk) -> None:
        """``chunk`` goes before all the others (it was running)."""
        self._queue.appendleft(chunk)

    def last(self, chunk: Chunk) -> None:
        """``chunk`` goes after all the others (a suspect, alone)."""
        self._queue.append(chunk)

    def moved(self, chunk: Chunk) -> None:
        """``chunk``, taken back unstarted, goes where its items first stood, before
        what was sent after them: taken back together, a running chunk's rest and the
        chunks queued behind it went in the reverse order (the first of sixteen small
        maps finished third)."""
        chunk.moved = True
        queue = self._queue
        at = next((i for i, other in enumerate(queue) if other.place > chunk.place),
                  len(queue))
        queue.insert(at, chunk)

    def waits(self) -> bool:
        """Whether items wait (those of calls that ended are dropped)."""
        queue = self._queue
        while queue and all(p.call.state is not CallState.ACTIVE for p in queue[0].pieces):
            queue.popleft()
        return bool(queue)

    def next(self, limit: int) -> Chunk | None:
        """The next items to send again, at most ``limit`` of them, if any wait."""
        queue = self._queue
        while queue:
            chunk = self._take()
            pieces = [p for p in chunk.pieces if p.call.state is CallState.ACTIVE]
            if not pieces:
                continue
            size = sum(len(p.items) for p in pieces)
            if size > limit:
                # Too big for this worker's remaining tasks: send the head now.
                head = Chunk(pieces).pieces_between(0, limit)
                rest = Chunk(Chunk(pieces).pieces_between(limit, size), chunk.crashes,
                             chunk.suspect)
                rest.place, rest.moved = (chunk.place[0], chunk.place[1] + limit), chunk.moved
                queue.appendleft(rest)
                pieces = head
            going = Chunk(pieces, chunk.crashes, chunk.suspect)
            going.place = chunk.place  # taken back again, it goes back there
            return going
        return None

    def clear(self) -> None:
        self._queue.clear()

    def _take(self) -> Chunk:
        """The head, unless it and those behind it were taken back unstarted; then, of
        those, the first of the call served longest ago (by where they first stood
        alone, a small map whose items were cut from the head of a chunk went behind
        two big maps' items, 2 s late)."""
        queue = self._queue
        if not queue[0].moved:
            return queue.popleft()
        best, at = -2, 0
        for index, chunk in enumerate(queue):
            if not chunk.moved:
                break
            turn = self._turns.get(chunk.pieces[0].call.id, -1)
            if best == -2 or turn < best:
                best, at = turn, index
            if turn < 0:
                break  # never served: none can come before it
        chunk = queue[at]
        del queue[at]
        if len(self._turns) >= TURNS_KEPT:
            self._turns.clear()
        self._turn += 1
        self._turns[chunk.pieces[0].call.id] = self._turn
        return chunk
