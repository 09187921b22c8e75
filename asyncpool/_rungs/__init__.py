"""The rungs of the ladder, and the registry that creates them by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ChunkUnpicklable, Listener, Rung, RungState

if TYPE_CHECKING:
    from .._config import PoolConfig
    from .._loop import Loop

__all__ = ("ChunkUnpicklable", "Listener", "Rung", "RungState", "create_rung")


async def create_rung(name: str, config: PoolConfig, listener: Listener, loop: Loop) -> Rung:
    """Start the rung called ``name``; raises what kept it from starting."""
    # Each rung's module is imported when first asked for: the dask rung needs the
    # optional `distributed` package, and the process rung is all most pools use.
    if name == "process":
        from .process import ProcessRung

        return await ProcessRung.create(config, listener, loop)
    if name == "thread":
        from .thread import ThreadRung

        return await ThreadRung.create(config, listener, loop)
    if name == "inline":
        from .inline import InlineRung

        return await InlineRung.create(config, listener, loop)
    if name == "dask":
        from .dask import DaskRung

        return await DaskRung.create(config, listener, loop)
    raise ValueError(f"no rung is called {name!r}")
