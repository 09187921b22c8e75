"""The rungs of the ladder, and the registry that creates them by name.

:data:`FACTORIES` maps each rung's name to the coroutine function that starts it. It is
also the seam tests use to stand a fake rung in for a real one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .base import ChunkUnpicklable, Listener, Rung, RungState
from .inline import InlineRung
from .thread import ThreadRung

if TYPE_CHECKING:
    from .._config import PoolConfig
    from .._loop import Loop

__all__ = ("CLUSTER", "FACTORIES", "ONE_ATTEMPT", "OUT_OF_PROCESS", "STAND_IN",
           "ChunkUnpicklable", "Listener", "Rung", "RungState", "close_parked_workers",
           "create_rung", "clean_up_cluster")

Factory = Callable[["PoolConfig", Listener, "Loop"], Awaitable[Rung]]


# The rungs that run here are imported with the registry: they are what serves when
# the machine is short of something, and importing needs a file descriptor (with none
# left, the pool fell through them to PoolUnavailable). The process and dask rungs'
# modules are imported when first asked for (dask needs the optional `distributed`).
async def _process(config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    from .process import ProcessRung

    return await ProcessRung.create(config, listener, loop)


async def _thread(config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    return await ThreadRung.create(config, listener, loop)


async def _inline(config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    return await InlineRung.create(config, listener, loop)


async def _dask(config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    from .dask import DaskRung

    return await DaskRung.create(config, listener, loop)


FACTORIES: dict[str, Factory] = {
    "process": _process, "thread": _thread, "inline": _inline, "dask": _dask}
#: Rungs whose workers are other processes: functions are pickled for them.
OUT_OF_PROCESS = frozenset({"process", "dask"})
#: Rungs given one attempt to start: a cluster that does not answer costs one connect
#: timeout, not three.
ONE_ATTEMPT = frozenset({"dask"})
#: Rungs that place work on a cluster: the per-call cluster options apply to them.
CLUSTER = frozenset({"dask"})
#: With warm_start, the rung that serves at once while the one it stands in for
#: starts in the background (then takes over).
STAND_IN = {"process": "thread"}


async def create_rung(name: str, config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    """Start the rung called ``name``; raises what kept it from starting."""
    return await FACTORIES[name](config, listener, loop)


async def clean_up_cluster(config: PoolConfig, loop: Loop) -> None:
    """After a pool's rungs closed: what they left on a cluster through the caller's
    own client (which outlives the pool) is removed (see _dask_init._LEFT)."""
    if config.dask_client is not None and loop.name == "asyncio":  # the client's loop
        from ._dask_init import unregister_left_with

        await unregister_left_with(config.dask_client)


def close_parked_workers() -> int:
    """Stop the process workers parked by ``reuse_workers`` pools; how many stopped."""
    from ._parking import close_parked

    return close_parked()
