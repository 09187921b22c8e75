"""A main script whose two pools on one Dask cluster each set a global of this script
in their initializer, then a third pool with none: prints what each pool's tasks saw."""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402

MODEL: str | None = None


def load(name: str) -> None:
    global MODEL
    MODEL = name


def which(_: int) -> str | None:
    return MODEL


async def main(address: str) -> None:
    seen = {}
    async with ResilientPool(max_workers=1, dask_address=address, initializer=load,
                             initargs=("A",)) as a, ResilientPool(
            max_workers=1, dask_address=address, initializer=load, initargs=("B",)) as b:
        assert a.backend == b.backend == "dask"
        seen["A"] = sorted(set(await a.map(which, range(20), chunk_size=1)), key=str)
        seen["B"] = sorted(set(await b.map(which, range(20), chunk_size=1)), key=str)
    async with ResilientPool(max_workers=1, dask_address=address) as none:
        seen["none"] = sorted(set(await none.map(which, range(20), chunk_size=1)), key=str)
    print(json.dumps(seen))


asyncio.run(main(sys.argv[1]))
