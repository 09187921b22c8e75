"""A FastAPI service that offloads CPU work to the pool; the app's lifespan owns it.

    uvicorn examples.web_service:app            # serve
    python examples/web_service.py              # serve on 127.0.0.1, send itself
                                                # requests, print latencies, exit

It needs FastAPI, uvicorn and httpx: ``pip install -e '.[examples]'``.

Each request calls ``await pool.run(...)`` once. Concurrent requests share chunks, each
gets its answer as soon as its own item is done, and /health answers at once while
the workers compute, because nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

try:
    from fastapi import FastAPI, Request
except ModuleNotFoundError as missing:
    raise SystemExit(f"this example needs {missing.name}: pip install -e '.[examples]'"
                     ) from None

from asyncpool import DeadlineExceeded, ResilientPool


def digest(n: int) -> int:
    """About 1 ms of CPU per unit of n."""
    total = 0
    for i in range(n * 20_000):
        total = (total * 31 + i) % 1_000_003
    return total


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One pool for the life of the service: workers start once and are reused by
    # every request. See the README's "Services" section for sizing.
    async with ResilientPool() as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/compute")
async def compute(request: Request, n: int = 1) -> dict[str, object]:
    pool: ResilientPool = request.app.state.pool
    try:
        # A deadline per request: a stuck item never holds a request forever.
        result = await pool.run(digest, n, timeout=10, kill_on_timeout=True)
    except DeadlineExceeded:
        return {"n": n, "error": "timed out"}
    return {"n": n, "result": result, "backend": pool.backend}


@app.get("/health")
async def health(request: Request) -> dict[str, object]:
    stats = request.app.state.pool.statistics()
    return {"ok": True, "backend": stats.backend, "in_flight": stats.chunks_in_flight}


async def main(requests: int = 60, concurrency: int = 8) -> None:
    import httpx
    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    print(f"serving on {base}")
    compute_ms: list[float] = []
    health_ms: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                started = time.perf_counter()
                reply = await client.get("/compute", params={"n": 1 + i % 3})
                body = reply.json()
                assert reply.status_code == 200 and body["n"] == 1 + i % 3, body
                compute_ms.append(1000 * (time.perf_counter() - started))

        async def probe() -> None:
            while len(compute_ms) < requests:
                started = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                health_ms.append(1000 * (time.perf_counter() - started))
                await asyncio.sleep(0.02)

        await asyncio.gather(probe(), *(one(i) for i in range(requests)))
    server.should_exit = True
    await serving

    def summary(values: list[float]) -> str:
        ordered = sorted(values)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        return (f"median {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms, "
                f"max {ordered[-1]:.1f} ms over {len(ordered)} requests")

    print(f"/compute: {summary(compute_ms)}")
    print(f"/health while computing: {summary(health_ms)}")


if __name__ == "__main__":
    asyncio.run(main())
