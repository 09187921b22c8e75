"""A thread rung whose only thread runs a timed-out call's item, no thread starting in
its place (as on a machine out of threads): the next call is served inline at once.
Run in an interpreter of its own (argument: asyncio | trio): under the test runner,
trio's guest mode itself needs new threads. Prints the next call's results and rung."""

from __future__ import annotations

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anyio  # noqa: E402

from asyncpool import DeadlineExceeded, ResilientPool  # noqa: E402
from tests import tasks  # noqa: E402

_start = threading.Thread.start
blocked = False


def start(thread: threading.Thread) -> None:
    if blocked:
        raise RuntimeError("can't start new thread")
    _start(thread)


threading.Thread.start = start  # type: ignore[method-assign]


async def main() -> None:
    global blocked
    async with ResilientPool(max_workers=1, rungs=("thread", "inline"),
                             promote_after=60) as pool:
        assert pool.backend == "thread"
        blocked = True
        try:
            await pool.run(tasks.nap, 3.0, timeout=0.3, kill_on_timeout=True)
        except DeadlineExceeded:
            pass
        print(await pool.map(tasks.square, range(3), timeout=2.0), pool.backend, flush=True)
        blocked = False


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
