"""A pool whose tasks print, run by a session leader on a terminal with ``tostop`` set
(a background job that writes to it is stopped). Prints what the terminal showed and
the child's exit code."""

from __future__ import annotations

import os
import pty
import select
import sys
import termios
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = f"""
import sys
sys.path.insert(0, {ROOT!r})
import asyncio
from asyncpool import ResilientPool
from tests import tasks

async def main():
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.say, range(6), chunk_size=1)
    print("DONE", flush=True)

asyncio.run(main())
"""

pid, fd = pty.fork()
if pid == 0:
    attributes = termios.tcgetattr(0)
    attributes[3] |= termios.TOSTOP
    termios.tcsetattr(0, termios.TCSANOW, attributes)
    os.execv(sys.executable, [sys.executable, "-c", CODE])
shown, deadline = b"", time.monotonic() + 60
while time.monotonic() < deadline:
    if select.select([fd], [], [], 0.1)[0]:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        shown += data
else:
    os.kill(pid, 9)
_, status = os.waitpid(pid, 0)
print(shown.decode(errors="replace"))
print("exit", os.waitstatus_to_exitcode(status))
