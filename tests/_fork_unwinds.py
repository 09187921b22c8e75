"""A program that forks while its pool maps, the child leaving through the loop it
inherited (SystemExit unwinds it): prints the parent's map's outcome."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests import tasks  # noqa: E402


async def main() -> None:
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(10))
        mapping = asyncio.ensure_future(pool.map(tasks.nap, [0.01] * 200))
        await asyncio.sleep(0.1)
        if os.fork() == 0:
            os.close(2)  # (the child's own unwinding says nothing here)
            raise SystemExit(0)
        os.wait()
        try:
            got = await asyncio.wait_for(mapping, 30)
        except TimeoutError:
            print("the map waited 30 s", flush=True)
            os._exit(1)
        print("mapped", len(got), await pool.run(tasks.square, 3), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
