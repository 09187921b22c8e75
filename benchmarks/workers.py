"""Worker lifecycle figures: ``python -m benchmarks.workers``.

Each figure in a fresh interpreter: the initializer, recycling after N tasks, the
memory ceiling, memory while streaming 2 million strings, closing after a cancel, a
cold pool's first result, and 200,000 tiny items through a cold pool beside the
stdlib's ``ProcessPoolExecutor.map(chunksize=4096)``. Writes benchmarks/WORKERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import hang_tasks as tasks  # noqa: E402
from benchmarks.workloads import square  # noqa: E402

STATE: dict[str, Any] = {}


def init(tag: str) -> None:
    STATE["tag"] = tag
    STATE["runs"] = STATE.get("runs", 0) + 1


def seen(_: object) -> tuple[Any, Any, int]:
    return STATE.get("tag"), STATE.get("runs"), os.getpid()


def leak(mb: int) -> tuple[int, int]:
    STATE.setdefault("held", []).append(bytearray(mb << 20))
    with open("/proc/self/statm") as f:
        return os.getpid(), int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def initializer() -> str:
    from asyncpool import ResilientPool

    async with ResilientPool(max_workers=2, initializer=init, initargs=("hello",)) as pool:
        before = await pool.map(seen, range(200), chunk_size=1)
        os.kill(before[0][2], signal.SIGKILL)
        after = await pool.map(seen, range(200), chunk_size=1)
    ok = all(t == "hello" and r == 1 for t, r, _ in before + after)
    return (f"200 items saw the state on {len({p for *_, p in before})} workers, "
            f"{len({p for *_, p in after})} after a SIGKILL; set once per worker: {ok}")


async def recycling() -> str:
    from asyncpool import ResilientPool

    async with ResilientPool(max_workers=2, max_tasks_per_worker=100) as pool:
        pids = await pool.map(tasks.pid_of, range(1000), chunk_size=10)
    return f"{len(set(pids))} distinct worker pids for 1,000 items, all {len(pids)} returned"


async def ceiling() -> str:
    from asyncpool import ResilientPool

    async with ResilientPool(max_workers=2, max_worker_memory=200 << 20) as pool:
        got = await pool.map(leak, [40] * 30, chunk_size=5)
    return (f"30 items leaking 40 MiB: {len(got)} results, {len({p for p, _ in got})} "
            f"workers, highest worker RSS {max(r for _, r in got) >> 20} MiB")


async def streaming() -> str:
    from asyncpool import ResilientPool

    async with ResilientPool(max_workers=2) as pool:
        await pool.run(square, 1)
        base, peak, n = rss_mb(), 0.0, 0
        items = ("x" * 96 + f"{i:04d}"[-4:] for i in range(2_000_000))
        async for _ in pool.imap(tasks.echo, items):
            n += 1
            if n % 20_000 == 0:
                peak = max(peak, rss_mb() - base)
    return f"imap over 2,000,000 strings of 100 bytes: the parent grew {peak:.0f} MB"


async def cancel_then_close() -> str:
    from asyncpool import ResilientPool

    pool = ResilientPool(max_workers=2, chunk_size=1)
    await pool.__aenter__()
    await pool.map(square, range(4))
    task = asyncio.ensure_future(pool.map(tasks.nap, [3.0] * 8))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await pool.aclose()
    return (f"close returned {time.monotonic() - started:.2f} s after cancelling 8 x 3 s "
            "items on 2 workers at 1 s")


async def first_result() -> str:
    from asyncpool import ResilientPool

    started = time.perf_counter()
    async with ResilientPool(max_workers=2) as pool:
        await pool.run(square, 3)
        cold = time.perf_counter() - started
    started = time.perf_counter()
    async with ResilientPool(max_workers=2) as pool:
        await pool.run(square, 3)
        second = time.perf_counter() - started
    return f"{cold * 1000:.1f} {second * 1000:.1f}"


async def tiny_asyncpool() -> str:
    from asyncpool import ResilientPool

    started = time.perf_counter()
    async with ResilientPool(max_workers=2) as pool:
        out = await pool.map(square, range(200_000))
        wall = time.perf_counter() - started
    assert out == [i * i for i in range(200_000)]
    return f"{200_000 / wall:.0f}"


async def tiny_stdlib() -> str:
    import concurrent.futures as cf

    started = time.perf_counter()
    with cf.ProcessPoolExecutor(2) as ex:
        out = list(ex.map(square, range(200_000), chunksize=4096))
        wall = time.perf_counter() - started
    assert out == [i * i for i in range(200_000)]
    return f"{200_000 / wall:.0f}"


CASES = {"initializer": initializer, "max_tasks_per_worker=100": recycling,
         "max_worker_memory=200 MiB": ceiling, "streaming 2M strings": streaming,
         "cancel then close": cancel_then_close}


def one(name: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.workers", "--one", name],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return str(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "WORKERS.md"))
    args = parser.parse_args(argv)
    runners = {**CASES, "first result": first_result, "tiny asyncpool": tiny_asyncpool,
               "tiny stdlib": tiny_stdlib}
    if args.one:
        print(json.dumps(asyncio.run(runners[args.one]())))
        return 0
    import compileall

    compileall.compile_dir(str(ROOT / "asyncpool"), quiet=1)
    rows = []
    for name in CASES:
        figure = one(name)
        print(f"{name:28} {figure}", flush=True)
        rows.append(f"| {name} | {figure} |")
    firsts = [[float(ms) for ms in one("first result").split()] for _ in range(args.reps)]
    cold, second = (statistics.median(f[i] for f in firsts) for i in (0, 1))
    figure = (f"{cold:.0f} ms, median of {args.reps} fresh interpreters "
              f"({', '.join(f'{f[0]:.0f}' for f in firsts)}; a second pool: {second:.0f} ms)")
    print(f"{'first result':28} {figure}", flush=True)
    rows.append(f"| a new pool's first result | {figure} |")
    tiny: dict[str, list[float]] = {"tiny asyncpool": [], "tiny stdlib": []}
    for rep in range(args.reps):
        for name in (list(tiny) if rep % 2 == 0 else list(reversed(tiny))):
            tiny[name].append(float(one(name)))
    a, s = (statistics.median(tiny[n]) for n in tiny)
    rows.append(f"| 200,000 tiny items, cold pool included | asyncpool {a:,.0f} items/s, "
                f"stdlib map(chunksize=4096) {s:,.0f} items/s: {a / s:.2f}x |")
    text = "\n".join(["# Worker lifecycle", "",
                      f"Measured by `python -m benchmarks.workers` on "
                      f"{time.strftime('%Y-%m-%d')}, 2 workers, each figure in a fresh "
                      f"interpreter (the first result and the tiny workload: median of "
                      f"{args.reps}).", "",
                      "| what | figure |", "|---|---|", *rows]) + "\n"
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
