"""The dask rung beside plain Dask, on a cluster started from the command line:
``python -m benchmarks.dask_bench``.

* 80 items of 0.2 s, and 300 of 0.02 s (sleep) on a 10-thread cluster: asyncpool's
  map beside ``client.map`` + ``gather``;
* a ``functools.partial`` holding a 20 MB table over 2,000 items: asyncpool (on the
  cluster, and on local processes) beside ``client.scatter(fn, broadcast=True)`` and 40
  batches;
* the scheduler SIGKILLed mid-map over 400 items: results, and how long until the
  pool serves locally.

Writes benchmarks/DASK.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asyncpool import ResilientPool  # noqa: E402

from benchmarks.hang_tasks import nap  # noqa: E402


def lookup(table: bytes, i: int) -> int:
    return table[i % len(table)] + i


def batch(fn: Any, items: list[int]) -> list[int]:
    return [fn(i) for i in items]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, workers: int, threads: int) -> None:
        self.port = _port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.workers, self.threads = workers, threads
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler: subprocess.Popen[bytes] | None = None

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        dask = str(Path(sys.executable).with_name("dask"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen([dask, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)

    async def start(self) -> None:
        self.scheduler = self._spawn("scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard")
        for _ in range(self.workers):
            self.procs.append(self._spawn("worker", self.address, "--nworkers", "1",
                                          "--nthreads", str(self.threads), "--no-dashboard",
                                          "--host", "127.0.0.1"))
        from distributed import Client

        for _ in range(300):
            try:
                async with Client(self.address, asynchronous=True, timeout="2s",
                                  set_as_default=False) as client:
                    await client.wait_for_workers(self.workers, timeout=60)
                    return
            except OSError:
                await asyncio.sleep(0.2)

    def kill_scheduler(self) -> None:
        if self.scheduler is not None:
            os.killpg(self.scheduler.pid, signal.SIGKILL)
            self.scheduler.wait()
            self.scheduler = None

    def stop(self) -> None:
        # Asked to stop, workers remove their semaphores from /dev/shm (SIGKILLed, they
        # left them there); what is left after 10 s is killed. Workers first.
        for group in (self.procs, [self.scheduler] if self.scheduler else []):
            for proc in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            for proc in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.scheduler = None


async def wide(cluster: Cluster, items: list[float]) -> dict[str, float]:
    from distributed import Client

    async with Client(cluster.address, asynchronous=True, set_as_default=False) as client:
        started = time.perf_counter()
        assert await client.gather(client.map(nap, items, pure=False)) == items
        plain = time.perf_counter() - started
    async with ResilientPool(max_workers=2, dask_address=cluster.address) as pool:
        started = time.perf_counter()
        assert await pool.map(nap, items) == items
        ours = time.perf_counter() - started
    return {"plain": plain, "asyncpool": ours}


async def heavy(cluster: Cluster) -> dict[str, float]:
    from distributed import Client

    table = os.urandom(20 << 20)
    fn = functools.partial(lookup, table)
    items = list(range(2000))
    expected = [lookup(table, i) for i in items]
    async with Client(cluster.address, asynchronous=True, set_as_default=False) as client:
        started = time.perf_counter()
        shipped = await client.scatter(fn, broadcast=True, hash=False)
        batches = [items[i:i + 50] for i in range(0, 2000, 50)]
        got = await client.gather(client.map(batch, [shipped] * 40, batches, pure=False))
        plain = time.perf_counter() - started
        assert [x for b in got for x in b] == expected
    async with ResilientPool(max_workers=2, dask_address=cluster.address) as pool:
        started = time.perf_counter()
        assert await pool.map(fn, items) == expected
        on_dask = time.perf_counter() - started
    async with ResilientPool(max_workers=2) as pool:
        started = time.perf_counter()
        assert await pool.map(fn, items) == expected
        local = time.perf_counter() - started
    return {"plain": plain, "dask rung": on_dask, "process rung": local}


async def lost(cluster: Cluster) -> dict[str, Any]:
    async with ResilientPool(max_workers=2, dask_address=cluster.address,
                             dask_connect_timeout=2.0, promote_after=60) as pool:
        task = asyncio.ensure_future(pool.map(nap, [0.02] * 400, chunk_size=4,
                                              return_exceptions=True))
        while pool.statistics().tasks_completed < 40:
            await asyncio.sleep(0.01)
        killed = time.perf_counter()
        cluster.kill_scheduler()
        while pool.backend != "process":
            await asyncio.sleep(0.01)
        local = time.perf_counter() - killed
        results = await task
    return {"correct": results == [0.02] * 400, "local_after": local}


async def main_async() -> str:
    lines = ["# Dask benchmark", "",
             f"Measured by `python -m benchmarks.dask_bench` on {time.strftime('%Y-%m-%d')}: "
             "a cluster started with `dask scheduler` and `dask worker` on 127.0.0.1.", ""]
    cluster = Cluster(workers=2, threads=5)
    try:
        await cluster.start()
        for count, seconds in ((80, 0.2), (300, 0.02)):
            w = await wide(cluster, [seconds] * count)
            lines += [f"## {count} items of {seconds} s on a 10-thread cluster", "",
                      "| | wall | / plain |", "|---|---|---|",
                      f"| plain `client.map` + `gather` | {w['plain']:.2f} s | 1.00x |",
                      f"| asyncpool `map` | {w['asyncpool']:.2f} s | "
                      f"{w['asyncpool'] / w['plain']:.2f}x |", ""]
    finally:
        cluster.stop()
    cluster = Cluster(workers=2, threads=1)
    try:
        await cluster.start()
        h = await heavy(cluster)
        lines += ["## a partial holding a 20 MB table, over 2,000 items (2 workers)", "",
                  "| | wall | / scatter + batches |", "|---|---|---|",
                  f"| plain: `scatter(fn, broadcast=True)` + 40 batches | {h['plain']:.2f} s "
                  "| 1.00x |"]
        for key in ("dask rung", "process rung"):
            lines.append(f"| asyncpool, {key} | {h[key]:.2f} s | {h[key] / h['plain']:.2f}x |")
        lost_figures = await lost(cluster)
        lines += ["", "## the scheduler SIGKILLed mid-map over 400 items", "",
                  f"All 400 results correct: {lost_figures['correct']}; serving on local "
                  f"processes {lost_figures['local_after']:.2f} s after the kill "
                  "(dask_connect_timeout=2 s).", ""]
    finally:
        cluster.stop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dask_bench")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "DASK.md"))
    args = parser.parse_args(argv)
    text = asyncio.run(main_async())
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
