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
