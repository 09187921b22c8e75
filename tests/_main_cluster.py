"""A main script that maps on a Dask cluster with globals of its own: run twice with
different offsets against one cluster, each must see only its own ``TABLE`` and
``helper`` (prints how many results were wrong)."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402

ADDRESS, OFFSET = sys.argv[1], int(sys.argv[2])
TABLE = {"offset": OFFSET}


def helper(x: int) -> int:
    return x + TABLE["offset"]


def work(x: int) -> int:
    return helper(x)


async def main() -> None:
    async with ResilientPool(max_workers=1, dask_address=ADDRESS) as pool:
        assert pool.backend == "dask"
        results = await pool.map(work, range(200), chunk_size=10)
        print(sum(r != x + OFFSET for x, r in enumerate(results)))


asyncio.run(main())
