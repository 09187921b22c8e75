"""Checked by mypy in test_typing.py, never run: the public signatures' promises."""

from __future__ import annotations

from typing import assert_type

from asyncpool import ResilientPool


def add(a: int, b: int) -> int:
    return a + b


def name(x: int) -> str:
    return str(x)


async def check(pool: ResilientPool) -> None:
    assert_type(await pool.run(add, 1, 2), int)
    await pool.run(add, 1, "2")  # type: ignore[arg-type]
    await pool.run(add, 1)  # type: ignore[arg-type]
    assert_type(await pool.map(name, [1, 2]), list[str])
    await pool.map(name, ["a"])  # type: ignore[arg-type]
    assert_type(await pool.map(name, [1], return_exceptions=True), list[str | BaseException])
    async for value in pool.imap(name, range(3)):
        assert_type(value, str)
