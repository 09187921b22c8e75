"""Fault timings for the closing figures: `python -m benchmarks.resilience`.

Measures, in one run: a 2,000-item map with a worker SIGKILLed in it beside the same
map with no fault; isolating a poison item among 2,000; how late DeadlineExceeded
arrives; how long cancellation takes; the event loop's heartbeat lag while a pool
starts, maps and closes; and, where `distributed` is installed, a 20,000-item map on a
2-worker LocalCluster beside local processes and the time to fall back from a
scheduler that does not answer. Writes benchmarks/RESILIENCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asyncpool import DeadlineExceeded, ResilientPool, WorkerCrashed  # noqa: E402
from benchmarks.workloads import burn, square  # noqa: E402


def kill_once(args: tuple[float, str]) -> float:
    seconds, marker = args
    if seconds < 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return burn(abs(seconds))


def poison(args: tuple[int, int]) -> int:
    x, bad = args
    if x == bad:
        os._exit(3)
    return x


async def heartbeat(lags: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - before - 0.005)


async def timed(coro) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    await coro
    return time.perf_counter() - started


async def main() -> list[str]:
    rows: list[str] = []
    lags: list[float] = []
    beat = asyncio.ensure_future(heartbeat(lags))
    work = [0.0005] * 2000  # 2,000 items of 0.5 ms: 1 s of CPU
    clean, crashed = [], []
    for _ in range(3):
        async with ResilientPool(max_workers=2) as pool:
            clean.append(await timed(pool.map(kill_once, [(w, "") for w in work])))
        with tempfile.TemporaryDirectory() as tmp:
            items = [(w, os.path.join(tmp, "m")) for w in work]
            items[1000] = (-0.0005, items[1000][1])  # this item SIGKILLs its worker once
            async with ResilientPool(max_workers=2) as pool:
                started = time.perf_counter()
                results = await pool.map(kill_once, items)
                crashed.append(time.perf_counter() - started)
                assert len(results) == 2000 and pool.statistics().worker_crashes >= 1
    rows.append(f"| 2,000-item map (0.5 ms items), no fault | {statistics.median(clean):.3f} s |")
    rows.append(f"| same map, one worker SIGKILLed mid-map | {statistics.median(crashed):.3f} s "
                f"(+{statistics.median(crashed) - statistics.median(clean):.3f} s, every "
                "result returned) |")

    isolate = []
    for _ in range(3):
        async with ResilientPool(max_workers=2) as pool:
            started = time.perf_counter()
            results = await pool.map(poison, [(i, 1234) for i in range(2000)],
                                     return_exceptions=True)
            isolate.append(time.perf_counter() - started)
            assert isinstance(results[1234], WorkerCrashed)
            stats = pool.statistics()
    rows.append(f"| map of 2,000 tiny items, one of them poison (os._exit): the whole map | "
                f"{statistics.median(isolate):.3f} s ({stats.worker_crashes} crashes, "
                f"{stats.resubmitted_chunks} chunks resent) |")

    late, cancel = [], []
    async with ResilientPool(max_workers=2, chunk_size=1) as pool:
        for _ in range(5):
            started = time.perf_counter()
            try:
                await pool.map(burn, [0.3] * 20, timeout=1.0, kill_on_timeout=True)
            except DeadlineExceeded as exc:
                late.append(time.perf_counter() - started - 1.0)
                assert exc.partial.count(0.3) >= 1
            task = asyncio.ensure_future(pool.map(burn, [0.3] * 20))
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancel.append(time.perf_counter() - started)
    rows.append(f"| DeadlineExceeded after the deadline (timeout 1 s) | median "
                f"{statistics.median(late) * 1000:.1f} ms late, max {max(late) * 1000:.1f} ms "
                f"(n={len(late)}) |")
    rows.append(f"| cancelling a task awaiting map | median {statistics.median(cancel) * 1000:.2f}"
                f" ms, max {max(cancel) * 1000:.2f} ms (n={len(cancel)}) |")
    beat.cancel()
    lags.sort()
    rows.append(f"| heartbeat lag over all of the above (5 ms tick) | max {lags[-1] * 1000:.1f} "
                f"ms, p99 {lags[int(0.99 * (len(lags) - 1))] * 1000:.1f} ms |")

    try:
        import distributed
    except ImportError:
        rows.append("| dask | not measured: `distributed` is not installed |")
        return rows
    async with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None,
                                        asynchronous=True, silence_logs=50) as cluster:
        on_dask, local = [], []
        for _ in range(3):
            async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address
                                     ) as pool:
                assert pool.backend == "dask"
                on_dask.append(await timed(pool.map(square, range(20_000))))
            async with ResilientPool(max_workers=2) as pool:
                local.append(await timed(pool.map(square, range(20_000))))
    rows.append(f"| 20,000-item map on a 2-worker LocalCluster | {statistics.median(on_dask):.3f} s"
                f" (local processes: {statistics.median(local):.3f} s) |")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    async with ResilientPool(max_workers=2, dask_address=f"tcp://127.0.0.1:{port}",
                             dask_connect_timeout=5.0) as pool:
        fell = time.perf_counter() - started
        assert pool.backend == "process"
    rows.append(f"| fall back from a scheduler nobody answers (connect timeout 5 s) | "
                f"{fell:.2f} s to serving on local processes |")
    return rows


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resilience")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RESILIENCE.md"))
    args = parser.parse_args(argv)
    rows = asyncio.run(main())
    text = "\n".join(["# Resilience timings", "",
                      f"`python -m benchmarks.resilience` on {time.strftime('%Y-%m-%d')}, "
                      f"{len(os.sched_getaffinity(0))} cores; medians of 3 to 5 runs.", "",
                      "| what | measured |", "|---|---|", *rows, ""])
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
