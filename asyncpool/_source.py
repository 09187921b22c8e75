"""A call's input, pulled only as fast as the workers take it, never blocking the loop.

A list, tuple or range is sliced on the loop. Any other input (a generator, a file, a
``map``, a sequence of the caller's) is user code that may stall at any item, so it is
pulled in a thread (kept for the next input while idle): not even one slow item holds
the loop or the call's deadline (see :mod:`asyncpool._puller`). An async iterator, and
any input under a rate limit, is pulled by a feeder task into a small buffer.
Whatever arrives goes out at once when a worker is free: a slow input never waits for
a chunk to fill.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import random
import time
from collections import deque
from types import GeneratorType
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import anyio

from ._loop import current_loop
from ._puller import Batch, Outbox, Puller, pull_batch
from ._retry import is_transient
from ._sizing import rough_size


#: The most items :meth:`Source.fit` weighs one by one for a chunk.
FIT_LOOK = 2048


class RateLimit:
    """At most ``rate`` starts per second: one every 1/rate s, with no burst.

    Starts are spaced evenly, so no one-second window holds more than ``rate`` + 1 (a
    bucket of ``rate`` tokens would let 2 x rate through). What it lets through waits
    in its call's input until sent: a call holds at most :attr:`depth` such items (5 ms
    of the rate), and while one holds some, no other call's are let through (let
    through while every worker was busy, they all went out together after a stall).
    A call whose caller fell behind gives its starts back (see :meth:`Source.idle`),
    and one sent long after it was let through counts from when it went (see
    :meth:`went`). Works on any anyio loop.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.depth = max(1, int(rate * 0.005))
        self._last = -math.inf
        self._turn: Any = None
        self._holders: set[object] = set()
        self._free: Any = None

    async def acquire(self, holder: object) -> None:
        """Wait for the next start. Waiters take turns: only the first waits for a
        time, so one that leaves (its call cancelled or out of time) keeps no start
        from the others (each used to book its start ahead, and 20 calls that timed
        out pushed the next one's 10 s away)."""
        loop = current_loop()
        if self._turn is None:
            self._turn = loop.lock()
        async with self._turn:
            while self._holders - {holder}:
                self._free = loop.event()
                await self._free.wait()
            now = time.monotonic()
            at = max(now, self._last + self.interval)
            if at > now:
                await anyio.sleep(at - now)
            self._last = at

    def went(self, let_through: float, now: float) -> None:
        """A start let through at ``let_through`` went out ``now``: held past its turn
        (the workers were busy), the next one is spaced from now (two went together)."""
        if now - let_through > (self.depth + 1) * self.interval:
            self.spaced_from(now)

    def spaced_from(self, now: float) -> None:
        """The next start is at least an interval after ``now``."""
        self._last = max(self._last, now)

    def hold(self, holder: object) -> None:
        """``holder`` (a call's input) holds items it let through, unsent."""
        self._holders.add(holder)

    def let_go(self, holder: object) -> None:
        """``holder`` sent them all (or closed)."""
        self._holders.discard(holder)
        if not self._holders and self._free is not None:
            self._free.set()


