"""How each library runs a workload, as its own users would write it.

Each runner is ``async def runner(fn, afn, items, workers, chunksize) -> list`` and
includes creating its pool (start-up counts for everyone); closing is not timed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Awaitable, Callable
from typing import Any

Runner = Callable[..., Awaitable[Any]]
_closers: list[Callable[[], Any]] = []


def close_all() -> None:
    while _closers:
        _closers.pop()()


_pending_close: list[Any] = []


async def close_async() -> None:
    while _pending_close:
        await _pending_close.pop().__aexit__(None, None, None)


def _asyncpool(**options: Any) -> Runner:
    async def run(fn, afn, items, workers, chunksize, *, stream=False, **_):  # type: ignore[no-untyped-def]
        from asyncpool import ResilientPool

        pool = ResilientPool(max_workers=workers, **options)
        await pool.__aenter__()
        _pending_close.append(pool)
        if stream:
            total = 0
            async for value in pool.imap(fn, items):
                total += value
            return total
        return await pool.map(fn, items)

    return run


asyncpool_default = _asyncpool()
asyncpool_warm_start = _asyncpool(warm_start=True)


async def stdlib_map(fn, afn, items, workers, chunksize, *, stream=False, **_):  # type: ignore[no-untyped-def]
    ex = cf.ProcessPoolExecutor(workers)
    _closers.append(ex.shutdown)
    if stream:
        return sum(ex.map(fn, items, chunksize=chunksize))
    return list(ex.map(fn, items, chunksize=chunksize))


async def stdlib_run_in_executor(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    ex = cf.ProcessPoolExecutor(workers)
    _closers.append(ex.shutdown)
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(ex, fn, x) for x in items))


async def joblib_parallel(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=workers)(delayed(fn)(x) for x in items)


async def loky_map(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    import loky

    ex = loky.ProcessPoolExecutor(workers)
    _closers.append(ex.shutdown)
    return list(ex.map(fn, items, chunksize=chunksize))


async def pebble_map(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    import pebble

    pool = pebble.ProcessPool(max_workers=workers)
    _closers.append(lambda: (pool.close(), pool.join()))
    return list(pool.map(fn, items, chunksize=chunksize).result())


async def aiomultiprocess_map(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    import aiomultiprocess

    async with aiomultiprocess.Pool(processes=workers) as pool:
        return await pool.map(afn, items)


async def anyio_to_process(fn, afn, items, workers, chunksize, **_):  # type: ignore[no-untyped-def]
    import anyio
    import anyio.to_process

    limiter = anyio.CapacityLimiter(workers)
    results: list[Any] = [None] * len(items)

    async def one(i: int, x: Any) -> None:
        results[i] = await anyio.to_process.run_sync(fn, x, limiter=limiter)

    async with anyio.create_task_group() as tg:
        for i, x in enumerate(items):
            tg.start_soon(one, i, x)
    return results


#: Modules each peer imports, loaded before timing starts: an import is a one-time cost
#: of the process, not of a pool (and on the loop it would show up as heartbeat lag).
MODULES = {
    "asyncpool": ["asyncpool._pool", "asyncpool._engine", "asyncpool._rungs.process",
                  "asyncpool._forkserver", "asyncpool._consume"],
    "joblib": ["joblib"],
    "loky": ["loky"],
    "pebble": ["pebble"],
    "aiomultiprocess": ["aiomultiprocess"],
    "anyio": ["anyio.to_process"],
}


def preload(peer: str) -> None:
    import importlib

    for prefix, modules in MODULES.items():
        if peer.startswith(prefix):
            for module in modules:
                importlib.import_module(module)


PEERS: dict[str, Runner] = {
    "asyncpool": asyncpool_default,
    "asyncpool warm_start": asyncpool_warm_start,
    "stdlib ProcessPoolExecutor.map": stdlib_map,
    "stdlib run_in_executor per item": stdlib_run_in_executor,
    "joblib Parallel": joblib_parallel,
    "loky executor.map": loky_map,
    "pebble ProcessPool.map": pebble_map,
    "aiomultiprocess Pool.map": aiomultiprocess_map,
    "anyio to_process.run_sync": anyio_to_process,
}

#: Peers that pay an IPC round trip per item: they get a smaller slice of the tiny
#: workload (throughput is what is compared), or the run would take minutes.
PER_ITEM = {"stdlib run_in_executor per item", "aiomultiprocess Pool.map",
            "anyio to_process.run_sync"}

