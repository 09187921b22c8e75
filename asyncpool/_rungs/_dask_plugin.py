"""The worker plugin that runs a pool's initializer on each Dask worker.

Imported only when a pool with an ``initializer`` serves from a cluster (it needs
``distributed``); Dask workers load it by reference, as they load the functions that
run chunks.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .._execute import loads
from .._share import share_main


class InitializerPlugin(WorkerPlugin):
    """Runs ``initializer(*initargs)`` once on each worker, now and as workers join."""

    def __init__(self, blob: bytes, space: str) -> None:
        self.blob = blob
        self.space = space

    def setup(self, worker: Any) -> None:
        initializer, initargs = loads(self.blob)
        share_main(initializer, self.space)(*initargs)
