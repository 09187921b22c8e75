"""The running event loop, seen the same way under asyncio and trio.

The engine needs a few things anyio does not offer as plain callbacks: run a function
on the loop soon (from the loop or another thread), be called whenever a file
descriptor is readable or writable, and own background tasks that are not tied to the
task that opened the pool. :class:`Loop` gives them for whichever loop is running.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("asyncpool")

Callback = Callable[[], object]


class Loop:
    """The loop a pool was opened on; every method but the threadsafe one runs on it."""

    name = ""

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop after the current step."""
        raise NotImplementedError

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Like :meth:`call_soon`, from any thread; dropped if the loop has closed."""
        raise NotImplementedError

    def call_after_timers(self, callback: Callback) -> None:
        """Like :meth:`call_soon`, but after the timers already due, and the tasks they
        wake, have run."""
        self.call_soon(callback)

    def watch_readable(self, fd: int, callback: Callback) -> Callback:
        """Call ``callback`` whenever ``fd`` is readable; returns the function that stops."""
        raise NotImplementedError

    def watch_writable(self, fd: int, callback: Callback) -> Callback:
        raise NotImplementedError

    def closing(self, fd: int) -> None:
        """``fd`` is about to be closed (after its watches were stopped)."""

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object,
              context: contextvars.Context | None = None) -> Background:
        """Start ``fn(*args)`` as a task of the loop itself, not of the calling task
        (in ``context``, if given: a caller's, for the caller's own code it runs)."""
        raise NotImplementedError

    def is_current(self) -> bool:
        """True when called from this loop's thread while it runs."""
        raise NotImplementedError

    # The three below are the loop's own primitives, made without anyio: its first use
    # in a process imports anyio's backend (about 20 ms), which a pool's start and
    # every call would otherwise pay; and they are made once per wait of every call.

    def event(self) -> Any:
        """A fresh event (``set()``, ``await wait()``)."""
        raise NotImplementedError

    def lock(self) -> Any:
        """A fresh lock (``async with``)."""
        raise NotImplementedError

    def fail_after(self, seconds: float | None) -> Any:
        """An async context that raises TimeoutError once ``seconds`` passed in it."""
        raise NotImplementedError

    def stoppable(self) -> Any:
        """A scope (``with``) whose ``cancel()``, from any task of the loop, cancels
        what runs in it; it swallows that cancellation."""
        raise NotImplementedError


class Background:
    """A task that belongs to the pool, not to whichever task opened it.

    A task group would tie the pool to the task that entered it, but pools are often
    opened and closed by different tasks (async fixtures, application lifespans), so
    background work runs as a loop-level task that the pool cancels and waits for.
    It may be started from a plain loop callback, where no anyio object can be made
    yet: its cancel scope is made inside the task.
    """

    def __init__(self) -> None:
        self._scope: Any = None
        self._cancelled = False
        self.finished = False
        self._waiters: list[Any] = []
        #: The asyncio task running it (None on trio).
        self.handle: Any = None

    async def run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        import anyio

        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                await fn(*args)
        except Exception:
            logger.exception("background task %s of the pool failed", fn)
        finally:
            self.finished = True
            # A task cancelled asyncio's way keeps its CancelledError, whose frames
            # hold what it worked on (an input): let it go.
            self.handle = None
            for waiter in self._waiters:
                waiter.set()

    def cancel(self) -> None:
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()

    def interrupt(self) -> None:
        """Cancel it once, as asyncio does: code it runs (an input's ``finally``) may
        still await while it cleans up. On trio, whose cancellation lasts, cancel()."""
        if self.handle is None or self._scope is None:
            self.cancel()  # on trio; or not started, and then it never will
        else:
            self.handle.cancel()

    async def wait(self) -> None:
        import anyio

        if not self.finished:
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()


def _here(fn: Callback) -> Callback:
    """``fn``, doing nothing in a process forked from this one, whose loop it inherited:
    the fds' data is this process's, and the loop's epoll instance is shared (a child
    that removed a watch, unwinding its copy of the loop, removed this process's)."""
    pid = os.getpid()
    return lambda: fn() if os.getpid() == pid else None


class _Asyncio(Loop):
    name = "asyncio"

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        # asyncio keeps only weak references to tasks: hold them until they finish.
        self._tasks: set[Any] = set()

    def call_soon(self, callback: Callback) -> None:
        self._loop.call_soon(callback)

    def call_after_timers(self, callback: Callback) -> None:
        # A timer due now goes after the timers due before it, and the hop through
        # call_soon after the tasks they wake (a sleep's timer wakes its task with a
        # call_soon of its own).
        self._loop.call_later(0, self._loop.call_soon, callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    def watch_readable(self, fd: int, callback: Callback) -> Callback:
        self._loop.add_reader(fd, _here(callback))
        return _here(lambda: self._loop.remove_reader(fd))

    def watch_writable(self, fd: int, callback: Callback) -> Callback:
        self._loop.add_writer(fd, _here(callback))
        return _here(lambda: self._loop.remove_writer(fd))

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object,
              context: contextvars.Context | None = None) -> Background:
        task = Background()
        handle = task.handle = self._loop.create_task(task.run(fn, *args), context=context)
        self._tasks.add(handle)
        handle.add_done_callback(self._tasks.discard)
        return task

    def is_current(self) -> bool:
        import asyncio

        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def event(self) -> Any:
        import asyncio

        return asyncio.Event()

    def lock(self) -> Any:
        import asyncio

        return asyncio.Lock()

    def fail_after(self, seconds: float | None) -> Any:
        import asyncio

        return asyncio.timeout(seconds)

    def stoppable(self) -> Any:
        return _TaskScope()


