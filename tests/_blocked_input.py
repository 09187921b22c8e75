"""A synchronous input that blocks for good: the call times out and the interpreter
still exits (the thread pulling the input must not hold it)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import DeadlineExceeded, ResilientPool  # noqa: E402
from tests.tasks import square  # noqa: E402


def blocked() -> object:
    for i in range(3):
        time.sleep(0.01)
        yield i
    threading.Event().wait()


async def main() -> None:
    async with ResilientPool(max_workers=2) as pool:
        try:
            await pool.map(square, blocked(), timeout=1)
        except DeadlineExceeded as exc:
            print("DeadlineExceeded", exc.partial, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
