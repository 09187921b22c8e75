"""Leave (os._exit) with results unread in our ends of the workers' sockets: closing
them resets the workers' ends under their feet, and they must go quietly, with nothing
on stderr."""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests import tasks  # noqa: E402


async def main() -> None:
    pool = ResilientPool(max_workers=2, chunk_size=1)
    await pool.__aenter__()
    await pool.map(tasks.square, range(4))
    asyncio.ensure_future(pool.map(tasks.nap, [0.05] * 2))
    while pool.statistics().chunks_submitted < 6:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # the chunks leave
    # The loop stops reading: the workers send their results and wait for more.
    time.sleep(1.0)
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
