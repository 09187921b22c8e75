"""Sizing chunks from what items cost, and putting results back in input order.

Pure functions and small records: no I/O, no loop, no knowledge of calls or rungs.
"""

from __future__ import annotations

import math
from typing import Any

from ._errors import MISSING

#: Auto chunking keeps a chunk's pickled arguments (and results) near this size: the
#: parent pickles on the loop, and a 4 MiB pickle takes about 2 ms, while 25 MB chunks of
#: big items held the loop for tens of ms. Measured on 100 KB items (warm pool, 2
#: workers): 256 KiB chunks gave 544 MB/s, 1 MiB 803 MB/s, 4 MiB 930 MB/s.
TARGET_CHUNK_BYTES = 4 << 20
#: And sending a chunk (pickling its items, on the loop) aims at taking no longer than
#: this (s): items whose own pickling code is slow held the loop for a second.
SEND_SECONDS = 0.005
#: A chunk size the caller chose is kept, unless sending a chunk of it would hold the
#: loop longer than this (s).
HELD_SECONDS = 0.02
#: A guess of what sending costs that would allow chunks this big is dropped.
_NO_SEND_CAP = 1 << 15


def blend(known: float | None, measured: float) -> float:
    """A per-item cost, updated by a new measure: items that got slower are followed
    at once (a chunk too big delays its callers and unbalances the workers more than
    one too small costs), faster ones gradually."""
    if known is None:
        return measured
    if measured > known:
        return 0.3 * known + 0.7 * measured
    return 0.7 * known + 0.3 * measured


class Timing:
    """What one function's items cost, measured, and shared by every call of it.

    Until a chunk has come back sizes double from 1, so a slow item never sits in a
    big first chunk (as joblib's auto-batching starts); after that a chunk aims at
    ``target`` seconds of work and :data:`TARGET_CHUNK_BYTES` of pickled data.
    """

    __slots__ = ("per_item", "bytes_per_item", "result_bytes", "send_per_item",
                 "send_ramp", "_slow", "_sends", "ramp", "blind")

    def __init__(self) -> None:
        self.per_item: float | None = None
        self.bytes_per_item: float | None = None
        #: Pickled bytes of an item's result, where results come back pickled.
        self.result_bytes: float | None = None
        #: Seconds the loop spends sending an item, guessed while chunks of them take
        #: 1 ms or more (see observe_send).
        self.send_per_item: float | None = None
        #: Items a chunk may hold until sending is known to be quick: twice the
        #: biggest chunk sent in under 1 ms (the first chunk of items slow to pickle
        #: held the loop for 0.4 s).
        self.send_ramp = 64
        #: Which of the last four chunks took 1 ms or more to send (a bit each), and
        #: how many were sent (up to four).
        self._slow = 0
        self._sends = 0
        #: Items of the next chunk while nothing is measured yet.
        self.ramp = 1
        #: Chunks out while nothing is measured yet: one per lane (worker) at most, the
        #: rest waits for the first to come back. (Sent blind, a map of 200 ms items
        #: put 35 items, 7 s of work, on two workers before its first result; a call
        #: arriving then waited behind 12 of them.)
        self.blind = 0

    def grow(self) -> None:
        """A chunk went out before any came back: the next may be twice as big."""
        self.ramp = min(self.ramp * 2, 1 << 14)

    def held_cap(self) -> int:
        """For a chunk size the caller chose: no cap, until sending is known slow (two
        of the last four chunks: not one paused by a garbage collection); then what
        takes :data:`HELD_SECONDS` (its 100 items of 1 ms held the loop 0.1 s a chunk;
        one slow item in fifty keeps it whole)."""
        if self.send_per_item and self._slow & (self._slow - 1):
            return max(1, int(HELD_SECONDS / self.send_per_item))
        return 1 << 30

    def send_cap(self) -> int:
        """Items that fit in :data:`TARGET_CHUNK_BYTES` and :data:`SEND_SECONDS`, from
        what chunks weighed and took to send (and no more than ``send_ramp`` while
        that is not known). Not for a chunk size the caller chose."""
        cap = 1 << 30
        if self.bytes_per_item:
            cap = max(1, int(TARGET_CHUNK_BYTES / self.bytes_per_item))
        # Two of the last four were slow; or, among the first few, any was (one chunk
        # per worker goes out before a function's cost is known: the next must not
        # hold the loop for 64 items).
        slow = self._slow & (self._slow - 1) or (self._sends < 4 and self._slow)
        if self.send_per_item and slow:
            cap = min(cap, max(1, int(SEND_SECONDS / self.send_per_item)))
        elif self.send_ramp < _NO_SEND_CAP:
            cap = min(cap, self.send_ramp)
        return cap

    def observe_send(self, items: int, seconds: float) -> None:
        """A chunk of ``items`` took ``seconds`` of the loop to send. One of 1 ms or
        more sets what an item costs (or keeps half the previous guess, if that is
        more: where one item in fifty is slow to pickle, the next chunk may hold two);
        a quicker one halves the guess. The guess caps chunks once two of the last four
        were slow: a pause of the loop (a garbage collection) in one chunk does not
        shrink the next ones, while items that are slow, if only now and then, keep
        chunks small."""
        if items <= 0:
            return
        guess = self.send_per_item
        self._slow = ((self._slow << 1) | (seconds >= 0.001)) & 0b1111
        self._sends = min(self._sends + 1, 4)
        if seconds >= 0.001:
            per_item = seconds / items
            self.send_per_item = per_item if guess is None else max(per_item, guess / 2)
        else:
            self.send_ramp = max(self.send_ramp, 2 * items)
            if guess is not None:
                guess /= 2
                self.send_per_item = guess if SEND_SECONDS / guess < _NO_SEND_CAP else None

    def observe(self, items: int, seconds: float) -> None:
        if items <= 0:
            return
        self.per_item = blend(self.per_item, seconds / items)

    def observe_bytes(self, items: int, size: int) -> None:
        """A chunk of ``items`` pickled to ``size`` bytes."""
        self.bytes_per_item = _heaviest(self.bytes_per_item, items, size)

    def observe_results(self, items: int, size: int) -> None:
        """The results of ``items`` came back as ``size`` pickled bytes."""
        self.result_bytes = _heaviest(self.result_bytes, items, size)

    @property
    def weight(self) -> float:
        """The bytes an item holds in the parent, going out or coming back (0: not
        known)."""
        return max(self.bytes_per_item or 0.0, self.result_bytes or 0.0)