class _TaskScope:
    """A cancel scope of the running asyncio task, made as ``asyncio.timeout`` makes
    its own (anyio's would import its backend, 20 ms, on the loop)."""

    def __init__(self) -> None:
        self._task: Any = None
        self._inside = self._cancelled = False

    def __enter__(self) -> _TaskScope:
        import asyncio

        self._task, self._inside = asyncio.current_task(), True
        if self._cancelled:
            self._task.cancel()
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        import asyncio

        self._inside = False
        # Its own cancellation only (the task's, from elsewhere, goes on).
        return bool(self._cancelled and kind is not None and issubclass(
            kind, asyncio.CancelledError) and self._task.uncancel() == 0)

    def cancel(self) -> None:
        if not self._cancelled and self._inside:
            self._task.cancel()
        self._cancelled = True


class _Trio(Loop):
    name = "trio"

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._token = trio.lowlevel.current_trio_token()

    def call_soon(self, callback: Callback) -> None:
        self.call_soon_threadsafe(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        try:
            self._token.run_sync_soon(callback)
        except self._trio.RunFinishedError:
            pass

    def _watch(self, fd: int, callback: Callback, readable: bool) -> Callback:
        trio = self._trio
        scope = trio.CancelScope()
        wait = trio.lowlevel.wait_readable if readable else trio.lowlevel.wait_writable

        async def watcher() -> None:
            # A system task that raised would end the whole trio run: never let it.
            with scope:
                while True:
                    try:
                        await wait(fd)
                    except (trio.ClosedResourceError, OSError):
                        return
                    try:
                        callback()
                    except Exception:
                        logger.exception("a file watcher's callback failed")

        trio.lowlevel.spawn_system_task(watcher)
        stop: Callback = scope.cancel
        return stop

    def watch_readable(self, fd: int, callback: Callback) -> Callback:
        return self._watch(fd, callback, True)

    def watch_writable(self, fd: int, callback: Callback) -> Callback:
        return self._watch(fd, callback, False)

    def closing(self, fd: int) -> None:
        # Not in stop(): that would also end the other watch of the same descriptor.
        self._trio.lowlevel.notify_closing(fd)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object,
              context: contextvars.Context | None = None) -> Background:
        task = Background()
        self._trio.lowlevel.spawn_system_task(task.run, fn, *args, context=context)
        return task

    def is_current(self) -> bool:
        try:
            return self._trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def event(self) -> Any:
        return self._trio.Event()

    def lock(self) -> Any:
        return self._trio.Lock()

    def stoppable(self) -> Any:
        return self._trio.CancelScope()

    def fail_after(self, seconds: float | None) -> Any:
        import contextlib
        import math

        @contextlib.asynccontextmanager
        async def deadline() -> Any:
            try:
                with self._trio.fail_after(math.inf if seconds is None else seconds):
                    yield
            except self._trio.TooSlowError:
                raise TimeoutError from None

        return deadline()


def current_loop() -> Loop:
    """The running loop (asyncio, uvloop or trio)."""
    import asyncio

    try:
        return _Asyncio(asyncio.get_running_loop())
    except RuntimeError:
        # Not asyncio: anyio's other backend is trio.
        return _Trio()


def preload(loop: Loop, *modules: str) -> Any:
    """Import anyio's backend for ``loop``, and ``modules``, in a thread; return an
    event of ``loop`` set once they are imported (or cannot be, in a thread).

    A pool's calls wait through anyio, whose backend takes 20-30 ms to import, and a
    process rung pickles functions with cloudpickle (10-20 ms more): done here while
    the workers start, the first call does not pay it. Without a thread to spare (the
    machine is out of them), the first call imports them as before.
    """
    names = [n for n in (f"anyio._backends._{loop.name}", *modules) if n not in sys.modules]
    done = loop.event()
    if not names:
        done.set()
        return done
    import importlib

    def load() -> None:
        try:
            for name in names:
                with contextlib.suppress(ImportError):  # the call that needs it says so
                    importlib.import_module(name)
        finally:
            loop.call_soon_threadsafe(done.set)

    try:
        threading.Thread(target=load, daemon=True, name="asyncpool-import").start()
    except RuntimeError:
        done.set()
    return done
