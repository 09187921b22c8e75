"""Die mid-map (argument: SIGKILL or SIGTERM; then "forking" to die as another pool's
workers are being forked, or "stopped" to die with the fork server stopped) and print
the pids that must not outlive us: the workers, a grandchild and a grandchild in a
session of its own (and the fork server, when stopped)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from asyncpool._forkserver import ForkServer  # noqa: E402
from tests import tasks  # noqa: E402
from tests.helpers import wait_until  # noqa: E402


async def main(how: str, forking: bool, stopped: bool) -> None:
    note = tempfile.mktemp()
    pool = ResilientPool(max_workers=2, chunk_size=1)
    await pool.__aenter__()
    pids = set(await pool.map(tasks.pid_of, range(8)))
    # A grandchild in a session of its own: out of reach of its worker's group.
    session = tempfile.mktemp()
    pids.add(await pool.run(tasks.spawn_session_sleeper, session))
    os.unlink(session)
    asyncio.ensure_future(pool.map(tasks.nap, [60.0] * 6))
    asyncio.ensure_future(pool.run(tasks.spawn_sleeper, (note, 60.0)))
    await wait_until(lambda: os.path.exists(note) and bool(open(note).read()))
    if stopped:
        # SIGSTOP: it reads nothing, and so could not stop the workers when its
        # control socket closed (their death signal is tied to it, not to us).
        server = ForkServer.current()
        assert server is not None
        pids.add(server.process.pid)
        os.kill(server.process.pid, signal.SIGSTOP)
    print(*pids, open(note).read(), flush=True)
    os.unlink(note)
    if forking:
        # Its fork requests queue at the fork server, which then tells a parent that
        # is gone of each new worker (a BrokenPipeError killed it, before it stopped
        # the workers' groups: the grandchildren stayed).
        opening = asyncio.ensure_future(ResilientPool(max_workers=8).__aenter__())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not opening.done()
    os.kill(os.getpid(), getattr(signal, how))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:] == ["forking"], sys.argv[2:] == ["stopped"]))
