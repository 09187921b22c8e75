"""The Dask rung's dealings with its client: closing, cancelling and unregistering
without a wait that has no bound, telling a lost connection apart, naming this
client process to the workers. Imports ``distributed`` only when used."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Coroutine
from typing import Any


def lost_connection(exc: BaseException, client: Any) -> bool:
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    if isinstance(exc, CommClosedError | OSError):
        return True
    if type(exc).__name__ == "ClosedClientError":
        return True
    # Futures are cancelled under us when the client loses its scheduler.
    return isinstance(exc, FutureCancelledError | asyncio.CancelledError) or (
        getattr(client, "status", "running") != "running")


_space: tuple[int, str] | None = None


def client_space() -> str:
    """Names this client process to Dask workers, which keep the globals of each
    client's main script apart (see :func:`~asyncpool._share.share_main`)."""
    global _space
    if _space is None or _space[0] != os.getpid():
        _space = (os.getpid(), f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    return _space[1]


async def outcome(future: Any) -> Any:
    return await future


def retrieved(waiting: asyncio.Future[Any]) -> None:
    """Takes the outcome of a wait whose relay was cancelled (nobody else will)."""
    if not waiting.cancelled():
        waiting.exception()


async def cancel_quietly(client: Any, future: Any) -> None:
    try:
        await asyncio.wait_for(client.cancel(future), 2)
    except BaseException:
        pass


class StoppedCalls:
    """Tells every worker which calls stopped (one message for those stopped within
    20 ms): their chunks that run there skip the items not started yet."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: set[int] = set()
        self.task: asyncio.Task[None] | None = None

    def add(self, calls: set[int]) -> None:
        if not self.calls:
            self.task = asyncio.ensure_future(self._tell())
        self.calls |= calls

    async def _tell(self) -> None:
        from .._execute import cancel_on_cluster

        await asyncio.sleep(0.02)
        calls, self.calls = sorted(self.calls), set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.run(cancel_on_cluster, client_space(),
                                                   calls), 10)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


def close_later(close: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``close()`` on this loop, held until it ends (a dropped pool's rung)."""
    task = asyncio.ensure_future(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


async def close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), 5)
    except BaseException:
        pass


async def unregister_quietly(client: Any, name: str) -> None:
    try:
        await asyncio.wait_for(client.unregister_worker_plugin(name), 5)
    except BaseException:
        pass
