"""Reading a synchronous input in a thread, so that no item of it holds the loop.

One daemon thread per input being read (kept for the next input while idle) pulls a
batch at a time into an :class:`Outbox` the loop takes from: after every slice, and
also while the input stalls on its next item.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._loop import current_loop

#: Longest stretch (s) a thread pulls one batch: a slow input streams item by item.
BATCH_SECONDS = 0.01
#: Idle input threads kept for the next input, and for how long (seconds).
IDLE_THREADS = 4
IDLE_SECONDS = 5.0

#: How a pull ended: the input's exception if it raised, and whether it is exhausted.
Batch = tuple[BaseException | None, bool]


class Outbox:
    """Items a thread pulled and the loop has not taken yet, in order. The thread
    extends ``items`` as each item comes; the loop takes from its front, also while
    the thread waits for an item that stalls."""

    __slots__ = ("items", "taken", "lock")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.taken = 0
        self.lock = threading.Lock()

    def count(self) -> int:
        """Items put in so far."""
        with self.lock:
            return self.taken + len(self.items)

    def drain(self, sink: Callable[[list[Any]], None]) -> None:
        """On the loop: hand what is there to ``sink``."""
        with self.lock:
            items = self.items[:]
            del self.items[:len(items)]  # the thread may have added more meanwhile
            self.taken += len(items)
        if items:
            sink(items)


def pull_batch(it: Iterator[Any], count: int, box: Outbox, notify: Callable[[], None],
                pace: list[int]) -> Batch:
    """Up to ``count`` items into ``box``, for at most :data:`BATCH_SECONDS`; after each
    slice, ``notify()``. ``pace[0]``, the slice size, grows while slices come fast and
    shrinks when they do not."""
    rested = time.perf_counter()
    deadline = rested + BATCH_SECONDS
    pulled = 0
    while pulled < count:
        step = min(pace[0], count - pulled)
        before = box.count()
        started = time.perf_counter()
        try:
            # What came before an exception is in the box.
            box.items.extend(itertools.islice(it, step))
        except BaseException as exc:  # SystemExit too: it is the call's error
            notify()
            return exc, True
        got = box.count() - before
        notify()
        pulled += got
        if got < step:
            return None, True
        now = time.perf_counter()
        if now - rested > 0.001:  # let the loop's thread have the GIL it waits for
            time.sleep(0)
            rested = now
        if now - started < 0.001:
            pace[0] = min(pace[0] * 2, 4096)
        elif now - started > 0.004:
            pace[0] = max(1, pace[0] // 2)
        if now > deadline:
            break
    return None, False


#: Asks an idle input thread to leave.
_LEAVE: tuple[Any, ...] = ()
#: Marks a request to drop an input (its generator's ``finally`` runs off the loop).
_DROP = object()


class Puller:
    """Pulls a synchronous input in a daemon thread, one batch per request.

    A daemon, so an input blocked for good cannot hold the interpreter at exit (a
    worker thread of the loop's own pool would). Threads are kept for the next input
    while idle (at most :data:`IDLE_THREADS`, for :data:`IDLE_SECONDS`): starting one
    per call would cost a small map more than its items.
    """

    _idle: list[Puller] = []
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="asyncpool-input",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def take(cls) -> Puller:
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
            if request is _LEAVE:
                return
            if request and request[0] is _DROP:
                request[1].clear()  # the last reference to the input, maybe: dropped here
                del request
                continue
            if request is None:  # its input is done with: wait for the next one
                with self._lock:
                    if len(self._idle) < IDLE_THREADS:
                        self._idle.append(self)
                        continue
                return
            it, count, box, drain, pace, reply, loop, context = request

            def notify(drain: Any = drain, loop: Any = loop) -> None:
                loop.call_soon_threadsafe(drain)

            # After every slice's drain: the loop runs callbacks in the order they came.
            loop.call_soon_threadsafe(functools.partial(
                reply, context.run(pull_batch, it, count, box, notify, pace)))
            # Idle, it must not keep the input (a file, say) alive.
            del request, it, box, drain, notify, reply, loop, context

    async def pull(self, it: Iterator[Any], count: int, sink: Callable[[list[Any]], None],
                   pace: list[int], context: contextvars.Context) -> Batch:
        """Pull up to ``count`` items of ``it`` in this thread (in ``context``); each slice goes to
        ``sink`` on the loop as soon as it is pulled, and what came before an item
        that stalls within :data:`BATCH_SECONDS` (a burst, then a wait: the rest of a
        big slice waited with it)."""
        loop = current_loop()
        done = loop.event()
        outcome: list[Batch] = []
        box = Outbox()

        def reply(result: Batch) -> None:
            outcome.append(result)
            done.set()

        self._requests.put((it, count, box, functools.partial(box.drain, sink), pace, reply,
                            loop, context))
        del it  # (this frame, cancelled after the call closed its input, was its last)
        while not outcome:
            try:
                async with loop.fail_after(BATCH_SECONDS):
                    await done.wait()
            except TimeoutError:
                box.drain(sink)
        return outcome[0]

    def release(self, held: list[Any] | None = None) -> None:
        """Done with this thread: it empties ``held`` (the input, in a list, so that
        the caller keeps no reference to it), then serves another input after the
        batch it may be pulling (if that ever ends)."""
        if held is not None:
            self._requests.put((_DROP, held))
        self._requests.put(None)

    @classmethod
    def release_idle(cls) -> int:
        """Let every idle thread leave now (not after :data:`IDLE_SECONDS`); returns
        how many there were."""
        with cls._lock:
            idle, cls._idle = cls._idle, []
        for puller in idle:
            puller._requests.put(_LEAVE)
        return len(idle)

    @classmethod
    def _after_fork(cls) -> None:
        # A forked child has none of these threads: it must start its own.
        cls._idle = []
        cls._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=Puller._after_fork)
