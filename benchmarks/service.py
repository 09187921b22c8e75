"""The per-request path, side by side: ``python -m benchmarks.service [--reps N]``.

An async service calls ``await pool.run(fn, x)`` once per request. Measured for
asyncpool, loky + ``loop.run_in_executor`` and the stdlib's ``ProcessPoolExecutor`` +
``run_in_executor``, each in a fresh interpreter with a warm pool of 2 workers:

* burst: 5,000 concurrent ``run()`` of a tiny function (calls per second);
* sequential: one ``run()`` after another (microseconds per call);
* fairness: 40 concurrent ``run()`` of 5 ms of CPU each (median completion, and the
  first completion over the last).

Medians of the repetitions; writes benchmarks/SERVICE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.workloads import burn, square  # noqa: E402

PEERS = ["asyncpool", "loky + run_in_executor", "stdlib + run_in_executor"]
WORKERS = 2


async def _open(peer: str) -> tuple[Callable[..., Awaitable[Any]], Callable[[], Any]]:
    """(submit one call, close) for a peer, its workers warm."""
    if peer == "asyncpool":
        from asyncpool import ResilientPool

        pool = ResilientPool(max_workers=WORKERS)
        await pool.__aenter__()
        await pool.map(square, range(100))
        return pool.run, lambda: pool.__aexit__(None, None, None)
    loop = asyncio.get_running_loop()
    if peer.startswith("loky"):
        import loky

        executor: Any = loky.ProcessPoolExecutor(WORKERS)
    else:
        import concurrent.futures as cf

        executor = cf.ProcessPoolExecutor(WORKERS)
    await asyncio.gather(*(loop.run_in_executor(executor, square, i) for i in range(100)))

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await loop.run_in_executor(executor, fn, *args)

    async def close() -> None:
        executor.shutdown()

    return run, close


async def measure(peer: str, workload: str) -> dict[str, float]:
    run, close = await _open(peer)
    try:
        if workload == "burst":
            # Prime the function's timing once, as a running service would have.
            await asyncio.gather(*(run(square, i) for i in range(200)))
            started = time.perf_counter()
            results = await asyncio.gather(*(run(square, i) for i in range(5000)))
            wall = time.perf_counter() - started
            assert results == [i * i for i in range(5000)]
            return {"calls_per_s": 5000 / wall}
        if workload == "sequential":
            for i in range(200):
                await run(square, i)
            started = time.perf_counter()
            for i in range(2000):
                await run(square, i)
            return {"us_per_call": (time.perf_counter() - started) / 2000 * 1e6}
        if workload == "fairness":
            await asyncio.gather(*(run(burn, 0.005) for _ in range(10)))
            done: list[float] = []
            started = time.perf_counter()

            async def one() -> None:
                await run(burn, 0.005)
                done.append(time.perf_counter() - started)

            await asyncio.gather(*(one() for _ in range(40)))
            done.sort()
            return {"median_ms": statistics.median(done) * 1000,
                    "first_over_last": done[0] / done[-1]}
        raise ValueError(workload)
    finally:
        await close()


def run_one(peer: str, workload: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.service", "--one", peer,
                           workload], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} {workload}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def report(results: dict[str, dict[str, list[dict[str, float]]]], reps: int) -> str:
    def med(peer: str, workload: str, key: str) -> float:
        return statistics.median(r[key] for r in results[workload][peer])

    lines = ["# Service benchmark: one `run()` per request", "",
             f"Measured by `python -m benchmarks.service` on {time.strftime('%Y-%m-%d')}: "
             f"{WORKERS} workers, Python {sys.version.split()[0]}; median of {reps} runs, "
             "each peer in a fresh interpreter with its workers warm.", ""]
    base = "loky + run_in_executor"
    lines += ["## burst: 5,000 concurrent tiny `run()` (calls/s, higher is better)", "",
              "| peer | calls/s | asyncpool / peer |", "|---|---|---|"]
    for peer in PEERS:
        value = med(peer, "burst", "calls_per_s")
        ratio = med("asyncpool", "burst", "calls_per_s") / value
        lines.append(f"| {peer} | {value:,.0f} | {ratio:.2f}x |")
    lines += ["", "## sequential `run()` (µs per call, lower is better)", "",
              "| peer | µs/call | peer / loky |", "|---|---|---|"]
    for peer in PEERS:
        value = med(peer, "sequential", "us_per_call")
        ratio = value / med(base, "sequential", "us_per_call")
        lines.append(f"| {peer} | {value:.0f} | {ratio:.2f}x |")
    lines += ["", "## fairness: 40 concurrent `run()` of 5 ms CPU on 2 workers", "",
              "| peer | median completion | peer / loky | first / last completion |",
              "|---|---|---|---|"]
    for peer in PEERS:
        value = med(peer, "fairness", "median_ms")
        ratio = value / med(base, "fairness", "median_ms")
        lines.append(f"| {peer} | {value:.1f} ms | {ratio:.2f}x "
                     f"| {med(peer, 'fairness', 'first_over_last'):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "SERVICE.md"))
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(measure(*args.one))))
        return 0
    import compileall

    compileall.compile_dir(str(ROOT / "asyncpool"), quiet=1)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rep in range(args.reps):
        for workload in ("burst", "sequential", "fairness"):
            order = PEERS[rep % len(PEERS):] + PEERS[:rep % len(PEERS)]
            for peer in order:
                outcome = run_one(peer, workload)
                results.setdefault(workload, {}).setdefault(peer, []).append(outcome)
                print(f"[{rep + 1}/{args.reps}] {workload:10} {peer:26} {outcome}", flush=True)
    text = report(results, args.reps)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
