from __future__ import annotations

import functools

import pytest
import pytest_asyncio

import asyncpool
from asyncpool import PoolClosed, RemoteTraceback, ResilientPool

from . import tasks

pytestmark = pytest.mark.asyncio


async def agen(n: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        yield i


@pytest_asyncio.fixture
async def pool():  # type: ignore[no-untyped-def]
    async with ResilientPool(max_workers=2) as p:
        yield p


async def test_run_map_imap(pool: ResilientPool, no_leaks: None) -> None:
    assert pool.backend == "process"
    assert await pool.run(tasks.add, 2, 3) == 5
    assert await pool.run(functools.partial(tasks.fail_on, bad=-1), 9) == 9
    assert await pool.map(tasks.square, range(1000)) == [i * i for i in range(1000)]
    assert await pool.map(tasks.square, (i for i in range(500))) == [i * i for i in range(500)]
    assert await pool.map(tasks.square, agen(300)) == [i * i for i in range(300)]
    assert await pool.map(tasks.square, []) == []
    assert await pool.starmap(tasks.add, [(1, 2), (3, 4)]) == [3, 7]
    ordered = [y async for y in pool.imap(tasks.square, (i for i in range(700)))]
    assert ordered == [i * i for i in range(700)]
    unordered = [y async for y in pool.imap(tasks.square, agen(700), ordered=False)]
    assert sorted(unordered) == [i * i for i in range(700)]
    assert [y async for y in pool.imap(tasks.square, [])] == []


async def test_ordered_imap_with_uneven_items(pool: ResilientPool) -> None:
    # Early items are slow, so later chunks finish first: order must still hold.
    durations = [0.05] * 4 + [0.0] * 60
    got = [y async for y in pool.imap(tasks.nap, durations, chunk_size=2)]
    assert got == durations


async def test_per_item_errors(pool: ResilientPool) -> None:
    results = await pool.map(tasks.fail_on, range(6), return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], ValueError) and "item 3" in str(results[3])
    with pytest.raises(ValueError, match="item 3") as info:
        await pool.map(tasks.fail_on, range(6))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    got = [y async for y in pool.imap(tasks.fail_on, range(6), return_exceptions=True)]
    assert isinstance(got[3], ValueError) and got[5] == 5
    stats = pool.statistics()
    # The raising map stops early, so only the two full runs are sure to count.
    assert stats.tasks_failed >= 3 and stats.tasks_completed >= 10
    # The pool is unharmed.
    assert await pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]


async def test_statistics_is_frozen(pool: ResilientPool) -> None:
    await pool.map(tasks.square, range(10))
    stats = pool.statistics()
    for name in ("backend", "creation_attempts", "creation_failures", "fallbacks",
                 "promotions", "tasks_completed", "tasks_failed"):
        assert hasattr(stats, name)
    assert stats.backend == "process" and stats.tasks_completed == 10
    with pytest.raises(AttributeError):
        stats.tasks_completed = 0  # type: ignore[misc]


async def test_private_executor_per_pool() -> None:
    async with ResilientPool(max_workers=1) as a, ResilientPool(max_workers=2) as b:
        pids_a = set(await a.map(tasks.pid_of, range(20)))
        pids_b = set(await b.map(tasks.pid_of, range(20)))
        assert pids_a.isdisjoint(pids_b)
        assert a.backend == b.backend == "process"


async def test_closed_pool_refuses() -> None:
    pool = ResilientPool(max_workers=1, rungs=("thread", "inline"))
    with pytest.raises(PoolClosed):
        await pool.run(tasks.square, 2)
    async with pool:
        assert await pool.run(tasks.square, 3) == 9
    with pytest.raises(PoolClosed):
        await pool.map(tasks.square, [1])
    assert pool.backend is None


async def test_lambda_runs_unpicklable_function_is_named() -> None:
    async with ResilientPool(max_workers=1) as pool:
        assert await pool.map(lambda x: x + 1, [1, 2]) == [2, 3]
        lock = __import__("threading").Lock()
        with pytest.raises(asyncpool.SerializationError, match="function"):
            await pool.map(functools.partial(lambda held, x: x, lock), [1])


async def test_reuse_workers_across_pools(no_leaks: None) -> None:
    async with ResilientPool(max_workers=2, reuse_workers=True) as first:
        pids = set(await first.map(tasks.pid_of, range(40), chunk_size=1))
    async with ResilientPool(max_workers=2, reuse_workers=True) as second:
        assert set(await second.map(tasks.pid_of, range(40), chunk_size=1)) <= pids
    async with ResilientPool(max_workers=2) as third:  # not opted in: fresh workers
        assert set(await third.map(tasks.pid_of, range(40), chunk_size=1)).isdisjoint(pids)
    assert await ResilientPool.close_idle_workers() == 1
