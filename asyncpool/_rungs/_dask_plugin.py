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
from .._execute import cluster_init_failures, forget_space, loads
from .._share import pin, run_initializer


class InitializerPlugin(WorkerPlugin):
    """Runs ``initializer(*initargs)`` once on each worker, now and as workers join.
    Where it raises, the worker runs none of the pool's tasks (Dask itself only logs
    a plugin that failed on a worker that joined)."""

    def __init__(self, blob: bytes, space: str, name: str) -> None:
        self.blob = blob
        self.space = space
        self.name = name

    async def setup(self, worker: Any) -> None:
        # Each worker's own mark: workers may share a process (a LocalCluster's threads).
        mark = self.name, worker.address
        cluster_init_failures.pop(mark, None)
        pin(self.space, 1)
        # In a thread of its own: one that hangs leaves the worker answering the
        # scheduler (the pool tells it apart from a worker stopped), and its exit free.
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()
        ran: list[bool] = []

        def end(error: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(error)

        def apply() -> None:
            ran.append(True)
            run_initializer(self.blob, self.space, loads)

        def run() -> None:
            # Where chunks of another pool's initializer run in this process, it runs
            # before this pool's first chunk here instead (see _turns).
            error: BaseException | None = None
            try:
                if _turns.enter(self.blob, apply, wait=False):
                    try:
                        if not ran:  # the process holds it: this worker runs it too
                            apply()
                    finally:
                        _turns.leave()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # (the worker's loop closed)
                loop.call_soon_threadsafe(end, error)

        threading.Thread(target=run, name="asyncpool-initializer", daemon=True).start()
        error = await ended
        if error is not None:
            cluster_init_failures[mark] = repr(error)
            raise error

    def teardown(self, worker: Any) -> None:
        """The pool closed (or the worker does): what its initializer set goes."""
        cluster_init_failures.pop((self.name, worker.address), None)
        _turns.abandon(self.blob)
        if pin(self.space, -1):
            forget_space(self.space)
