"""Run inside a cgroup made by test_cgroups.py; prints one JSON line.

    python _cgroup_scenario.py pids CGROUP EXTRA   map under a pids limit, lift it,
                                                   wait for the climb back
    python _cgroup_scenario.py memory CGROUP       a poison item that the OOM killer
                                                   kills, among good ones
    python _cgroup_scenario.py only CGROUP [warm]  a ladder of processes only, with no
                                                   pid left, then the limit lifted
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import PoolUnavailable, ResilientPool, WorkerCrashed  # noqa: E402
from tests.tasks import hog_on, square  # noqa: E402


def enter(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _tasks(cgroup: str) -> int:
    with open(os.path.join(cgroup, "pids.current")) as f:
        return int(f.read())


async def pids(cgroup: str, extra: int) -> dict[str, object]:
    enter(cgroup)
    with open(os.path.join(cgroup, "pids.current")) as f:
        current = int(f.read())
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write(str(current + extra))
    out: dict[str, object] = {"extra": extra, "pids_at_start": current}
    async with ResilientPool(max_workers=2, backoff_initial=0.02, creation_attempts=2,
                             promote_after=0.2, promote_max=1.0) as pool:
        out["rung"] = pool.backend
        out["workers"] = pool.statistics().workers
        results = await pool.map(square, range(5000))
        out["correct"] = results == [i * i for i in range(5000)]
        with open(os.path.join(cgroup, "pids.max"), "w") as f:
            f.write("max")
        lifted = time.monotonic()
        while (pool.backend != "process" or pool.statistics().workers < 2) and (
                time.monotonic() - lifted < 60):
            await asyncio.sleep(0.02)
        out["climb_seconds"] = round(time.monotonic() - lifted, 3)
        out["after_lift"] = pool.backend
        out["workers_after"] = pool.statistics().workers
        results = await pool.map(square, range(5000))
        out["correct_after"] = results == [i * i for i in range(5000)]
        out["stats"] = dataclasses.asdict(pool.statistics())
    return out


async def only(cgroup: str, warm: bool) -> dict[str, object]:
    enter(cgroup)
    if warm:  # the fork server runs already: it is what fails to fork
        async with ResilientPool(max_workers=1, rungs=("process",)) as pool:
            await pool.run(square, 2)
        # Its worker left at end-of-file, and counts until the fork server reaps it:
        # read before, the limit let one more fork through (it opened short of one).
        deadline = time.monotonic() + 10
        while _tasks(cgroup) > len(os.listdir("/proc/self/task")) + 1 and (
                time.monotonic() < deadline):
            await asyncio.sleep(0.01)
    current = _tasks(cgroup)
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write(str(current))
    out: dict[str, object] = {}
    try:
        async with ResilientPool(max_workers=2, rungs=("process",), backoff_initial=0.02,
                                 creation_attempts=2):
            out["error"] = None
    except PoolUnavailable as exc:
        out["error"] = type(exc).__name__
        out["cause"] = type(exc.__cause__).__name__
        out["message"] = str(exc)
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write("max")
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        out["after"] = await pool.map(square, range(10)) == [i * i for i in range(10)]
    return out


async def memory(cgroup: str) -> dict[str, object]:
    enter(cgroup)
    poison = 37
    async with ResilientPool(max_workers=2) as pool:
        results = await pool.map(hog_on, [(i, poison) for i in range(100)], chunk_size=10,
                                 return_exceptions=True)
        crashed = [i for i, r in enumerate(results) if isinstance(r, WorkerCrashed)]
        return {"crashed": crashed, "exitcode": getattr(results[poison], "exitcode", None),
                "others_ok": [r for i, r in enumerate(results) if i != poison]
                == [i for i in range(100) if i != poison],
                "after": await pool.map(square, range(10)) == [i * i for i in range(10)],
                "stats": dataclasses.asdict(pool.statistics())}


if __name__ == "__main__":
    started = time.monotonic()
    if sys.argv[1] == "pids":
        result = asyncio.run(pids(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "only":
        result = asyncio.run(only(sys.argv[2], sys.argv[3:] == ["warm"]))
    else:
        result = asyncio.run(memory(sys.argv[2]))
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result, default=str), flush=True)
