"""Calling back into the running event loop from other threads (asyncio or trio)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("asyncpool")

Schedule = Callable[[Callable[[], object]], None]


def on_asyncio() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def loop_scheduler() -> Schedule:
    """A function that runs a callback on the current event loop, from any thread.

    Callbacks that arrive after the loop has closed are dropped: nobody waits for them.
    """
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        # Not asyncio: anyio's other backend is trio.
        import trio

        token = trio.lowlevel.current_trio_token()

        def schedule_trio(callback: Callable[[], object]) -> None:
            try:
                token.run_sync_soon(callback)
            except trio.RunFinishedError:
                pass

        return schedule_trio

    def schedule_asyncio(callback: Callable[[], object]) -> None:
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed
            pass

    return schedule_asyncio


class Background:
    """A task that belongs to the pool, not to whichever task opened it.

    A task group would tie the pool to the task that entered it, but pools are often
    opened and closed by different tasks (async fixtures, application lifespans), so
    background work runs as a loop-level task that ``aclose`` cancels and waits for.
    """

    def __init__(self) -> None:
        import anyio

        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            with self.scope:
                await fn(*args)
        except Exception:
            logger.exception("background task %s of the pool failed", fn)
        finally:
            self.done.set()

    def cancel(self) -> None:
        self.scope.cancel()

    async def wait(self) -> None:
        await self.done.wait()


def spawn(fn: Callable[..., Awaitable[object]], *args: object) -> Background:
    """Start ``fn(*args)`` as a loop-level task of the running event loop."""
    import asyncio

    task = Background()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        trio.lowlevel.spawn_system_task(task._run, fn, *args)
        return task
    handle = loop.create_task(task._run(fn, *args))
    _keep.add(handle)
    handle.add_done_callback(_keep.discard)
    return task


# asyncio keeps only weak references to tasks: hold them until they finish.
_keep: set[Any] = set()
