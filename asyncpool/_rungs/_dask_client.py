"""The Dask rung's dealings with its client: closing, cancelling and unregistering
without a wait that has no bound, telling a lost connection apart, naming this
client process to the workers. Imports ``distributed`` only when used."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import socket
import weakref
from collections.abc import Callable, Container, Coroutine, Iterable
from typing import Any

from .._retry import RungUnavailable

logger = logging.getLogger("asyncpool")


def can_serve_on(loop_name: str) -> None:
    """Raise unless the Dask rung can serve here: on asyncio, with distributed."""
    if loop_name != "asyncio":
        raise NotImplementedError("the dask rung runs on asyncio only (distributed's "
                                  "asynchronous Client needs an asyncio loop)")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ImportError("a Dask cluster needs the 'distributed' package: pip install "
                          "distributed (or this project's [dask] extra)") from None


def lost_connection(exc: BaseException, client: Any) -> bool:
    from distributed.client import ClosedClientError, FutureCancelledError
    from distributed.comm.core import CommClosedError

    if isinstance(exc, CommClosedError | OSError | ClosedClientError):
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
    comm = getattr(client.scheduler_comm, "comm", None)
    if comm is None or comm.closed():
        return  # (its scheduler is gone, or the loop ends: distributed logged an error)
    try:
        await asyncio.wait_for(client.cancel(future), 2)
    except BaseException:
        pass


class StoppedCalls:
    """Tells every worker which calls stopped (one message for those stopped within
    20 ms): their chunks that run there skip the items not started yet."""

    def __init__(self, client: Any, space: str) -> None:
        self.client, self.space = client, space
        self.calls: set[int] = set()
        self.task: asyncio.Task[None] | None = None

    def add(self, calls: set[int]) -> None:
        if not self.calls:
            self.task = asyncio.ensure_future(self._tell())
        self.calls |= calls

    async def _tell(self) -> None:
        from .._cluster import cancel_on_cluster

        await asyncio.sleep(0.02)
        calls, self.calls = sorted(self.calls), set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.run(cancel_on_cluster, self.space, calls),
                                   10)

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
    """Close ``client``, whatever state its connection is in. One closed while it
    reconnects raises ("ConnectionPool is closed") half-way: it is tried once more,
    then marked closed (at garbage collection it would make a close coroutine that
    nobody awaits, and a warning at exit)."""
    for _ in range(2):
        try:
            await asyncio.wait_for(client.close(), 5)
        except BaseException:
            pass
        if getattr(client, "status", "closed") == "closed":
            return
    _mark_closed(client)


def _mark_closed(client: Any) -> None:
    """Closed for the client's own ``__del__`` (which would make a close coroutine
    nobody awaits), without an await: its periodic callbacks stop."""
    with contextlib.suppress(Exception):
        for callback in client._periodic_callbacks.values():
            callback.stop()
    client.status = "closed"  # a public attribute of Client (its __del__ reads it)


def given(client: Any) -> Any:
    """The caller's own client, if the pool can serve from it now."""
    if not getattr(client, "asynchronous", False):
        raise TypeError(f"dask_client={client!r} is a synchronous Client: the pool needs "
                        "one made with Client(..., asynchronous=True) (or pass "
                        "dask_address)")
    status = getattr(client, "status", "running")
    if status != "running":
        # Reconnecting (its scheduler restarted): served from now, it would be found
        # lost at once, and fallen back from again.
        raise RungUnavailable(f"the given Dask client is not connected (its status is "
                              f"{status!r})")
    return client


async def in_step(client: Any, scheduler_id: str | None, timeout: float) -> None:
    """Until the client's view names the scheduler ``scheduler_id`` (one that
    reconnected to a restarted scheduler names the old one for a moment, and each task
    checks it); RungUnavailable after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while client.scheduler_info().get("id") not in (None, scheduler_id):
        if loop.time() > deadline:
            raise RungUnavailable("the Dask client is not yet in step with its restarted "
                                  "scheduler")
        await asyncio.sleep(0.1)


async def connect(address: str, timeout: float) -> Any:
    """An asynchronous client of the scheduler at ``address``, not made the
    process's default; RungUnavailable if none answers there within ``timeout``."""
    from distributed import Client

    if await _refused(address):
        # The client would retry until the timeout: nothing listens there now (the
        # promoter tries again later).
        raise RungUnavailable(f"no Dask scheduler listens at {address} (connection "
                              "refused)")
    client = Client(address, asynchronous=True,  # type: ignore[no-untyped-call]
                    timeout=f"{timeout}s", set_as_default=False)
    try:
        await asyncio.wait_for(client, timeout + 1)
    except BaseException as exc:
        # A client that failed to start is still closed, off the caller's time.
        await close_quietly(client)
        if isinstance(exc, OSError | TimeoutError):
            raise RungUnavailable(f"the Dask scheduler at {address} did not answer "
                                  f"within {timeout} s: {exc}") from exc
        if isinstance(exc, Exception):
            # Something else answers there (a web server's banner, read as a frame's
            # length, made a MemoryError).
            raise RungUnavailable(f"no Dask scheduler could be reached at {address}: "
                                  f"{exc!r}") from exc
        raise
    if not _made:
        atexit.register(_forget_at_exit)
    _made.add(client)
    return client


