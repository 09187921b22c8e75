"""Checked by mypy in test_typing.py, never run: the public signatures' promises.

Every ``type: ignore[code]`` here must stand on a real error (``--strict`` includes
``warn_unused_ignores``), so a signature that stopped checking fails the test.
"""

from __future__ import annotations

from typing import assert_type

from asyncpool import PoolEvent, PoolOptions, PoolStatistics, ResilientPool


def add(a: int, b: int) -> int:
    return a + b


def name(x: int) -> str:
    return str(x)


async def check(pool: ResilientPool) -> None:
    assert_type(await pool.run(add, 1, 2), int)
    await pool.run(add, 1, "2")  # type: ignore[arg-type]
    await pool.run(add, 1)  # type: ignore[arg-type]
    await pool.run(add, 1, 2, timeout=1.0, kill_on_timeout=True)
    await pool.run(add, 1, 2, timout=1.0)  # type: ignore[call-arg]
    assert_type(await pool.map(name, [1, 2]), list[str])
    await pool.map(name, ["a"])  # type: ignore[arg-type]
    assert_type(await pool.map(name, [1], return_exceptions=True), list[str | BaseException])
    assert_type(await pool.starmap(add, [(1, 2), (3, 4)]), list[int])
    await pool.starmap(add, [(1, "2")])  # type: ignore[arg-type]
    async for value in pool.imap(name, range(3)):
        assert_type(value, str)
    async with pool.imap(name, range(3), ordered=False) as results:
        async for value in results:
            assert_type(value, str)
    async for outcome in pool.imap(name, range(3), return_exceptions=True):
        assert_type(outcome, str | BaseException)
    assert_type(pool.statistics(), PoolStatistics)


def configure() -> None:
    ResilientPool(max_workers=2, chunk_size=10, rungs=("process", "inline"))
    ResilientPool(max_workrs=2)  # type: ignore[call-arg]
    ResilientPool(chunk_size="10")  # type: ignore[arg-type]
    # PoolOptions' own example; max_workers is the pool's argument, not an option.
    options: PoolOptions = {"start_timeout": 30.0, "max_tasks_per_worker": 1000}
    ResilientPool(4, **options)
    ResilientPool(**PoolOptions(max_workers=4))  # type: ignore[typeddict-unknown-key]


def hooks() -> None:
    # A hook's parameter may have any name, and return anything.
    def note(e: PoolEvent) -> None:
        pass

    events: list[PoolEvent] = []
    ResilientPool(on_event=note)
    ResilientPool(on_event=events.append)
    ResilientPool(on_event=print)
    ResilientPool(on_event=len)  # type: ignore[arg-type]
