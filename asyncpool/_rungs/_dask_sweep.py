"""Run on a Dask scheduler, sent by value (the scheduler need not have asyncpool)."""

from __future__ import annotations

from typing import Any


def plugins_of_gone_clients(dask_scheduler: Any) -> list[str]:
    """The initializer plugins of pools whose client is no longer connected (its
    process was killed, or left its pool open): named
    ``asyncpool-initializer-<token>-<client id>``."""
    connected = set(dask_scheduler.clients)
    gone = []
    for name in dask_scheduler.worker_plugins:
        parts = name.split("-", 3)
        if name.startswith("asyncpool-initializer-") and len(parts) == 4 and (
                parts[3] not in connected):
            gone.append(name)
    return gone


def silent_workers(dask_scheduler: Any) -> list[str]:
    """The workers that have not been heard from for three of their heartbeats (and
    at least 3 s): stopped, hung or cut off."""
    from time import time

    from distributed.scheduler import heartbeat_interval

    quiet = max(3.0, 3 * heartbeat_interval(len(dask_scheduler.workers)))
    return [ws.address for ws in dask_scheduler.workers.values()
            if time() - ws.last_seen > quiet]