#: The clients made here: one still open as the interpreter exits (a pool left open)
#: is marked closed then, with no await (its loop is gone; its __del__ made a close
#: coroutine nobody awaited: "coroutine 'Client._close' was never awaited"). The
#: process's exit closes its connection.
_made: weakref.WeakSet[Any] = weakref.WeakSet()


def _forget_at_exit() -> None:
    for client in list(_made):
        if client.status not in ("closed", "newly-created"):
            _mark_closed(client)


async def _refused(address: str) -> bool:
    """Whether a TCP scheduler address refuses connections at once."""
    if not address.startswith("tcp://"):
        return False
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), 1)
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    return False


async def answers(client: Any, timeout: float, scheduler_id: str | None = None) -> bool:
    """Whether the scheduler answers within ``timeout`` (and is still the one called
    ``scheduler_id``, if given: not one restarted meanwhile)."""
    try:
        identity = await asyncio.wait_for(client.scheduler.identity(), timeout)
    except Exception:
        return False
    return scheduler_id is None or identity.get("id") in (None, scheduler_id)


class ScatterFailed(Exception):
    """Scattering a big function failed (a worker left as it was sent to it, or the
    scheduler is gone): ``error`` says why, ``tries`` how many scatters of functions
    failed in a row."""

    def __init__(self, tries: int, error: Exception) -> None:
        super().__init__(tries, error)
        self.tries, self.error = tries, error


class Scattered:
    """Big functions' pickles scattered to every worker, once per call each. One whose
    scatter failed is scattered again when next asked for. A scatter is bounded: one
    waiting on a worker that died waited out Dask's connect timeout (30 s)."""

    #: A scatter may take ``dask_connect_timeout`` twice (10 s at least), and a second
    #: per this many bytes.
    RATE = 4 << 20

    def __init__(self, client: Any, connect_timeout: float) -> None:
        self.client, self.connect_timeout = client, connect_timeout
        self._futures: dict[int, asyncio.Future[Any]] = {}
        #: Scatters of each function that failed in a row (another's success, or its
        #: own already scattered, says nothing of its next try).
        self._failures: dict[int, int] = {}

    async def get(self, shipped: Any) -> Any:
        """The scattered data of ``shipped`` (a Shipped); ScatterFailed if it failed."""
        found = self._futures.get(shipped.id)
        if found is None:
            timeout = max(10.0, 2 * self.connect_timeout) + len(shipped.blob) / self.RATE
            # Bounded here too: Dask's own timeout covers the wait for workers, not the
            # copies to each (one to a worker killed meanwhile waited for good).
            found = self._futures[shipped.id] = asyncio.ensure_future(asyncio.wait_for(
                self.client.scatter(shipped.blob, broadcast=True, hash=False,
                                    timeout=timeout), timeout))
            # Its failure is seen even when no chunk waits for it any more (the rung
            # given up meanwhile): "Task exception was never retrieved".
            found.add_done_callback(_seen)
        try:
            # Shielded: other chunks of the call wait for the same scatter.
            data = await asyncio.shield(found)
        except Exception as exc:
            if self._futures.get(shipped.id) is found:
                del self._futures[shipped.id]
                self._failures[shipped.id] = self._failures.get(shipped.id, 0) + 1
            raise ScatterFailed(self._failures.get(shipped.id, 1), exc) from exc
        self._failures.pop(shipped.id, None)
        return data

    def forget(self, fn_id: int) -> None:
        self._failures.pop(fn_id, None)
        found = self._futures.pop(fn_id, None)
        if found is not None and found.done() and not found.cancelled() and (
                not found.exception()):
            found.result().release()


def beside(suspect: Any, relays: Iterable[Any], placed: Container[Any]) -> bool:
    """Whether chunks other than ``suspect`` are out; a placed one (whose resources may
    never come) does not count: the suspect waiting for it held the pool for good."""
    return any(chunk is not suspect and chunk not in placed for chunk in relays)


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
