"""Exit the interpreter with work in flight, two ways (argument: closed | abandoned)."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.tasks import nap  # noqa: E402


async def main(how: str) -> None:
    pool = ResilientPool(max_workers=2, chunk_size=1)
    await pool.__aenter__()
    task = asyncio.ensure_future(pool.map(nap, [30.0] * 6))
    # Whatever the task ends with (PoolClosed when the pool is killed), it is read.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await wait_until(lambda: pool.statistics().chunks_in_flight >= 2)  # both busy
    print("in flight", flush=True)
    if how == "closed":
        # As leaving `async with pool:` on SystemExit does: the work in flight stops.
        exc = SystemExit(0)
        await pool.__aexit__(SystemExit, exc, None)
        raise exc
    task.cancel()
    # "abandoned": the pool is never closed; the interpreter must still exit promptly.


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except SystemExit:
        pass
