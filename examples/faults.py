"""Watch the ladder degrade and climb back, and a worker crash lose nothing.

As root with a writable pids cgroup, this process puts itself under a real pids limit
(no new thread or process allowed), so the pool starts on the inline rung; lifting the
limit lets it climb back to processes. Elsewhere it makes thread starts fail instead
(the process rung needs no thread, so that demo uses a ladder of threads), and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from asyncpool import PoolEvent, ResilientPool


def square(x: int) -> int:
    return x * x


def die_once(args: tuple[int, str]) -> int:
    """SIGKILL the worker the first time item 0 runs (like the OOM killer would)."""
    x, marker = args
    if x == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def limit_with_cgroup() -> tuple[str, Callable[[], None]] | None:
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        group = root / f"asyncpool-example-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
        except OSError:
            continue
        if not (group / "pids.max").exists():
            group.rmdir()
            continue
        (group / "cgroup.procs").write_text(str(os.getpid()))
        current = int((group / "pids.current").read_text())
        (group / "pids.max").write_text(str(current))

        def lift(group: Path = group) -> None:
            (group / "pids.max").write_text("max")

        def cleanup(group: Path = group, root: Path = root) -> None:
            # Children started under the limit (the fork server) are in the group
            # too: move everyone back before removing it.
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    (root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            group.rmdir()

        import atexit

        atexit.register(cleanup)
        return f"a real pids limit ({group}, pids.max={current})", lift
    return None


def limit_with_failing_thread_starts() -> tuple[str, Callable[[], None]]:
    original = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    threading.Thread.start = refuse  # type: ignore[method-assign]

    def lift() -> None:
        threading.Thread.start = original  # type: ignore[method-assign]

    return ("failing thread starts (no writable pids cgroup here, so the fault is "
            "simulated in this process, on a ladder of threads: worker processes need "
            "no thread)"), lift


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  log %(levelname)s: %(message)s")

    def on_event(event: PoolEvent) -> None:
        print(f"  event {event.kind}: {event.message}")

    cgroup = limit_with_cgroup()
    how, lift = cgroup or limit_with_failing_thread_starts()
    top = "process" if cgroup else "thread"
    print(f"exhausting the machine with {how}")
    async with ResilientPool(max_workers=2, backoff_initial=0.05, creation_attempts=2,
                             promote_after=0.5, on_event=on_event,
                             rungs=("process", "thread", "inline") if cgroup
                             else ("thread", "inline")) as pool:
        print(f"pool opened on the {pool.backend!r} rung")
        results = await pool.map(square, range(10_000))
        correct = results == [i * i for i in range(10_000)]
        print(f"map of 10,000 items on {pool.backend!r}: correct={correct}")
        lift()
        lifted = time.monotonic()
        print("limit lifted; waiting for the pool to climb back")
        while pool.backend != top:
            await asyncio.sleep(0.05)
        print(f"back on {pool.backend!r} after {time.monotonic() - lifted:.2f} s")
    async with ResilientPool(max_workers=2, on_event=on_event) as pool:
        with tempfile.TemporaryDirectory() as tmp:
            marker = os.path.join(tmp, "killed")
            results = await pool.map(die_once, [(i, marker) for i in range(2_000)])
        print(f"map of 2,000 items with a worker SIGKILLed mid-way: all correct="
              f"{results == [i * i for i in range(2_000)]}")
        print(pool.statistics())


if __name__ == "__main__":
    asyncio.run(main())
