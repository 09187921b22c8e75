"""One of two processes sharing a Dask cluster: prints its backend and results as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests.tasks import add_one_each  # noqa: E402


def doubled(args: tuple[int, int]) -> int:
    return add_one_each(args) * 2


async def main(address: str, offset: int) -> None:
    async with ResilientPool(max_workers=2, dask_address=address) as pool:
        results = await pool.map(doubled, [(i + offset, 0) for i in range(400)], chunk_size=4)
        print(json.dumps({"backend": pool.backend, "results": results}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
