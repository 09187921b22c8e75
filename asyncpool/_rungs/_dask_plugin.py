"""The worker plugin that runs a pool's initializer on each Dask worker.

Imported only when a pool with an ``initializer`` serves from a cluster (it needs
``distributed``); Dask workers load it by reference, as they load the functions that
run chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .. import _turns
from .._cluster import cluster_init_failures, forget_space
from .._execute import loads
from .._share import pin, run_initializer


class InitializerPlugin(WorkerPlugin):
    """Runs ``initializer(*initargs)`` once on each worker, now and as workers join.
    Where it raises, the worker runs none of the pool's tasks (Dask itself only logs
    a plugin that failed on a worker that joined)."""

    def __init__(self, blob: bytes, space: str, name: str, timeout: float | None) -> None:
        self.blob, self.space, self.name = blob, space, name
        #: The pool's start_timeout: what a run of it for a chunk may take.
        self.timeout = timeout

    async def setup(self, worker: Any) -> None:
        # Each worker's own mark: workers may share a process (a LocalCluster's threads).
        mark = self.name, worker.address
        cluster_init_failures.pop(mark, None)
        pin(self.space, 1)
        # In a thread of its own: one that hangs leaves the worker answering the
        # scheduler (the pool tells it apart from a worker stopped), and its exit free.
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def end(error: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(error)

        def run() -> None:
            # Alone (see _turns): not beside chunks of another pool, nor of this one (a
            # LocalCluster's workers share a process). Where they still run after a few
            # seconds, it runs before this pool's first chunk here instead.
            error: BaseException | None = None
            wait = 5.0 if self.timeout is None else min(5.0, self.timeout / 4)
            try:
                if _turns.enter(self.space, lambda: run_initializer(
                        self.blob, self.space, loads), wait, fresh=True):
                    _turns.leave()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # (the worker's loop closed)
                loop.call_soon_threadsafe(end, error)

        threading.Thread(target=run, name="asyncpool-initializer", daemon=True).start()
        error = await ended
        if error is not None:
            cluster_init_failures[mark] = f"{error!r} (as the worker joined or restarted)"
            raise error

    def teardown(self, worker: Any) -> None:
        """The pool closed (or the worker does): what its initializer set goes."""
        cluster_init_failures.pop((self.name, worker.address), None)
        _turns.abandon(self.space)
        if pin(self.space, -1):
            forget_space(self.space)
