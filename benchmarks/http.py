"""HTTP, side by side: ``python -m benchmarks.http [--reps N]``.

200 concurrent requests, each ~12 ms of CPU, against the same FastAPI app served by
uvicorn on 127.0.0.1, its work offloaded to asyncpool or to
``run_in_executor(ProcessPoolExecutor(2))``. The load comes from another process
(httpx). Reports each request's latency p50 and p99 (medians over the repetitions);
writes benchmarks/HTTP.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ["asyncpool", "executor"]
LABELS = {"asyncpool": "asyncpool `pool.run`",
          "executor": "`run_in_executor(ProcessPoolExecutor(2))`"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _load(base: str, requests: int) -> list[float]:
    import httpx

    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        for _ in range(60):
            try:
                await client.get("/compute")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)

        async def one() -> float:
            started = time.perf_counter()
            reply = await client.get("/compute")
            assert reply.status_code == 200, reply.text
            return time.perf_counter() - started

        return await asyncio.gather(*(one() for _ in range(requests)))


def measure(mode: str, requests: int) -> dict[str, float]:
    port = _port()
    env = {**os.environ, "BENCH_POOL": mode}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.http_app:app",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level",
                               "warning"], cwd=ROOT, env=env)
    try:
        latencies = sorted(asyncio.run(_load(f"http://127.0.0.1:{port}", requests)))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "HTTP.md"))
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for mode in MODES[rep % 2:] + MODES[:rep % 2]:
            runs[mode].append(measure(mode, args.requests))
            print(f"[{rep + 1}/{args.reps}] {mode:10} {runs[mode][-1]}", flush=True)
    base = {key: statistics.median(r[key] for r in runs["executor"]) for key in ("p50", "p99")}
    lines = ["# HTTP benchmark", "",
             f"Measured by `python -m benchmarks.http` on {time.strftime('%Y-%m-%d')}: "
             f"{args.requests} concurrent requests of ~12 ms CPU to a FastAPI app under "
             "uvicorn (127.0.0.1), 2 worker processes; median of "
             f"{args.reps} runs.", "", "| offloaded with | p50 | p99 | p50 / executor | "
             "p99 / executor |", "|---|---|---|---|---|"]
    for mode in MODES:
        p50 = statistics.median(r["p50"] for r in runs[mode])
        p99 = statistics.median(r["p99"] for r in runs[mode])
        lines.append(f"| {LABELS[mode]} | {p50:.0f} ms | {p99:.0f} ms | "
                     f"{p50 / base['p50']:.2f}x | {p99 / base['p99']:.2f}x |")
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
