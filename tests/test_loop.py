"""Nothing blocks the event loop; nothing leaks."""

from __future__ import annotations

import time

import anyio
import pytest

from asyncpool import ResilientPool

from . import tasks

pytestmark = pytest.mark.asyncio

# The target is 50 ms; the bound is 10x that so a loaded CI machine cannot flake it, and
# a blocking call on the loop (a pool start is ~200 ms, a shutdown joins processes)
# still fails it.
LAG_BOUND = 0.5


async def _heartbeat(lags: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await anyio.sleep(0.005)
        lags.append(time.perf_counter() - before - 0.005)


async def test_heartbeat_during_start_map_and_close() -> None:
    lags: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_heartbeat, lags)
        await anyio.sleep(0.02)
        async with ResilientPool(max_workers=2) as pool:
            await pool.map(tasks.burn, [0.002] * 300)
            await pool.map(tasks.square, range(200_000))
            async for _ in pool.imap(tasks.square, range(50_000)):
                pass
        tg.cancel_scope.cancel()
    assert len(lags) > 20
    assert max(lags) < LAG_BOUND, f"loop blocked for {max(lags):.3f} s"


@pytest.mark.parametrize("rungs", [("process", "thread", "inline"), ("thread", "inline"),
                                   ("inline",)])
async def test_no_leaks_after_close(rungs: tuple[str, ...], no_leaks: None) -> None:
    for _ in range(3):
        async with ResilientPool(max_workers=2, rungs=rungs) as pool:  # type: ignore[arg-type]
            assert await pool.map(tasks.square, range(1000)) == [i * i for i in range(1000)]