def _heaviest(known: float | None, items: int, size: int) -> float | None:
    """Bytes per item, rising at once and falling slowly (a sample of small items
    must not hide the big ones)."""
    if items <= 0 or size <= 0:
        return known
    per_item = size / items
    if known is None or per_item > known:
        return per_item
    return 0.7 * known + 0.3 * per_item


#: How many values :func:`rough_size` looks at inside one item, at most.
LOOK = 48


def rough_size(item: Any) -> int:
    """A cheap estimate, from below, of what ``item`` pickles to, from at most
    :data:`LOOK` values inside it: strings, bytes and arrays by their length, numbers
    by their smallest pickle, a container from some of its values scaled to its
    length, an object by its attributes. Items differ from what a function's earlier
    items weighed: a chunk's bytes are bounded by this before anything is pickled on
    the loop."""
    return _size(item, [LOOK], 0)


def _size(value: Any, budget: list[int], depth: int) -> int:
    budget[0] -= 1
    kind = type(value)
    if kind in (str, bytes, bytearray):
        return len(value)
    if kind in (int, bool, float):
        return 2 if kind is not float else 9
    if kind is memoryview or kind.__name__ == "ndarray":
        return int(value.nbytes)
    if depth >= 6 or budget[0] <= 0:
        return 1
    if kind is dict:
        count = len(value)
        picks: Any = list(value.items())[:32] if count <= 64 else [
            pair for _, pair in zip(range(8), value.items(), strict=False)]
    elif kind in (list, tuple):
        count = len(value)
        picks = value if count <= 16 else [value[i * count // 8] for i in range(8)]
    elif kind in (set, frozenset):
        count = len(value)
        picks = [v for _, v in zip(range(8), value, strict=False)]
    else:
        state = getattr(value, "__dict__", None)
        return _size(state, budget, depth + 1) if type(state) is dict else 1
    if not count:
        return 1
    seen = sum(_size(v, budget, depth + 1) for v in picks)
    return seen * count // max(1, len(picks)) + 1


def guided_cap(remaining: int | None, lanes: int) -> int | None:
    """With ``remaining`` items known, chunks shrink as the input ends, so the last
    ones finish together instead of one worker running a full chunk alone."""
    if remaining is None:
        return None
    return max(1, math.ceil(remaining / (2 * max(1, lanes))))


def assemble(segments: dict[int, list[Any]], *, start: int = 0,
             total: int | None = None) -> list[Any]:
    """Values in input order from index ``start``, :data:`MISSING` in the gaps."""
    out: list[Any] = []
    for first in sorted(segments):
        if first < start:
            continue
        if len(out) < first - start:
            out.extend([MISSING] * (first - start - len(out)))
        out.extend(segments[first])
    if total is not None and len(out) < total - start:
        out.extend([MISSING] * (total - start - len(out)))
    return out
