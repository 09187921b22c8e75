"""A call's input, pulled only as fast as the workers take it, never blocking the loop.

A sequence is sliced. A synchronous iterator's first batch is pulled in a thread, which
times it: an input that proves fast is then pulled on the loop in slices of at most
about a millisecond (until an item is seen to be slow again), and a slow one (a
generator that reads a slow file, say) stays in the thread, so not even its first item
holds the loop. An async iterator, and any input under a rate limit, is pulled by a
feeder task into a small buffer. Whatever
arrives goes out at once when a worker is free: a slow input never waits for a chunk
to fill.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import anyio

#: Longest stretch the loop spends pulling a synchronous input in one go (seconds).
PULL_SLICE = 0.001
#: A synchronous input slower than this per item is pulled in a thread instead.
SLOW_ITEM = 0.0005
#: Idle input threads kept for the next input, and for how long (seconds).
IDLE_THREADS = 4
IDLE_SECONDS = 5.0


class RateLimit:
    """At most ``rate`` starts per second: one every 1/rate s, with no burst.

    Starts are spaced evenly, so no one-second window holds more than ``rate`` + 1 (a
    bucket of ``rate`` tokens would let 2 x rate through). Works on any anyio loop.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = -math.inf

    async def acquire(self) -> None:
        now = anyio.current_time()
        at = max(now, self._next)
        self._next = at + self.interval
        if at > now:
            await anyio.sleep(at - now)


class Source:
    """Where a call's items come from."""

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any],
                 limits: Sequence[RateLimit] = ()) -> None:
        #: The input has no more items (or raised); some may still be buffered.
        self.ended = False
        self.error: BaseException | None = None
        self.limits = list(limits)
        self._seq: Sequence[Any] | None = None
        self._it: Iterator[Any] | None = None
        self._ait: AsyncIterator[Any] | None = None
        self._pos = 0
        self._buffer: list[Any] = []
        self._room: anyio.Event | None = None  # made by the feeder when it waits
        self._puller: _Puller | None = None
        self._step = 16
        #: Set while the feeder task must pull (async input, a slow iterator, a limit).
        self.fed = bool(self.limits)
        #: A synchronous input whose first batch the thread is yet to time.
        self._probing = False
        #: It proved fast: the loop pulls it once the buffer is empty.
        self._handed_back = False
        if isinstance(items, AsyncIterable):
            self._ait = items.__aiter__()
            self.fed = True
        elif isinstance(items, Sequence) and not isinstance(items, (str, bytes)):
            self._seq = items
        else:
            self._it = iter(items)
            self.fed = self._probing = True

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
        return len(self._seq) if self._seq is not None else None

    @property
    def needs_feeder(self) -> bool:
        """Whether a feeder task must pull now."""
        return self.fed and not self._handed_back and not self.done

    @property
    def buffered(self) -> int:
        """Items read from the input and not yet taken."""
        return len(self._buffer)

    def available(self) -> bool:
        """Whether :meth:`take` may give something now."""
        self._take_back()
        return bool(self._buffer) if self.fed else not self.ended

    def _take_back(self) -> None:
        """Pull on the loop from now on, if the input proved fast and the thread's
        batch is used up."""
        if self._handed_back and not self._buffer:
            self._handed_back = self.fed = False
            self.close()

    def take(self, count: int) -> list[Any]:
        """Up to ``count`` items that can be had now, without waiting."""
        self._take_back()
        if self.fed:
            taken = self._buffer[:count]
            del self._buffer[:count]
            if self._room is not None:
                self._room.set()
            return taken
        if self._seq is not None:
            try:
                taken = list(self._seq[self._pos:self._pos + count])
            except Exception as exc:  # a Sequence of the caller's whose items raise
                self.error, self.ended = exc, True
                return []
            self._pos += len(taken)
            if self._pos >= len(self._seq):
                self.ended = True
            return taken
        return self._pull_on_loop(count)

    def _pull_on_loop(self, count: int) -> list[Any]:
        assert self._it is not None
        taken: list[Any] = []
        started = time.perf_counter()
        while len(taken) < count:
            want = min(self._step, count - len(taken))
            before = time.perf_counter()
            got = 0
            try:
                # One by one into `taken`, so what came before an exception is kept.
                for item in itertools.islice(self._it, want):
                    taken.append(item)
                    got += 1
            except Exception as exc:
                self.error, self.ended = exc, True
                return taken
            now = time.perf_counter()
            if got < want:
                self.ended = True
                break
            if (now - before) / want > SLOW_ITEM:
                # Too slow for the loop: a thread pulls the rest.
                self.fed = True
                break
            if now - started > PULL_SLICE:
                break
            self._step = min(self._step * 2, 1 << 14)
        return taken

    async def feed(self, want: Callable[[], int], arrived: Callable[[], None]) -> None:
        """Pull into the buffer while it holds fewer than ``want()`` items (the feeder
        task of a fed source); ``arrived()`` is called after each new item."""
        try:
            while not self.ended:
                while len(self._buffer) >= max(1, want()):
                    self._room = room = anyio.Event()
                    await room.wait()
                for limit in self.limits:
                    await limit.acquire()
                got, error, took = await self._pull(1 if self.limits else max(1, want()))
                self._buffer.extend(got)
                if error is not None:
                    self.error, self.ended = error, True
                elif not got:
                    self.ended = True
                elif self._probing:
                    self._probing = False
                    if took <= SLOW_ITEM * len(got) and not self.limits:
                        self._handed_back = True  # fast: the loop pulls the rest
                        self.close()
                        arrived()
                        return
                arrived()
        except Exception as exc:
            self.error, self.ended = exc, True
            arrived()

    async def _pull(self, count: int) -> Batch:
        if self._ait is not None:
            try:
                return [await self._ait.__anext__()], None, 0.0
            except StopAsyncIteration:
                return [], None, 0.0
        if self._seq is not None:
            taken = list(self._seq[self._pos:self._pos + count])
            self._pos += len(taken)
            return taken, None, 0.0
        assert self._it is not None
        try:
            if self._puller is None:
                self._puller = _Puller.take()
            return await self._puller.pull(self._it, count)
        except RuntimeError as exc:
            if "can't start new thread" not in str(exc):
                raise
        # No thread to pull in: one item at a time on the loop, with a turn between.
        await anyio.lowlevel.checkpoint()
        return _pull_batch(self._it, 1)

    def close(self) -> None:
        """Let the thread that pulled the input go (after the item it may be pulling)."""
        if self._puller is not None:
            self._puller.release()
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


