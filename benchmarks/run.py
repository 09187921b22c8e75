"""Measure asyncpool beside its peers, side by side in one run.

    python -m benchmarks            # every peer, full workloads (about 10 minutes)
    python -m benchmarks --quick    # asyncpool, stdlib and joblib, small workloads (< 1 min)

Every measurement runs in a fresh interpreter (so nobody's pool is warm from an earlier
one), peers alternate within each repetition, and the median of the repetitions is kept.
Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import peers, workloads  # noqa: E402

QUICK_PEERS = ["asyncpool", "asyncpool warm_start", "stdlib ProcessPoolExecutor.map",
               "joblib Parallel"]


def workers() -> int:
    return len(os.sched_getaffinity(0))


def spec(workload: str, quick: bool, peer: str) -> dict[str, Any]:
    """Items, functions, the tuned chunksize for chunked peers, and how to score."""
    w = workers()
    if workload == "tiny":
        n = 200_000
        if peer in peers.PER_ITEM:
            n = 2_000 if quick else 5_000
        return dict(fn=workloads.square, afn=workloads.async_square, items=list(range(n)),
                    chunksize=4096, expect=[i * i for i in range(n)], unit="items/s",
                    score=lambda wall: n / wall)
    if workload == "medium":
        n = 200 if quick else 1_000
        items = [0.005] * n
        return dict(fn=workloads.burn, afn=workloads.async_burn, items=items,
                    chunksize=max(1, n // (8 * w)), expect=items, unit="efficiency",
                    score=lambda wall: sum(items) / w / wall)
    if workload == "skewed":
        items = workloads.skewed_durations(100 if quick else 400)
        return dict(fn=workloads.burn, afn=workloads.async_burn, items=items, chunksize=1,
                    expect=items, unit="efficiency",
                    score=lambda wall: sum(items) / w / wall)
    if workload == "payload":
        n = 400 if quick else 2_000
        blob = bytes(range(256)) * 400  # 100 KB
        # Distinct objects: with one shared object, pickle's memo would send it once per
        # chunk and reward big chunks for a copy they never make.
        items = [blob[:-2] + i.to_bytes(2, "little") for i in range(n)]
        return dict(fn=workloads.echo_bytes, afn=workloads.async_echo_bytes, items=items,
                    chunksize=max(1, n // (8 * w)), expect=[x[::-1] for x in items],
                    unit="MB/s (in+out)",
                    score=lambda wall: 2 * n * len(blob) / 1e6 / wall)
    if workload == "stream":
        n = 200_000 if quick else 2_000_000
        return dict(fn=workloads.square, afn=workloads.async_square,
                    items=(i for i in range(n)), chunksize=4096, stream=True,
                    expect=sum(i * i for i in range(n)), unit="MB peak RSS growth",
                    score=None)
    raise ValueError(workload)


async def _heartbeat(lags: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - before - 0.005)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(peer: str, workload: str, quick: bool) -> dict[str, Any]:
    if workload == "latency":
        return await measure_latency(peer)
    s = spec(workload, quick, peer)
    runner = peers.PEERS[peer]
    peers.preload(peer)
    lags: list[float] = []
    rss_before = _rss_mb()
    beat = asyncio.ensure_future(_heartbeat(lags))
    await asyncio.sleep(0.02)
    lags.clear()
    started = time.perf_counter()
    result = await runner(s["fn"], s["afn"], s["items"], workers(), s["chunksize"],
                          stream=s.get("stream", False))
    wall = time.perf_counter() - started
    await asyncio.sleep(0.006)
    beat.cancel()
    await peers.close_async()
    peers.close_all()
    if s["expect"] is not None and result != s["expect"]:
        raise AssertionError(f"{peer} gave wrong results on {workload}")
    lags.sort()
    value = s["score"](wall) if s["score"] else _rss_mb() - rss_before
    return {"value": value, "unit": s["unit"], "wall": wall,
            "lag_max": lags[-1] if lags else wall,
            "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else wall}


async def measure_latency(peer: str) -> dict[str, Any]:
    """Seconds from opening a pool to its first result: cold, then a second pool (warm)."""
    import concurrent.futures as cf

    peers.preload(peer)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        if peer.startswith("asyncpool"):
            from asyncpool import ResilientPool

            async with ResilientPool(max_workers=workers(),
                                     warm_start=peer.endswith("warm_start"),
                                     reuse_workers=peer.endswith("reuse_workers")) as pool:
                await pool.run(workloads.square, 3)
                times.append(time.perf_counter() - started)
        elif peer == "stdlib ProcessPoolExecutor.map":
            with cf.ProcessPoolExecutor(workers()) as ex:
                ex.submit(workloads.square, 3).result()
                times.append(time.perf_counter() - started)
        elif peer == "loky executor.map":
            import loky

            ex = loky.ProcessPoolExecutor(workers())
            ex.submit(workloads.square, 3).result()
            times.append(time.perf_counter() - started)
            ex.shutdown()
        elif peer == "joblib Parallel":
            from joblib import Parallel, delayed

            Parallel(n_jobs=workers())([delayed(workloads.square)(3)])
            times.append(time.perf_counter() - started)
        else:
            raise NotImplementedError
    return {"value": times[0], "warm": times[1], "unit": "s to first result"}


LATENCY_PEERS = ["asyncpool", "asyncpool warm_start", "asyncpool reuse_workers",
                 "stdlib ProcessPoolExecutor.map",
                 "loky executor.map", "joblib Parallel"]
WORKLOADS = ["tiny", "medium", "skewed", "payload", "stream", "latency"]


def peers_for(workload: str, quick: bool) -> list[str]:
    chosen = QUICK_PEERS if quick else list(peers.PEERS)
    if workload == "latency":
        return [p for p in LATENCY_PEERS if p in chosen or p == "asyncpool reuse_workers"]
    if workload == "stream":
        return [p for p in chosen if p.startswith("asyncpool")
                or p == "stdlib ProcessPoolExecutor.map"]
    return chosen


def run_one(peer: str, workload: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", peer, workload]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 600 s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": last[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _versions() -> str:
    names = ["asyncpool", "loky", "anyio", "joblib", "pebble", "aiomultiprocess", "cloudpickle"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _fmt(value: float, unit: str) -> str:
    if unit == "items/s":
        return f"{value:,.0f}"
    if unit == "efficiency":
        return f"{value:.3f}"
    if unit.startswith("s"):
        return f"{value * 1000:.0f} ms"
    return f"{value:,.1f}"


def report(results: dict[str, dict[str, list[dict[str, Any]]]], quick: bool,
           reps: int, seconds: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `python -m benchmarks{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {workers()} cores, Python "
        f"{platform.python_version()}, {platform.machine()}; {_versions()}.",
        f"Median of {reps} runs each; peers alternate within each run; every measurement "
        "in a fresh interpreter with pool start-up included (closing is not timed). "
        f"The whole run took {seconds:.0f} s.",
        "",
        *(["Quick mode: smaller workloads (medium 200 tasks, skewed 100, payload 400, "
            "stream 200,000 items; per-item peers get 2,000 tiny items), so the section "
            "titles' sizes do not apply.", ""] if quick else []),
        "Heartbeat lag is how late a 5 ms `asyncio.sleep` woke up on the calling event "
        "loop during the workload: a blocking API (joblib, `Executor.map`) holds the loop "
        "for the whole run.",
        "",
    ]
    titles = {
        "tiny": "tiny: 200,000 calls of `x*x` (items/s, higher is better; per-item peers "
                "run a 5,000-item slice)",
        "medium": "medium: 1,000 tasks of 5 ms CPU (efficiency = ideal / wall, higher is better)",
        "skewed": "skewed: 400 tasks of 1-50 ms in random order (efficiency)",
        "payload": "payload: 2,000 tasks taking and returning 100 KB (MB/s in+out)",
        "stream": "stream: 2 million lazy items through imap / Executor.map "
                  "(parent's peak RSS growth, MB, lower is better)",
        "latency": "latency: seconds to first result, cold pool and a second pool right after",
    }
    for workload, by_peer in results.items():
        lines += [f"## {titles[workload]}", ""]
        base = _median(by_peer.get("asyncpool", []), "value")
        if workload == "latency":
            lines += ["| peer | cold | warm (second pool) |", "|---|---|---|"]
        else:
            lines += ["| peer | median | asyncpool / peer | lag max | lag p99 |",
                      "|---|---|---|---|---|"]
        for peer, runs in by_peer.items():
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                lines.append(f"| {peer} | failed: {errors[0]} | | | |")
                continue
            unit = runs[0]["unit"]
            value = _median(runs, "value")
            if workload == "latency":
                lines.append(f"| {peer} | {value * 1000:.0f} ms | "
                             f"{_median(runs, 'warm') * 1000:.0f} ms |")
                continue
            if base is None or not value:
                ratio = ""
            elif workload == "stream":
                ratio = f"peer grows {value / base:.2f}x as much" if base else ""
            else:
                ratio = f"{base / value:.2f}x"
            lines.append(f"| {peer} | {_fmt(value, unit)} | {ratio} | "
                         f"{_median(runs, 'lag_max') * 1000:.0f} ms | "
                         f"{_median(runs, 'lag_p99') * 1000:.1f} ms |")
        lines.append("")
    return "\n".join(lines)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r and r[key] is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small workloads, few peers")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="workloads to run")
    parser.add_argument("--one", nargs=2, metavar=("PEER", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None,
                        help="default: benchmarks/RESULTS.md (RESULTS-quick.md with --quick)")
    args = parser.parse_args(argv)
    if args.output is None:
        name = "RESULTS-quick.md" if args.quick else "RESULTS.md"
        args.output = str(ROOT / "benchmarks" / name)
    if args.one:
        print(json.dumps(asyncio.run(measure(args.one[0], args.one[1], args.quick))))
        return 0
    # As an installed package would be: compiled once, not on each fresh interpreter
    # (this machine sets PYTHONDONTWRITEBYTECODE).
    import compileall

    compileall.compile_dir(str(ROOT / "asyncpool"), quiet=1)
    started = time.perf_counter()
    chosen = args.only or WORKLOADS
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in chosen}
    for rep in range(args.reps):
        for workload in chosen:
            order = peers_for(workload, args.quick)
            # Alternate: each repetition starts from a different peer.
            order = order[rep % len(order):] + order[: rep % len(order)]
            for peer in order:
                outcome = run_one(peer, workload, args.quick)
                results[workload].setdefault(peer, []).append(outcome)
                shown = outcome.get("error") or f"{outcome['value']:.4g} {outcome['unit']}"
                print(f"[{rep + 1}/{args.reps}] {workload:8} {peer:34} {shown}", flush=True)
    for workload in chosen:  # a stable row order
        results[workload] = {p: results[workload][p] for p in peers_for(workload, args.quick)
                             if p in results[workload]}
    text = report(results, args.quick, args.reps, time.perf_counter() - started)
    Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
