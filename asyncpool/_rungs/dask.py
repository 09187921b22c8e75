"""The dask rung: chunks as tasks on a Dask cluster, awaited on the pool's own loop.

``distributed`` is an optional extra, imported only when a cluster is asked for, and it
needs an asyncio loop. Each task carries its function's pickle, as ``client.map`` does,
and a worker unpickles it once: a task that depends on no other stays "root-ish", so
the scheduler queues it until a thread is free and a dying worker takes down only what
it was running. A pickle of :data:`BIG_FUNCTION` bytes or more (a ``partial`` holding a
large table) is scattered to every worker once per call instead (again if a dying
worker takes it). Task keys name the function and a token of this rung
(``<function>-<token>-<n>``): two pools on one cluster never share a key, and the
dashboard groups work by function. The rung takes as many chunks as the cluster has
threads, twice over, whatever the local ``max_workers``.

When the connection to the scheduler is lost (even for a moment), the rung stops
serving, every chunk it held is sent again elsewhere, and its client is closed; the
ladder serves locally and climbs back once the scheduler answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from .. import _wire
from .._call import CallState
from .._errors import FunctionUnavailable, InitializerFailed, SerializationError, pool_made
from .._cluster import run_on_cluster
from .._remote import decode_error
from .._retry import RungUnavailable
from ._dask_client import (Scattered, ScatterFailed, StoppedCalls, beside, can_serve_on,
                           cancel_quietly, client_space, close_later, close_quietly, connect,
                           given, in_step, lost_connection, outcome, retrieved)
from ._dask_init import register_initializer, unregister_initializers
from ._inbox import Loaded, load, load_apart
from .base import ChunkUnpicklable, Listener, Rung, RungState, unpicklable_items

if TYPE_CHECKING:
    from .._call import Chunk
    from .._config import PoolConfig
    from .._loop import Loop

logger = logging.getLogger("asyncpool")

#: Seconds between looks at the cluster's size (it may scale up or down); at most
#: how long a suspect waits for the chunks beside it to end before it runs anyway.
RESIZE_EVERY, ALONE_WAIT = 2.0, 10.0
#: A function's pickle this big is scattered once per call, not carried by each task.
BIG_FUNCTION = 1 << 20


class DaskRung(Rung):
    """Chunks as Dask tasks.

    A ``KilledWorker`` stands for ``allowed-failures`` + 1 worker deaths, but it names no
    item, and Dask raises it for every task that was on the dying workers, innocent
    neighbours included: a chunk that gets it is split into up to 32 parts whose counts
    start afresh, and an item alone that gets it has crashed that many times.
    """

    name = "dask"
    least_chunk_seconds = 0.05  # a task's round trip through the scheduler takes ms

    def __init__(self, config: PoolConfig, listener: Listener, loop: Loop, client: Any,
                 owned: bool) -> None:
        super().__init__()
        self.config, self.listener, self.loop = config, listener, loop
        self.client, self.owned = client, owned
        self.lanes: int = 1
        #: Its scheduler was found not answering (stopped, hung).
        self._silent = False
        self._token = secrets.token_hex(4)
        #: Its own globals of the main script on the workers (each pool's initializer).
        self.space = f"{client_space()}-{self._token}"
        #: Tells the workers which calls stopped (see cancel).
        self._stopped = StoppedCalls(client, self.space)
        #: Its initializer's worker plugin, if any, and whether it was sent.
        #: Named with its client's id (see _dask_sweep).
        self._initializer = (f"asyncpool-initializer-{self._token}-{client.id}"
                             if config.initializer is not None else None)
        self._registering = False
        self._count = 0
        #: The scheduler this rung set up (see _resize).
        self._scheduler_id: str | None = None
        self._comm: Any = None  # its client's connection then (see _reconnected)
        self._relays: dict[Chunk, asyncio.Task[None]] = {}
        #: Those of calls whose tasks ask for some workers (resources=, workers=): they
        #: may wait for them (for good), and take no room from the others.
        self._placed: set[Chunk] = set()
        self._scattered = Scattered(client, config.dask_connect_timeout)
        self._sizer: asyncio.Task[None] | None = None
        #: When (loop time) a chunk last came back from the cluster, or crashed there.
        self._heard = 0.0
        #: A chunk under suspicion (its worker died, culprit unknown) runs alone once
        #: the others end, nothing sent meanwhile (a poison item's neighbours are blamed).
        self._suspect: Chunk | None = None
        self._alone: asyncio.Event | None = None

    @classmethod
    async def create(cls, config: PoolConfig, listener: Listener, loop: Loop) -> DaskRung:
        can_serve_on(loop.name)
        timeout = config.dask_connect_timeout
        if config.dask_client is not None:
            rung = cls(config, listener, loop, given(config.dask_client), owned=False)
        else:
            assert config.dask_address is not None  # else no dask rung
            client = await connect(config.dask_address, timeout)
            rung = cls(config, listener, loop, client, owned=True)
        try:
            # A scheduler with no worker would take chunks and never run them.
            await asyncio.wait_for(rung.client.wait_for_workers(1), timeout)
            await rung._resize()
            await in_step(rung.client, rung._scheduler_id, timeout)
            await unregister_initializers(rung.client, rung._scheduler_id, None, True)
            if rung._initializer is not None:
                rung._registering = True
                await register_initializer(rung.client, config, rung._initializer,
                                           rung.space, rung._scheduler_id)
        except BaseException as exc:
            # Awaited, shielded (a close cancels a climb), after a hung initializer too:
            # its plugin must leave the cluster (joining workers ran it); up to 5 s.
            with anyio.CancelScope(shield=True):
                await rung.aclose(kill=True)
            if isinstance(exc, OSError | TimeoutError):
                raise RungUnavailable(f"the Dask cluster has no worker (waited {timeout} s)"
                                      ) from exc
            raise
        link = getattr(rung.client, "dashboard_link", None)
        logger.info("serving from the Dask cluster at %s (%d threads)%s",
                    rung.client.scheduler.address, rung.lanes,
                    f"; dashboard: {link}" if link else "")
        rung._sizer = asyncio.ensure_future(rung._keep_sized())
        return rung

    async def _resize(self) -> int:
        """Follow the cluster's threads (returns how many). RungUnavailable once the
        client reconnected (unasked; perhaps to a scheduler that restarted): what this
        rung set up there (the initializer, scattered functions) may be gone."""
        identity = await self.client.scheduler.identity()
        if self._scheduler_id is None:
            self._scheduler_id = identity.get("id")
            self._comm = self.client.scheduler_comm
        elif identity.get("id") != self._scheduler_id or self._reconnected():
            raise RungUnavailable("the Dask client reconnected (or its scheduler restarted)")
        threads = int(sum(w.get("nthreads", 0) for w in identity["workers"].values()))
        self.lanes = max(1, threads)
        return threads

    async def _keep_sized(self) -> None:
        """Follow the cluster as it scales; give it up when its scheduler stops
        answering (a stopped or hung process keeps its connection open), or when it
        has had no worker, for ``dask_connect_timeout``: what it held then runs on the
        local rungs, and the promoter climbs back once the cluster serves again."""
        timeout = self.config.dask_connect_timeout
        empty_since: float | None = None
        while self.state is RungState.SERVING:
            # With no worker, look often (one a poison item kills is back for moments).
            await asyncio.sleep(RESIZE_EVERY if empty_since is None else RESIZE_EVERY / 8)
            try:
                threads = await asyncio.wait_for(self._resize(), timeout)
            except TimeoutError:
                self._silent = True
                self._broke(RungUnavailable(f"the Dask scheduler did not answer within "
                                            f"dask_connect_timeout={timeout} s"))
                return
            except Exception as exc:
                if lost_connection(exc, self.client) or isinstance(exc, RungUnavailable):
                    self._broke(exc)
                return
            now = asyncio.get_running_loop().time()
            if threads or (empty_since is not None and self._heard > empty_since):
                # (Workers a poison item kills come back between two looks: the
                # crashes they report say the cluster still runs things.)
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= timeout:
                self._broke(RungUnavailable(f"the Dask cluster has had no worker for "
                                            f"{now - empty_since:.0f} s"))
                return

    @property
    def workers(self) -> int:
        return self.lanes

    @property
    def capacity(self) -> int:
        return 2 * self.lanes

    def offer(self) -> int | None:
        return None if (self.usable and self.in_flight - len(self._placed) < self.capacity
                        and self._suspect is None) else 0

    def submit(self, chunk: Chunk) -> None:
        # The items are pickled here, not by Dask: an item that does not pickle fails
        # alone, and one the cluster cannot unpickle fails its chunk (which is then
        # split), not every item of the call.
        shipped = {p.call.shipped.id: p.call.shipped for p in chunk.pieces}
        index = {fn_id: i for i, fn_id in enumerate(shipped)}
        runs = [(index[p.call.shipped.id], p.call.star, p.call.id, p.items)
                for p in chunk.pieces]
        try:
            arguments = _wire.dumps_any(runs, for_workers=True)
        except (Exception, SystemExit) as exc:  # an argument's own code ran
            raise ChunkUnpicklable(unpicklable_items(chunk)) from exc
        chunk.payload_bytes = sum(memoryview(p).nbytes for p in arguments)
        chunk.rung = self
        self._in_flight += 1
        if chunk.pieces[0].call.options.placed:  # (such a call has chunks of its own)
            self._placed.add(chunk)
        if chunk.suspect:
            self._suspect = chunk
        relay = self._relays[chunk] = asyncio.ensure_future(
            self._relay(chunk, list(shipped.values()), arguments))
        # A relay cancelled before it first ran (its call was cancelled in the same
        # turn) never reports: this does, once, or nothing if it did.
        relay.add_done_callback(lambda _: self._lost(chunk))

    def forget(self, fn_id: int) -> None:
        self._scattered.forget(fn_id)

    async def _relay(self, chunk: Chunk, shipped: list[Any], arguments: _wire.Parts) -> None:
        from distributed import KilledWorker

        future = None
        try:
            if chunk is self._suspect and beside(chunk, self._relays, self._placed):
                self._alone = asyncio.Event()
                with contextlib.suppress(TimeoutError):  # not for good: one may not end
                    await asyncio.wait_for(self._alone.wait(), ALONE_WAIT)
            # Each function's pickle, or for a big one its data scattered to every worker.
            blobs = [s.blob if len(s.whole()) < BIG_FUNCTION else await self._scattered.get(s)
                     for s in shipped]
            if not self._connected() or self._reconnected() or (
                    self.client.scheduler_info().get("id") not in (None, self._scheduler_id)):
                # (As in _resize: a task sent then would run without what was set up.)
                self._broke(RungUnavailable("the Dask scheduler connection was lost"))
                self._lost(chunk)
                return
            self._count += 1
            name = re.sub(r"[^\w.]+", "_", chunk.pieces[0].call.shipped.name)
            future = self.client.submit(run_on_cluster, blobs, arguments,
                                        self.config.task_retries, self.space,
                                        [s.id for s in shipped], self._initializer,
                                        key=f"{name}-{self._token}-{self._count}", pure=False,
                                        **chunk.pieces[0].call.options.dask)
            # Shielded: the client gathers many futures' results in one shared request,
            # which cancelling this relay would cancel for every other chunk too.
            waiting = asyncio.ensure_future(outcome(future))
            waiting.add_done_callback(retrieved)
            answer = await asyncio.shield(waiting)
            loaded = None if answer[3] or answer[4] else await load_apart(answer[0])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Ours (the call was cancelled, or the rung is closing).
                if future is not None:
                    await cancel_quietly(self.client, future)
                self._lost(chunk)
                raise
            if self._connected():
                # Something in the client cancelled the wait, not the cluster's answer.
                self._lost(chunk)
                return
            # Dask cancelled the future under us: the client lost its scheduler.
            self._broke(RungUnavailable("Dask cancelled a task: its scheduler is gone"))
            self._lost(chunk)
            return
        except KilledWorker:
            self._crashed(chunk)
            return
        except ScatterFailed as failed:
            # A worker that died as the function was sent to it failed the whole call
            # (a KeyError), or dropped a healthy cluster: sent again, scattered anew.
            if failed.tries < 3 and self._connected():
                self._lost(chunk)
            else:
                self._failed(chunk, failed.error)
            return
        except Exception as exc:
            self._failed(chunk, exc)
            return
        self._answered(chunk, loaded, *answer)

    def _failed(self, chunk: Chunk, exc: Exception) -> None:
        """The task did not answer: ``exc`` says why."""
        from distributed.client import FutureCancelledError

        if isinstance(exc, FutureCancelledError) and self._connected():
            # A worker died with the scattered function (or the scheduler gave up on
            # the task): scattered again, and counted as a crash of the chunk.
            for piece in chunk.pieces:
                self.forget(piece.call.shipped.id)
            self._crashed(chunk, deaths=1)
        elif lost_connection(exc, self.client):
            self._broke(exc)
            self._lost(chunk)
        elif self.state is not RungState.SERVING:
            self._lost(chunk)
        else:
            # The cluster could not run the task at all (a function or argument that
            # will not load there): every item of the chunk fails the same way.
            error: Exception = exc  # the initializer failed where it ran
            if not isinstance(exc, InitializerFailed):
                error = pool_made(FunctionUnavailable(
                    f"the Dask cluster could not run this task: {exc!r}"))
                error.__cause__ = exc
            self._finished(chunk, [None] * chunk.size,
                           dict.fromkeys(range(chunk.size), error))

    def _answered(self, chunk: Chunk, loaded: Loaded | None, blob: list[Any], errors: Any,
                  spent: tuple[list[float], int], function_error: str | None,
                  arguments_error: str | None) -> None:
        """The task's answer (see :func:`asyncpool._cluster.run_on_cluster`), its
        results if loaded in a thread; the last two say why the function, or the
        chunk's items, did not load there."""
        seconds, retried = spent
        if arguments_error is not None:
            if self._end(chunk):
                self.listener.chunk_unloadable(
                    chunk, pool_made(SerializationError(arguments_error)))
            return
        if function_error is not None:
            error = pool_made(FunctionUnavailable(
                f"the function could not be loaded on the Dask cluster: {function_error}; "
                "install its module on the workers, or define it at module level"))
            errors = dict.fromkeys(range(chunk.size), error)
            results: list[Any] = [None] * chunk.size
        else:
            errors = {position: decode_error(b, text) for position, b, text in errors}
            loaded = load(blob) if loaded is None else loaded
            if isinstance(loaded, BaseException):  # the results' own code ran: SystemExit
                if self._end(chunk):
                    self.listener.chunk_undecodable(chunk, 0, chunk.size, loaded)
                    self.listener.chunk_done(chunk, chunk.size, seconds)
                return
            results, bad = loaded
            errors.update(bad)
        self._finished(chunk, results, errors, seconds, retried,  # weighed: see window_items
                       sum(memoryview(part).nbytes for part in blob))

    def _end(self, chunk: Chunk) -> bool:
        """The chunk's relay ends: True the first time (the caller reports it), False
        if it was reported already."""
        if self._relays.pop(chunk, None) is None:
            return False
        self._in_flight -= 1
        self._placed.discard(chunk)
        if chunk is self._suspect:
            self._suspect = None
        elif self._alone is not None and not beside(self._suspect, self._relays, self._placed):
            self._alone.set()  # the suspect is alone now
            self._alone = None
        return True

    def _lost(self, chunk: Chunk) -> None:
        if self._end(chunk):
            self.listener.chunk_lost(chunk)

    def _finished(self, chunk: Chunk, results: list[Any], errors: dict[int, BaseException],
                  seconds: float | list[float] = 0.0, retried: int = 0, nbytes: int = 0) -> None:
        self._heard = asyncio.get_running_loop().time()
        if self._end(chunk):
            self.listener.chunk_progress(chunk, 0, chunk.size, results, errors, nbytes)
            self.listener.chunk_done(chunk, chunk.size, seconds, retried)

    def _crashed(self, chunk: Chunk, deaths: int | None = None) -> None:
        self._heard = asyncio.get_running_loop().time()
        if not self._end(chunk):
            return
        import dask

        if deaths is None:
            # Dask gives up on a task after it was on workers that died this often.
            deaths = int(dask.config.get("distributed.scheduler.allowed-failures", 3)) + 1
        self.listener.worker_crashed(f"Dask lost a chunk of {chunk.size} item(s) to "
                                     f"{deaths} worker death(s)" + ("; splitting it to find "
                                     "the item at fault" if chunk.size > 1 else ""), deaths)
        self.listener.chunk_crashed(chunk, None, None, deaths)

    def _connected(self) -> bool:
        return bool(getattr(self.client, "status", "running") == "running")

    def _reconnected(self) -> bool:
        # Since it set up the cluster (another pool may have taken its initializer off
        # meanwhile, as a gone client's: see _dask_sweep).
        return self._comm is not None and self.client.scheduler_comm is not self._comm

    def _broke(self, error: BaseException) -> None:
        if self.state is not RungState.SERVING:
            return
        self.listener.rung_warning(f"the Dask cluster stops serving ({error}); serving "
                                   "locally until it answers again", rung=self.name)
        self._out_of_service(error)
        for relay in list(self._relays.values()):
            relay.cancel()
        self.listener.rung_changed()

    def cancel(self, calls: Iterable[int]) -> None:
        wanted = set(calls)
        for chunk, relay in list(self._relays.items()):
            if all(p.call.id in wanted for p in chunk.pieces):
                relay.cancel()
        # A task already running goes on: its items not started are skipped.
        if self._connected():
            self._stopped.add(wanted)

    def kill(self, chunks: Iterable[Chunk], calls: set[int] | None = None) -> bool:
        # Dask cannot stop a running task (False says so); cancelling forgets it and
        # frees its slot, unless it holds items of calls still waiting for them.
        for chunk in chunks:
            if calls is not None and any(p.call.state is CallState.ACTIVE
                                         for p in chunk.pieces):
                continue
            relay = self._relays.get(chunk)
            if relay is not None:
                relay.cancel()
        return False

    def abandon(self) -> None:
        # Its client (and the tasks sent) must go too: closed on the loop, if it runs.
        super().abandon()
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(
                functools.partial(close_later, functools.partial(self.aclose, True)))

    async def aclose(self, kill: bool) -> None:
        self._move(RungState.CLOSED)
        self._stopped.close()
        if self._sizer is not None:
            self._sizer.cancel()
        relays = list(self._relays.values())
        for relay in relays:
            relay.cancel()
        if relays:
            await asyncio.gather(*relays, return_exceptions=True)
        # A cluster outlives pools: its workers must not run this one's initializer as
        # they join, for good (a scheduler found not answering: a later rung's job).
        await unregister_initializers(
            self.client, self._scheduler_id, self._initializer if self._registering else None,
            not self._silent and self._connected())
        if self.owned:
            await close_quietly(self.client)
