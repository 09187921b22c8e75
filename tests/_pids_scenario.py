"""Run inside a pids cgroup: map under the limit, lift it, wait for the climb back.

Usage: python _pids_scenario.py CGROUP_DIR EXTRA  (prints one JSON line)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests.tasks import square  # noqa: E402


async def main(cgroup: str, extra: int) -> dict[str, object]:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(cgroup, "pids.current")) as f:
        current = int(f.read())
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write(str(current + extra))
    out: dict[str, object] = {"extra": extra, "pids_at_start": current}
    async with ResilientPool(max_workers=2, backoff_initial=0.02, creation_attempts=2,
                             promote_after=0.2, promote_max=1.0) as pool:
        out["rung"] = pool.backend
        results = await pool.map(square, range(5000))
        out["correct"] = results == [i * i for i in range(5000)]
        with open(os.path.join(cgroup, "pids.max"), "w") as f:
            f.write("max")
        lifted = time.monotonic()
        while pool.backend != "process" and time.monotonic() - lifted < 60:
            await asyncio.sleep(0.02)
        out["climb_seconds"] = round(time.monotonic() - lifted, 3)
        out["after_lift"] = pool.backend
        results = await pool.map(square, range(5000))
        out["correct_after"] = results == [i * i for i in range(5000)]
        out["stats"] = dataclasses.asdict(pool.statistics())
    return out


if __name__ == "__main__":
    started = time.monotonic()
    result = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result, default=str), flush=True)
