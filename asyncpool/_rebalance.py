"""Work taken back from a worker because its chunks were sized on a cost far too low,
and how what is taken back goes out again.

A chunk is sized on what its function's items cost so far. That can be far off: a
function timed on cheap calls, then given slow arguments; a call whose items turn slow
after quick ones. Such a chunk holds a worker for many times the target, and a request
behind it waited 1.9 s. Once two reports in a row of the running chunk say that what
is left of it will take far too long (one slow item among quick ones says it once:
cutting there resent 200,000 quick items one by one), it is cut short after its item,
with those behind it of the same functions, and the rest goes out again in a few
chunks sized on what is now known. A chunk size the caller chose is kept as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import _wire

if TYPE_CHECKING:
    from ._call import Call, Chunk
    from ._config import PoolConfig

#: A chunk whose items left are seen to cost this many target chunks is taken back.
OVERLONG = 10
#: Nothing more is queued on a worker (a process or a thread) that has reported no
#: progress for this long (s) (five flushes): it may be in a long (or hung) item, and
#: what would wait behind it goes to the next free worker instead; what waits already
#: (in its socket, or in the chunk it runs) is taken back for an idle one.
STUCK_SECONDS = 0.025


class Pace:
    """How a worker's running chunk goes, report by report."""

    __slots__ = ("began", "last", "slow", "per_item")

    def __init__(self) -> None:
        self.began = self.last = 0.0  # when it started; when it last reported
        self.slow = 0  # reports in a row whose own pace says the rest is far over
        self.per_item = 0.0  # seconds per item, by its last reports

    def start(self, now: float) -> None:
        """A chunk starts running (sent to an idle worker, or the one before ended)."""
        self.began = self.last = now
        self.slow = 0
        self.per_item = 0.0

    def report(self, chunk: Chunk, first: int, upto: int, now: float,
               config: PoolConfig, behind: int = 0) -> bool:
        """Items [first, upto) of ``chunk``, running, reported at ``now`` with
        ``behind`` items waiting after it on its worker: whether it looks far over
        (see :func:`overlong`)."""
        pace = (now - self.last) / max(1, upto - first)
        self.last = now
        over = (chunk.size - upto + behind) * pace > OVERLONG * config.target_chunk_seconds
        self.slow = self.slow + 1 if over else 0
        self.per_item = min(self.per_item, pace) if self.slow >= 2 else pace
        return self.slow >= 2


def fixed_size(call: Call, config: PoolConfig) -> int | None:
    """The chunk size the caller chose for ``call`` (its own, or the pool's), if any."""
    return call.options.chunk_size or config.chunk_size


def chosen(chunk: Chunk, config: PoolConfig) -> bool:
    """Whether the caller chose the size of ``chunk``."""
    return any(fixed_size(p.call, config) for p in chunk.pieces)


def overlong(running: Chunk, ran: float, behind: Iterable[Chunk],
             config: PoolConfig, pace: float = 0.0) -> list[Chunk]:
    """What to take back from a worker that has run chunk ``running`` for ``ran``
    seconds (``pace``: seconds per item by its last reports), with ``behind`` waiting
    there: nothing, or it with those of its functions behind it, when together they
    are far over. The functions' cost is updated first (the rest goes out again sized
    on it). (Each chunk alone under the line, six of 160 ms were queued on two workers,
    sized on a cost measured on cheap calls: a request waited behind them all.)"""
    left = running.size - running.reported
    if chosen(running, config):
        return []
    timings = {p.call.timing for p in running.pieces}
    same = [c for c in behind if c is not running and not chosen(c, config)
            and {p.call.timing for p in c.pieces} <= timings]
    # Its items now, not on average: after 200 quick items, a chunk's 100 slow ones
    # looked cheap by the average over all it ran, and held their worker 0.4 s.
    per_item = max(ran / max(1, running.reported), pace)
    if (left + sum(c.size for c in same)) * per_item <= OVERLONG * config.target_chunk_seconds:
        return []
    # The function of the items just reported is the one found slow (the next item
    # may be another's): it is charged, the others keep their cost (a cheap function
    # sharing the chunk was charged 6.5 times its cost).
    slow = running.locate(max(0, running.reported - 1))[0].call.timing
    slow.observe(1, per_item)
    return [running, *same] if left >= 2 else same


def resend_parts(chunk: Chunk, first: int, config: PoolConfig) -> int:
    """In how many chunks positions [first, size) of ``chunk``, taken back, go out
    again: as many as what they are now known to cost fills, two per worker at most
    (a part still far over is cut again in its turn; one part per item flooded the
    loop)."""
    if chosen(chunk, config):
        return 1
    pieces = chunk.pieces_between(first, chunk.size)
    per_item = max((p.call.timing.per_item or 0.0) for p in pieces)
    rest = chunk.size - first
    return max(1, min(rest, 2 * config.max_workers,
                      math.ceil(rest * per_item / config.target_chunk_seconds)))


def work_held(chunks: Iterable[Chunk]) -> float:
    """Seconds a worker's ``chunks`` are expected to take still (what is known of them)."""
    return sum(c.expected * (c.size - c.reported) / c.size for c in chunks if c.size)


def has_waiting(chunks: Sequence[Chunk], progress: Any) -> bool:
    """Whether items wait in a worker behind the one it runs (its ``chunks``, and its
    ``progress`` area)."""
    if len(chunks) != 1:
        return len(chunks) > 1
    seq, position = int(progress[_wire.SEQ]), int(progress[_wire.POSITION])
    return chunks[0].seq != seq or position + 1 < chunks[0].size
