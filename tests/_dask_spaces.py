"""A pool's initializer state on a Dask worker, while 17 other pools of this process
use main-script functions there (prints the values its functions read, as JSON)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402

CONF: dict[str, str] = {}


def init(value: str) -> None:
    CONF["value"] = value


def first(_: int) -> str | None:
    return CONF.get("value")


def sent_later(_: int) -> str | None:
    return CONF.get("value")


def other(x: int) -> int:
    return x


async def main(address: str) -> None:
    async with ResilientPool(max_workers=1, dask_address=address, initializer=init,
                             initargs=("A",)) as pool:
        seen = set(await pool.map(first, range(4)))
        for _ in range(17):  # each a namespace of its own on the worker
            async with ResilientPool(max_workers=1, dask_address=address) as another:
                await another.map(other, range(2))
        seen |= set(await pool.map(first, range(4))) | set(await pool.map(sent_later,
                                                                          range(4)))
        print(json.dumps({"backend": pool.backend, "seen": sorted(map(str, seen))}),
              flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
