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
from tests.helpers import wait_until  # noqa: E402


async def main() -> None:
    pool = ResilientPool(max_workers=2, chunk_size=1)
    await pool.__aenter__()
    await pool.map(tasks.square, range(4))
    asyncio.ensure_future(pool.map(tasks.nap, [0.05] * 2))
    await wait_until(lambda: pool.statistics().chunks_submitted >= 6)
    # Not a wait for a condition: a few turns of the loop to write what the sockets
    # did not take at once. Whether the workers then find the parent gone while they
    # send or while they wait is the race this scenario runs three times.
    await asyncio.sleep(0.01)
    # The loop stops reading: the workers send their results and wait for more.
    time.sleep(1.0)
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
