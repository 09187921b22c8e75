"""An initializer that kills its worker: opening the pool must fail, not run it here."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import InitializerFailed, ResilientPool  # noqa: E402


def die() -> None:
    os._exit(7)


async def main() -> None:
    try:
        async with ResilientPool(max_workers=2, initializer=die, backoff_initial=0.01):
            print("opened (wrong)")
    except InitializerFailed as exc:
        print("InitializerFailed:", exc)


if __name__ == "__main__":
    asyncio.run(main())
