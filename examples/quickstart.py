"""Quickstart: a CPU-bound map, a single call and a stream, from asyncio."""

import asyncio

from asyncpool import ResilientPool


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


async def main() -> None:
    async with ResilientPool() as pool:
        steps = await pool.map(collatz_steps, range(1, 200_001))
        print(f"longest Collatz chain below 200,000: {max(steps)} steps "
              f"(start {steps.index(max(steps)) + 1})")
        print("one call:", await pool.run(collatz_steps, 27))
        total = 0
        async for value in pool.imap(collatz_steps, (n for n in range(1, 50_001))):
            total += value
        print("streamed sum:", total)
        print("served by:", pool.backend)
        print(pool.statistics())


if __name__ == "__main__":
    asyncio.run(main())