#: Items pulled, the input's exception if it raised after them, and the seconds taken.
Batch = tuple[list[Any], BaseException | None, float]


def _pull_batch(it: Iterator[Any], count: int) -> Batch:
    """Up to ``count`` items, returning early after 10 ms so slow inputs stream."""
    taken: list[Any] = []
    started = time.perf_counter()
    deadline = started + 0.01
    try:
        for item in it:
            taken.append(item)
            if len(taken) >= count or time.perf_counter() > deadline:
                break
    except Exception as exc:
        return taken, exc, time.perf_counter() - started
    return taken, None, time.perf_counter() - started


class _Puller:
    """Pulls a slow synchronous input in a daemon thread, one batch per request.

    A daemon, so an input blocked for good cannot hold the interpreter at exit (a
    worker thread of the loop's own pool would). Threads are kept for the next input
    while idle (at most :data:`IDLE_THREADS`, for :data:`IDLE_SECONDS`): starting one
    per call would cost a small map more than its items.
    """

    _idle: list[_Puller] = []
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Iterator[Any], int, Any, Any] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="asyncpool-input",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def take(cls) -> _Puller:
        """An idle thread, or a new one (RuntimeError if none can be started)."""
        with cls._lock:
            if cls._idle:
                return cls._idle.pop()
        return cls()

    def _run(self) -> None:
        while True:
            try:
                request = self._requests.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self in self._idle:  # not taken meanwhile: leave
                        self._idle.remove(self)
                        return
                continue
            if request is None:  # its input is done with: wait for the next one
                with self._lock:
                    if len(self._idle) < IDLE_THREADS:
                        self._idle.append(self)
                        continue
                return
            it, count, reply, loop = request
            loop.call_soon_threadsafe(functools.partial(reply, _pull_batch(it, count)))

    async def pull(self, it: Iterator[Any], count: int) -> Batch:
        from ._loop import current_loop

        loop = current_loop()
        done = loop.event()
        box: list[Batch] = []

        def reply(result: Batch) -> None:
            box.append(result)
            done.set()

        self._requests.put((it, count, reply, loop))
        await done.wait()
        return box[0]

    def release(self) -> None:
        """Done with this thread: it serves another input after the batch it may be
        pulling (if that ever ends)."""
        self._requests.put(None)

    @classmethod
    def _after_fork(cls) -> None:
        # A forked child has none of these threads: it must start its own.
        cls._idle = []
        cls._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Puller._after_fork)
