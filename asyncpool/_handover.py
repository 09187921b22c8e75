"""Handing over what finished before an item that runs long.

:func:`~asyncpool._execute.execute` hands results over between items, at most every
flush interval. The results of items that finished just before one that runs for
long (or hangs until its call's deadline kills it) would wait for that item: a
deadline's ``.partial`` would miss them, and a crash would run them again.

One daemon thread per process looks at each running chunk every :data:`PERIOD`; when a
chunk's count of finished items has not moved for a whole period while some of them
wait, it hands those over itself. It exists only while chunks run (it leaves after
:data:`IDLE_SECONDS` without one), and where no thread can be started, chunks run
without it, as before.
"""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    #: Hands over positions [first, upto): (first, upto, results, errors by position).
    Late = Callable[[int, int, list[Any], dict[int, BaseException]], Any]

#: How often (s) the watcher looks at the running chunks while results wait in them:
#: what waits behind a long item is handed over within two periods. Every 5 ms cost a
#: sequential run() about 10% here (the watcher's wake-ups); every 20 ms is within noise.
PERIOD = 0.02
#: While no result waits (chunks of one item, long items each handed over as they
#: finish), the watcher looks ever less often, down to this: each look takes the
#: interpreter lock from a worker that is busy, about 1% of a CPU-bound service.
LAZY_PERIOD = 0.2
#: How long (s) the watcher stays without a chunk to look at.
IDLE_SECONDS = 1.0
#: Called at each look while chunks run (a worker process reads what its parent sent
#: meanwhile); it must not block, and returns False if it could not read now.
on_look: Callable[[], Any] | None = None
#: Set in a worker process: waits up to the seconds given for its parent to send
#: something (True if it did). Between looks, what the parent sends is then read at
#: once (a chunk taken back, a cancellation), not at the next look.
wait_for_parent: Callable[[float], bool] | None = None


class Running:
    """What one running chunk shares with the watcher.

    The chunk's thread notes a failed item's error, then appends its result: an
    appended result is a finished item, and nothing more is written per item. The
    results from position ``flushed`` on are not handed over yet. Whoever hands some
    over (the chunk's thread or the watcher) holds ``lock`` while doing so.
    """

    __slots__ = ("lock", "results", "errors", "flushed", "seen", "late")

    def __init__(self, results: list[Any], errors: dict[int, BaseException],
                 late: Late) -> None:
        self.lock = threading.Lock()
        self.results = results
        self.errors = errors
        self.flushed = 0
        self.seen = -1
        self.late = late

    def look(self, now: bool = False) -> bool:
        """In the watcher: hand over what waits behind an item that runs long (or,
        ``now``, whatever waits). Returns whether any result was waiting."""
        waiting = len(self.results)
        done = self.flushed + waiting
        if not waiting or (done != self.seen and not now):
            self.seen = done  # nothing waits, or items are still finishing
            return bool(waiting)
        with self.lock:
            taken = self.take()
            if taken is None:
                return False
            try:
                self.late(*taken)
            except BaseException:  # the other side is gone: the chunk's thread will see
                pass
        return True

    def take(self) -> tuple[int, int, list[Any], dict[int, BaseException]] | None:
        """What finished and was not handed over: (first, upto, results, errors by
        position), now taken. The caller holds ``lock``."""
        first = self.flushed
        count = len(self.results)
        if not count:
            return None
        results = self.results[:count]
        del self.results[:count]
        upto = first + count
        errors = {p: self.errors.pop(p) for p in [p for p in self.errors if p < upto]}
        self.flushed = upto
        return first, upto, results, errors


_lock = threading.Lock()
_running: set[Running] = set()
_watching = False


def watch(running: Running) -> None:
    """Look at ``running`` until :func:`unwatch`. No thread is woken: the watcher
    looks every :data:`PERIOD` while it lives, so a chunk shorter than that costs it
    nothing."""
    global _watching
    with _lock:
        _running.add(running)
        if _watching:
            return
        try:
            threading.Thread(target=_watch, name="asyncpool-handover", daemon=True).start()
        except RuntimeError:  # no thread can be started: results wait for the item
            return
        _watching = True


def hand_over_now() -> None:
    """In the watcher: hand over what finished in every running chunk at once."""
    for running in list(_running):
        running.look(now=True)


def unwatch(running: Running) -> None:
    with _lock:
        _running.discard(running)


def _watch() -> None:
    global _watching
    idle_since: float | None = None
    period = PERIOD
    while True:
        _nap(period)
        with _lock:
            running = list(_running)
            if not running:
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= IDLE_SECONDS:
                    _watching = False
                    return
                continue
        idle_since = None
        waited = [chunk.look() for chunk in running]
        hook = on_look
        if hook is not None:
            try:
                hook()
            except BaseException:  # the parent is gone: the chunk's thread will see
                pass
        period = PERIOD if any(waited) else min(period * 2, LAZY_PERIOD)


def _nap(seconds: float) -> None:
    """Sleep ``seconds``; while chunks run, read what the parent sends meanwhile."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        wait, hook = wait_for_parent, on_look
        if wait is None or hook is None or not _running:
            time.sleep(left)
            return
        if wait(left):
            try:
                read = hook()
            except BaseException:  # the parent is gone: the chunk's thread will see
                read = False
            if read is False:
                time.sleep(0.001)  # the chunk's own thread is reading it


def _after_fork() -> None:
    # A forked child has no watcher thread: the next chunk starts one.
    global _lock, _watching, on_look, wait_for_parent
    _lock = threading.Lock()
    _running.clear()
    _watching = False
    on_look = wait_for_parent = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
