"""The demo job: count primes in blocks of integers (CPU-bound, built-in data)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from ._options import Progress
from ._pool import ResilientPool


def count_primes(block: tuple[int, int]) -> int:
    """Primes in [start, stop), by trial division: pure CPU work."""
    start, stop = block
    found = 0
    for n in range(max(start, 2), stop):
        if n % 2 == 0:
            found += n == 2
            continue
        for d in range(3, math.isqrt(n) + 1, 2):
            if n % d == 0:
                break
        else:
            found += 1
    return found


async def run_demo(limit: int = 2_000_000, block: int = 10_000,
                   progress: Progress = True, **options: Any) -> dict[str, Any]:
    blocks = [(lo, min(lo + block, limit)) for lo in range(0, limit, block)]
    started = time.perf_counter()
    async with ResilientPool(**options) as pool:
        counts = await pool.map(count_primes, blocks, progress=progress)
        rung = pool.backend
        stats = asdict(pool.statistics())
    return {"primes": sum(counts), "limit": limit, "blocks": len(blocks), "rung": rung,
            "seconds": time.perf_counter() - started, "statistics": stats}