class Source:
    """Where a call's items come from."""

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any],
                 limits: Sequence[RateLimit] = ()) -> None:
        #: The input has no more items (or raised); some may still be buffered.
        self.ended = False
        self.error: BaseException | None = None
        self.limits = list(limits)
        #: The caller's context variables, seen by the input's own code (a generator
        #: pulled in a thread, an async iterator by a task of the loop's), as they
        #: would be were it iterated by the caller (and as asyncio.to_thread does).
        self.context = contextvars.copy_context()
        self._seq: Sequence[Any] | None = None
        self._length: int | None = None
        self._it: Iterator[Any] | None = None
        self._ait: AsyncIterator[Any] | None = None
        self._pos = 0
        self._buffer: list[Any] = []
        #: Under rate limits: when each of the first buffered items was let through
        #: (items after those wait for a start: theirs went back, see idle).
        self._starts: deque[float] = deque()
        self._room: anyio.Event | None = None  # made by the feeder when it waits
        self._puller: Puller | None = None
        self._thread_context: contextvars.Context | None = None
        self._closed = False
        #: Items per slice a thread pulls before handing them over (see pull_batch).
        self._pace = [1]
        #: Whether a feeder task pulls (any input but a sequence with no rate limit).
        self.fed = bool(self.limits)
        if isinstance(items, AsyncIterable):
            self._ait = items.__aiter__()
            self.fed = True
        elif type(items) in (list, tuple) or (type(items) is range and _measurable(items)):
            # (Not a subclass: its code is the caller's.)
            self._seq = cast("Sequence[Any]", items)
        else:
            # Any other sequence is the caller's code too (a dataset reading from
            # disk, say, or a list subclass's __getitem__): it is pulled in a thread,
            # its length measured there (a __len__ that counts rows held the loop).
            # A generator is its own iterator; anything else's __iter__ is the caller's
            # code, which may block (open a file, a cursor): called in the thread too.
            kind = type(items)
            iterable = getattr(kind, "__iter__", None) is not None or (
                getattr(kind, "__getitem__", None) is not None)
            sized = isinstance(items, Sequence) and not isinstance(items, str | bytes)
            self._it = items if isinstance(items, GeneratorType) else (
                _iterate(items, self._measure if sized else None) if iterable
                else iter(items))  # not iterable: the TypeError says so, now
            self.fed = True

    def _measure(self, items: Sequence[Any]) -> None:
        try:
            self._length = len(items)
        except Exception:
            pass

    @property
    def done(self) -> bool:
        """Nothing more will come from :meth:`take`."""
        return self.ended and not self._buffer

    @property
    def remaining(self) -> int | None:
        """Items still to come, when known."""
        if self._seq is not None and not self.fed:
            return len(self._seq) - self._pos
        return None

    @property
    def total(self) -> int | None:
        """How many items the input has, when known."""
        return len(self._seq) if self._seq is not None else self._length

    @property
    def needs_feeder(self) -> bool:
        """Whether a feeder task must pull now."""
        return self.fed and not self.done and not self._closed

    @property
    def buffered(self) -> int:
        """Items read from the input and not yet taken."""
        return len(self._buffer)

    def available(self) -> bool:
        """Whether :meth:`take` may give something now."""
        if self.limits:
            if len(self._starts) < len(self._buffer) or not self._buffer:
                self.wake()  # their starts went back (see idle), or none came since
            return bool(self._starts)
        return bool(self._buffer) if self.fed else not self.ended

    def wake(self) -> None:
        if self._room is not None:
            self._room.set()

    def _ahead(self, count: int) -> tuple[Sequence[Any], int, int]:
        """Where the next ``count`` items at hand are: (sequence, start, end)."""
        if self.fed:
            ahead: Sequence[Any] = self._buffer
            start = 0
        elif self._seq is not None:
            ahead, start = self._seq, self._pos
        else:
            return (), 0, 0
        return ahead, start, min(len(ahead), start + max(1, count))

    def sample(self, count: int, size: int = 16) -> list[Any]:
        """Up to ``size`` of the next ``count`` items at hand: the first, the last and
        others picked at random (for sizing: the first alone may be small among big
        ones, and items may grow along the input)."""
        ahead, start, end = self._ahead(count)
        if end - start <= size:
            return list(ahead[start:end])
        # At random, not every n-th: items that alternate in size must not alias.
        return [ahead[start], ahead[end - 1]] + [
            ahead[i] for i in random.sample(range(start + 1, end - 1), size - 2)]

    def weigh(self, count: int, room: float, known: float | None) -> tuple[int, float]:
        """How many of the next ``count`` items fit in ``room`` bytes, and the bytes
        each counts for (``known``: what its function's items weighed so far).

        The biggest of a sample, not its mean: a chunk may come out small, but not many
        times over its bytes (the mean of a sample of small and big items in turn
        misjudged it 2.5x one time in fifty). Items that differ much in size are
        weighed one by one (small ones then big ones made a chunk of 19 MB).
        """
        sizes = [rough_size(item) for item in self.sample(count)]
        weight = max([known or 0, *sizes])
        if sizes and max(sizes) > 4 * min(sizes) + 256:
            count, used = self.fit(count, room)
            weight = used / count
        return count, weight

    def fit(self, count: int, room: float) -> tuple[int, float]:
        """How many of the next ``count`` items at hand fit in ``room`` bytes (at least
        one, at most :data:`FIT_LOOK`), and their bytes, judged one by one (when they
        differ in size). It runs on the loop: 16,000 items took it 6.5 ms, 2,048 1.6."""
        ahead, start, end = self._ahead(min(count, FIT_LOOK))
        taken, used = 0, 0.0
        for i in range(start, end):
            size = rough_size(ahead[i])
            if taken and used + size > room:
                break
            taken, used = taken + 1, used + size
        return max(1, taken), used

    def take(self, count: int) -> list[Any]:
        """Up to ``count`` items that can be had now, without waiting."""
        if self.fed:
            if self.limits:
                count = min(count, len(self._starts))
            taken = self._buffer[:count]
            del self._buffer[:count]
            if self.limits and taken:
                now, first = time.monotonic(), self._starts[0]
                for _ in taken:
                    self._starts.popleft()
                for limit in self.limits:
                    limit.went(first, now)
                    if not self._starts:
                        limit.let_go(self)
            self.wake()
            return taken
        return self._slice(count)

    def _slice(self, count: int) -> list[Any]:
        """The sequence's next ``count`` items."""
        assert self._seq is not None
        try:
            taken = list(self._seq[self._pos:self._pos + count])
        except BaseException as exc:  # (no await here: never a cancellation of ours)
            self.error, self.ended = exc, True
            return []
        self._pos += len(taken)
        if self._pos >= len(self._seq):
            self.ended = True
        return taken

    async def feed(self, want: Callable[[], int], arrived: Callable[[], None]) -> None:
        """Pull into the buffer while it holds fewer than ``want()`` items (the feeder
        task of a fed source); ``arrived()`` is called after each new item."""
        try:
            # Not after it closed: an input whose first wait is shielded kept this loop
            # reading on trio, where being cancelled reaches only unshielded waits.
            while not self._closed and not (self.done if self.limits else self.ended):
                if not self._short(want()):
                    self._room = room = anyio.Event()
                    await room.wait()
                    continue
                if self.limits and len(self._starts) < len(self._buffer):
                    # An item at hand waits for its start (pulled first: a start booked
                    # before a slow input gave its item went by unused, and the item
                    # went out later beside other calls' starts). The call's own limit
                    # first, then the pool's: booked first, the pool's turn went by
                    # while the call's was waited for. The call's own is counted from
                    # when the start came.
                    for limit in self.limits:
                        await limit.acquire(self)
                    if len(self.limits) > 1:
                        self.limits[0].spaced_from(time.monotonic())
                    self._let_through()
                    arrived()
                    continue

                def sink(items: list[Any]) -> None:
                    if items and not self._closed:
                        self._buffer.extend(items)
                        if not self.limits:  # (else once let through)
                            arrived()

                error, ended = await self._pull(1 if self.limits else max(1, want()), sink)
                if error is not None:
                    self.error, self.ended = error, True
                elif ended:
                    self.ended = True
                arrived()
        except BaseException as exc:
            # Whatever the input raised (a KeyboardInterrupt, an exception class of
            # its own, a CancelledError of something it awaited) is the call's error;
            # only this task's own cancellation is not.
            if _own_cancellation(exc):
                raise
            self.error, self.ended = exc, True
            arrived()

    def _short(self, want: int) -> bool:
        """Whether the feeder pulls now (under a rate limit: lets one through; ``want``
        is 0 while the caller is behind)."""
        if not self.limits:
            return len(self._buffer) < max(1, want)
        return len(self._starts) < (min(want, len(self._buffer)) if self.ended else want)

    def _let_through(self) -> None:
        """The next item waiting may start."""
        if not self._closed:  # (closed: nothing of it goes any more)
            self._starts.append(time.monotonic())
            for limit in self.limits:
                limit.hold(self)

    async def _pull(self, count: int, sink: Callable[[list[Any]], None]) -> Batch:
        """Up to ``count`` items into ``sink``, as they come."""
        if self._ait is not None:
            try:
                sink([await self._ait.__anext__()])
                return None, False
            except StopAsyncIteration:
                return None, True
        if self._seq is not None:  # under a rate limit
            sink(self._slice(count))
            return self.error, self.ended
        if self._it is None:  # closed: the call is over
            return None, True
        try:
            if self._puller is None:
                self._puller = Puller.take()
            # A copy of its own: the thread may pull while the feeder task runs in it.
            if self._thread_context is None:
                self._thread_context = self.context.copy()
            return await self._puller.pull(self._it, count, sink, self._pace,
                                           self._thread_context)
        except RuntimeError as exc:
            if not is_transient(exc):
                raise
        # No thread to pull in: one item at a time on the loop, with a turn between.
        await anyio.lowlevel.checkpoint()
        box = Outbox()
        return pull_batch(self._it, 1, box, functools.partial(box.drain, sink), self._pace)

    def idle(self) -> None:
        """What it holds waits for its caller, not for a worker: other calls' items
        are let through meanwhile (a paused ``imap`` held them all for good), and its
        own starts go back, to be asked for again (30 paused streams that resumed
        together each sent one item at once)."""
        self._starts.clear()
        for limit in self.limits:
            limit.let_go(self)

    def close(self) -> None:
        """Let the thread that pulled the input go (after the item it may be pulling);
        what it still hands over is dropped. The input is dropped too, in that thread:
        a generator nobody else holds is closed there, running its ``finally``
        blocks off the loop."""
        self._closed = True
        self.idle()
        # Handed over in a list the thread empties: a reference kept here (a local)
        # was at times the last one, and the generator closed on the loop after all.
        held, self._it = [self._it], None
        if self._puller is not None:
            self._puller.release(held)
            self._puller = None

    async def aclose(self) -> None:
        """Close an async generator input (sync generators close when dropped), and
        let the thread that pulled a slow one go."""
        self.close()
        closer = getattr(self._ait, "aclose", None)
        if closer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                try:
                    await closer()
                except Exception:
                    pass


def _measurable(items: range) -> bool:
    """Whether len() takes it (one past sys.maxsize items is iterated instead)."""
    try:
        len(items)
    except OverflowError:
        return False
    return True


def _iterate(items: Iterable[Any],
             measure: Callable[[Sequence[Any]], None] | None) -> Iterator[Any]:
    """``items``' iterator, made (and a sequence measured) where the first item is
    pulled."""
    if measure is not None:
        measure(cast("Sequence[Any]", items))
    yield from items


def _own_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` cancels the running task (on asyncio, a CancelledError raised by
    something the input awaited, cancelled elsewhere, does not)."""
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio: a Cancelled is always its scope's
        return True
    return task is None or task.cancelling() > 0
