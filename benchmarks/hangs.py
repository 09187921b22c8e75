"""Figures for the never-hang, never-leak cases: ``python -m benchmarks.hangs``.

Each case runs in a fresh interpreter under a hard time limit and prints one figure
(a hang shows as "hung > N s"). Only the public API of run/map/imap and PoolConfig is
used, so the same script measures an older checkout for a before/after table (run it
from that checkout), and ``--before FILE`` puts that run's figures beside this one's.
Writes benchmarks/HANGS.md (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asyncpool import DeadlineExceeded, ResilientPool  # noqa: E402

from benchmarks import hang_tasks as tasks  # noqa: E402

LIMIT = 40.0


async def heartbeat(lags: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - before - 0.005)


async def slow_async(n: int, delay: float) -> Any:
    for i in range(n):
        await asyncio.sleep(delay)
        yield i


def slow_sync(n: int, delay: float) -> Any:
    for i in range(n):
        time.sleep(delay)
        yield i


def raising(n: int) -> Any:
    yield from range(n)
    raise ValueError("input broke")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def case_slots() -> str:
    async with ResilientPool(max_workers=2) as pool:
        for _ in range(100):
            try:
                await pool.map(tasks.square, raising(5))
            except ValueError:
                pass
        for _ in range(100):
            task = asyncio.ensure_future(pool.map(tasks.nap, [0.01] * 4))
            await asyncio.sleep(0.002)
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        started = time.monotonic()
        await pool.map(tasks.square, range(3), timeout=3)
        return f"answered in {time.monotonic() - started:.2f} s"


async def case_deadline_busy() -> str:
    async with ResilientPool(max_workers=2, chunk_size=1) as pool:
        busy = asyncio.ensure_future(pool.map(tasks.nap, [5.0] * 4))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        try:
            await pool.map(tasks.square, range(3), timeout=1)
        except DeadlineExceeded:
            pass
        took = time.monotonic() - started
        busy.cancel()
        return f"timeout=1 answered after {took:.2f} s"


async def case_deadline_rate() -> str:
    async with ResilientPool(max_workers=2, rate_limit=2) as pool:
        started = time.monotonic()
        try:
            await pool.map(tasks.square, range(20), timeout=1)
        except DeadlineExceeded:
            pass
        return f"timeout=1 answered after {time.monotonic() - started:.2f} s"


async def case_slow_async_partial() -> str:
    async with ResilientPool(max_workers=2) as pool:
        started = time.monotonic()
        try:
            await pool.map(tasks.square, slow_async(100, 0.3), timeout=1.2)
            return "no deadline"
        except DeadlineExceeded as exc:
            done = sum(1 for v in exc.partial if isinstance(v, int))
            return (f"answered after {time.monotonic() - started:.2f} s, "
                    f".partial holds {done} result(s)")


async def case_slow_sync() -> str:
    lags: list[float] = []
    beat = asyncio.ensure_future(heartbeat(lags))
    async with ResilientPool(max_workers=2) as pool:
        started = time.monotonic()
        first = None
        async for _ in pool.imap(tasks.square, slow_sync(60, 0.02)):
            if first is None:
                first = time.monotonic() - started
    beat.cancel()
    return f"loop blocked {max(lags) * 1000:.0f} ms at most; first result after {first:.2f} s"


async def case_async_source_streams() -> str:
    async with ResilientPool(max_workers=2) as pool:
        started = time.monotonic()
        got = 0
        async for _ in pool.imap(tasks.square, slow_async(50, 0.02)):
            got += 1
            if time.monotonic() - started > 1.0:
                break
        return f"{got} result(s) streamed in the first second (50 items/s in)"


async def case_close_after_hung(kill: bool) -> str:
    pool = ResilientPool(max_workers=2)
    await pool.__aenter__()
    pids = set(await pool.map(tasks.pid_of, range(20), chunk_size=1))
    try:
        await pool.run(tasks.nap, 1000, timeout=0.3)
    except (DeadlineExceeded, TimeoutError):
        pass
    started = time.monotonic()
    await pool.aclose(kill=kill)
    took = time.monotonic() - started
    await asyncio.sleep(1)
    return f"close took {took:.2f} s; {sum(alive(p) for p in pids)} worker(s) alive 1 s later"


async def case_parent_dies() -> str:
    script = ("import asyncio, os, signal, sys; sys.path.insert(0, {root!r})\n"
              "from asyncpool import ResilientPool\nfrom benchmarks import hang_tasks\n"
              "async def main():\n"
              "    pool = ResilientPool(max_workers=2, chunk_size=1)\n"
              "    await pool.__aenter__()\n"
              "    pids = set(await pool.map(hang_tasks.pid_of, range(8)))\n"
              "    asyncio.ensure_future(pool.map(hang_tasks.nap, [60.0] * 6))\n"
              "    await asyncio.sleep(0.5)\n"
              "    print(*pids, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "asyncio.run(main())\n").replace("{root!r}", repr(str(ROOT)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    pids = [int(p) for p in proc.stdout.split()]
    await asyncio.sleep(5)
    left = [p for p in pids if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return f"{len(left)} of {len(pids)} worker(s) alive 5 s after the parent's SIGKILL"


async def case_grandchild() -> str:
    note = tempfile.mktemp()
    async with ResilientPool(max_workers=1) as pool:
        try:
            await pool.run(tasks.spawn_sleeper, note, timeout=1.0, kill_on_timeout=True)
        except (DeadlineExceeded, TimeoutError):
            pass
    await asyncio.sleep(1)
    pid = int(Path(note).read_text())
    survived = alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    return "the grandchild survived" if survived else "the grandchild was killed"


async def case_exceptions() -> str:
    async with ResilientPool(max_workers=2) as pool:
        out = []
        for fn in (tasks.raise_two_args, tasks.exit_three):
            try:
                await pool.run(fn, 1)
            except BaseException as exc:
                out.append(f"{type(exc).__name__}: {str(exc)[:60]}")
        return "; ".join(out)


async def case_reuse_hung() -> str:
    async with ResilientPool(max_workers=2, reuse_workers=True) as first:
        try:
            await first.run(tasks.nap, 1000, timeout=0.2)
        except (DeadlineExceeded, TimeoutError):
            pass
    async with ResilientPool(max_workers=2, reuse_workers=True) as second:
        pids = set(await second.map(tasks.nap_pid, [0.05] * 8, chunk_size=1))
    started = time.monotonic()
    await asyncio.wait_for(ResilientPool.close_idle_workers(), 10)
    return (f"next pool served on {len(pids)} worker(s); close_idle_workers took "
            f"{time.monotonic() - started:.2f} s")


async def case_other_loop() -> str:
    async with ResilientPool(max_workers=2) as pool:
        def elsewhere() -> str:
            started = time.monotonic()
            try:
                asyncio.run(pool.map(tasks.square, [1, 2], timeout=3))
                return "answered"
            except BaseException as exc:
                return f"{type(exc).__name__} after {time.monotonic() - started:.2f} s"

        return await asyncio.get_running_loop().run_in_executor(None, elsewhere)


async def case_shm() -> str:
    before = set(os.listdir("/dev/shm"))
    pool = ResilientPool(max_workers=2)
    await pool.__aenter__()
    await pool.map(tasks.square, range(10))
    left = [n for n in set(os.listdir("/dev/shm")) - before if "asyncpool" in n]
    await pool.aclose()
    return f"{len(left)} /dev/shm entr(y/ies) per open pool"


async def case_large(direction: str) -> str:
    lags: list[float] = []
    async with ResilientPool(max_workers=2) as pool:
        await pool.run(tasks.square, 1)
        big = b"x" * (200 << 20) if direction == "argument" else None
        beat = asyncio.ensure_future(heartbeat(lags))
        await asyncio.sleep(0.05)
        lags.clear()
        if direction == "argument":
            await pool.run(len, big)
        else:
            await pool.run(tasks.make_bytes, 200 << 20)
        beat.cancel()
    return f"loop blocked {max(lags) * 1000:.0f} ms at most"


async def case_stream_bytes() -> str:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async with ResilientPool(max_workers=2) as pool:
        await pool.run(tasks.square, 1)
        base, peak, n = rss(), 0, 0
        async for _ in pool.imap(tasks.echo, (bytes([i % 256]) * 100_000
                                               for i in range(10_000))):
            n += 1
            if n % 200 == 0:
                peak = max(peak, rss() - base)
    return f"parent grew {peak >> 20} MB streaming 10,000 x 100 KB"


async def case_config() -> str:
    out = []
    for options in ({"start_timeout": float("inf")}, {"rate_limit": float("inf")},
                    {"warm_start": "no"}, {"task_retries": True}):
        try:
            async with ResilientPool(max_workers=1, **options) as pool:
                await pool.run(tasks.square, 2)
            out.append(f"{options}: accepted")
        except Exception as exc:
            out.append(f"{options}: {type(exc).__name__}")
    return "; ".join(out)


async def case_pickle_deadline() -> str:
    try:
        pickle.loads(pickle.dumps(DeadlineExceeded("x", [1])))
        return "pickles"
    except Exception as exc:
        return f"{type(exc).__name__}"


def case_trio_imap() -> str:
    import trio

    async def main() -> None:
        async with ResilientPool(max_workers=2) as pool:
            async for value in pool.imap(tasks.square, range(1000)):
                if value > 10:
                    break
            gc.collect()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trio.run(main)
        gc.collect()
    found = [w for w in caught if issubclass(w.category, ResourceWarning)]
    return f"{len(found)} ResourceWarning(s)"


async def case_storm() -> str:
    log = tempfile.mktemp()
    poison = set(range(7, 200, 20))
    async with ResilientPool(max_workers=2) as pool:
        results = await pool.map(tasks.note_or_die, [(i, log, i in poison) for i in range(200)],
                                 return_exceptions=True)
    runs = [int(x) for x in Path(log).read_text().split()]
    innocent = [i for i in runs if i not in poison]
    message = next(str(r) for r in results if isinstance(r, Exception))
    times = message.split(" time")[0].split()[-1]
    most = max(map(innocent.count, set(innocent)))
    return (f"{len(innocent)} runs for 190 innocent items (max {most} each); "
            f"a poison item's message says {times} crash(es)")


CASES: dict[str, Any] = {
    "1 slots after 100 raising inputs and 100 cancellations": case_slots,
    "2a deadline while every slot is busy": case_deadline_busy,
    "2b deadline under a rate limit": case_deadline_rate,
    "2c deadline with a slow async input": case_slow_async_partial,
    "3a slow sync input (20 ms per item)": case_slow_sync,
    "3b async input at 50 items/s": case_async_source_streams,
    "4a graceful close after a hung item timed out": lambda: case_close_after_hung(False),
    "4b aclose(kill=True) after a hung item timed out": lambda: case_close_after_hung(True),
    "5 parent SIGKILLed mid-map": case_parent_dies,
    "6 grandchild of a task killed on timeout": case_grandchild,
    "7/8 exception with 2 required args; sys.exit(3)": case_exceptions,
    "9 reuse_workers after a hung task": case_reuse_hung,
    "10 a pool used from a second event loop": case_other_loop,
    "11 /dev/shm entries of an open pool": case_shm,
    "12a 200 MB result": lambda: case_large("result"),
    "12b 200 MB argument": lambda: case_large("argument"),
    "12c streaming 10,000 items of 100 KB": case_stream_bytes,
    "13 config inf and wrong types": case_config,
    "14 DeadlineExceeded through pickle": case_pickle_deadline,
    "15 trio, leaving imap early": case_trio_imap,
    "16 crash storm (10 poison items among 200)": case_storm,
}


def run_case(name: str) -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.hangs", "--one", name],
                              capture_output=True, text=True, timeout=LIMIT, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"hung > {LIMIT:.0f} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:150]}"
    return str(json.loads(lines[-1]))


def _figures(path: Path) -> dict[str, str]:
    """The figures of a two-column HANGS.md, by case."""
    found = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("case", "---"):
            found[cells[0]] = cells[1]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hangs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "HANGS.md"))
    parser.add_argument("--before", metavar="FILE",
                        help="a HANGS.md written from an older checkout, shown beside")
    parser.add_argument("--before-label", default="before",
                        help="what to call that checkout in the table")
    args = parser.parse_args(argv)
    if args.one:
        case = CASES[args.one]
        result = case() if args.one.startswith("15") else asyncio.run(case())
        print(json.dumps(result))
        return 0
    before = _figures(Path(args.before)) if args.before else None
    rows = []
    for name in CASES:
        figure = run_case(name)
        print(f"{name:55} {figure}", flush=True)
        if before is None:
            rows.append(f"| {name} | {figure} |")
        else:
            rows.append(f"| {name} | {before.get(name, 'not measured')} | {figure} |")
    head = (["| case | figure |", "|---|---|"] if before is None else
            [f"| case | {args.before_label} | now |", "|---|---|---|"])
    text = "\n".join(["# Never hang, never leak: one figure per case", "",
                      f"Measured by `python -m benchmarks.hangs` on {time.strftime('%Y-%m-%d')} "
                      f"({ROOT.name}); each case in a fresh interpreter, limited to "
                      f"{LIMIT:.0f} s.", "", *head, *rows]) + "\n"
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
