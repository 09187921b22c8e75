"""The app the HTTP benchmark serves: examples/web_service.py's shape, its CPU work
offloaded either to asyncpool or to ``run_in_executor(ProcessPoolExecutor)``.

    BENCH_POOL=asyncpool|executor uvicorn benchmarks.http_app:app
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from benchmarks.workloads import burn

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
MODE = os.environ.get("BENCH_POOL", "asyncpool")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if MODE == "asyncpool":
        from asyncpool import ResilientPool

        async with ResilientPool(max_workers=WORKERS) as pool:
            await pool.map(burn, [0.012] * 20)  # warm, as a service would be
            app.state.call = pool.run
            yield
    else:
        executor = cf.ProcessPoolExecutor(WORKERS)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(executor, burn, 0.012) for _ in range(20)))

        async def call(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(executor, fn, *args)

        app.state.call = call
        yield
        executor.shutdown()


app = FastAPI(lifespan=lifespan)


@app.get("/compute")
async def compute() -> dict[str, float]:
    return {"spent": await app.state.call(burn, 0.012)}
