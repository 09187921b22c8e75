"""Calling back into the running event loop from other threads (asyncio or trio)."""

from __future__ import annotations

from collections.abc import Callable

Schedule = Callable[[Callable[[], object]], None]


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
