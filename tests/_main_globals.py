"""Globals of the main script, as workers see them: a plain value or a function
follows the caller's latest, state an initializer built stays (prints one line per
check)."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402

SCALE = 1
STATE: dict[str, str] = {}


def init() -> None:
    STATE["tag"] = "hello"


def scaled(_: int) -> int:
    return SCALE


def tag(_: int) -> str:
    return STATE.get("tag", "missing")


def helper(x: int) -> int:
    return x + 1


def via_helper(x: int) -> int:
    return helper(x)


async def main() -> None:
    global SCALE, helper
    async with ResilientPool(max_workers=2, initializer=init) as pool:
        print(await pool.run(scaled, 0))
        SCALE = 10
        values = await pool.map(scaled, range(12), chunk_size=1)
        print(values[0])
        print(min(values))  # every worker, not only one of them
        tags = set(await pool.map(tag, range(12), chunk_size=1))
        print(*tags)
        print(await pool.run(via_helper, 0))

        def helper(x: int) -> int:  # redefined, as in a notebook: it follows too
            return x + 100

        print(*set(await pool.map(via_helper, [0] * 12, chunk_size=1)))


if __name__ == "__main__":
    asyncio.run(main())
