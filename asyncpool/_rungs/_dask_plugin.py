"""The worker plugin that runs a pool's initializer on each Dask worker.

Imported only when a pool with an ``initializer`` serves from a cluster (it needs
``distributed``); Dask workers load it by reference, as they load the functions that
run chunks.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .._execute import cluster_init_failures, forget_space, loads
from .._share import initialize, pin, share_main


class InitializerPlugin(WorkerPlugin):
    """Runs ``initializer(*initargs)`` once on each worker, now and as workers join.
    Where it raises, the worker runs none of the pool's tasks (Dask itself only logs
    a plugin that failed on a worker that joined)."""

    def __init__(self, blob: bytes, space: str, name: str) -> None:
        self.blob = blob
        self.space = space
        self.name = name

    def setup(self, worker: Any) -> None:
        # Each worker's own mark: workers may share a process (a LocalCluster's threads).
        mark = self.name, worker.address
        cluster_init_failures.pop(mark, None)
        pin(self.space, 1)
        try:
            initializer, initargs = loads(self.blob)
            initialize(share_main(initializer, self.space), initargs)
        except BaseException as exc:
            cluster_init_failures[mark] = repr(exc)
            raise

    def teardown(self, worker: Any) -> None:
        """The pool closed (or the worker does): what its initializer set goes."""
        cluster_init_failures.pop((self.name, worker.address), None)
        if pin(self.space, -1):
            forget_space(self.space)
