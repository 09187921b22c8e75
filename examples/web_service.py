"""A small aiohttp service that offloads CPU work to the pool.

Run directly, it starts on 127.0.0.1 (a free port), sends itself requests, prints the
latencies and exits. While requests compute in worker processes, the loop keeps
answering: /health stays fast under load.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from aiohttp import ClientSession, web

from asyncpool import ResilientPool


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a % 1_000_000_007


def digest(n: int) -> int:
    """About 10 ms of CPU."""
    total = 0
    for i in range(n * 20_000):
        total = (total * 31 + i) % 1_000_003
    return total


async def compute(request: web.Request) -> web.Response:
    pool: ResilientPool = request.app["pool"]
    n = int(request.query.get("n", "1"))
    result = await pool.run(digest, n)
    return web.json_response({"n": n, "result": result, "backend": pool.backend})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "stats": str(request.app["pool"].statistics())})


async def pool_context(app: web.Application):  # type: ignore[no-untyped-def]
    async with ResilientPool() as pool:
        app["pool"] = pool
        yield


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(pool_context)
    app.add_routes([web.get("/compute", compute), web.get("/health", health)])
    return app


async def main(requests: int = 60, concurrency: int = 8) -> None:
    runner = web.AppRunner(make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    print(f"serving on {base}")
    compute_ms: list[float] = []
    health_ms: list[float] = []
    async with ClientSession() as session:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                started = time.perf_counter()
                async with session.get(f"{base}/compute", params={"n": str(1 + i % 3)}) as r:
                    body = await r.json()
                    assert r.status == 200 and body["n"] == 1 + i % 3
                compute_ms.append(1000 * (time.perf_counter() - started))

        async def probe() -> None:
            while len(compute_ms) < requests:
                started = time.perf_counter()
                async with session.get(f"{base}/health") as r:
                    assert r.status == 200
                health_ms.append(1000 * (time.perf_counter() - started))
                await asyncio.sleep(0.02)

        await asyncio.gather(probe(), *(one(i) for i in range(requests)))
    await runner.cleanup()

    def summary(values: list[float]) -> str:
        ordered = sorted(values)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        return (f"median {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms, "
                f"max {ordered[-1]:.1f} ms over {len(ordered)} requests")

    print(f"/compute: {summary(compute_ms)}")
    print(f"/health while computing: {summary(health_ms)}")


if __name__ == "__main__":
    asyncio.run(main())
