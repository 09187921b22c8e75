"""Stream a large lazy input through the pool with a progress bar, then call a
rate-limited stage (as for a service that allows 100 requests per second)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator

from asyncpool import ResilientPool


def records(count: int) -> Iterator[bytes]:
    """A lazy source: never held in memory at once."""
    for i in range(count):
        yield f"record-{i:09d}".encode()


def fingerprint(record: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(record, digest_size=8).digest(), "big")


def call_service(x: int) -> int:
    """Stands in for a call to a service that allows 100 requests per second."""
    return x % 97


async def main(count: int = 1_000_000) -> None:
    async with ResilientPool() as pool:
        started = time.perf_counter()
        smallest = None
        async for value in pool.imap(fingerprint, records(count), progress=True):
            smallest = value if smallest is None else min(smallest, value)
        seconds = time.perf_counter() - started
        print(f"streamed {count:,} records in {seconds:.2f} s "
              f"({count / seconds:,.0f} records/s); smallest fingerprint {smallest}")

        started = time.perf_counter()
        answers = await pool.map(call_service, range(150), rate_limit=100, progress=True)
        seconds = time.perf_counter() - started
        print(f"{len(answers)} rate-limited calls at <= 100/s took {seconds:.2f} s")
        print(pool.statistics())


if __name__ == "__main__":
    asyncio.run(main())
