"""The functions every runner maps (module level, so every peer can pickle them)."""

from __future__ import annotations

import random
import time


def square(x: int) -> int:
    return x * x


def burn(seconds: float) -> float:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def echo_bytes(data: bytes) -> bytes:
    return data[::-1]


async def async_square(x: int) -> int:
    return x * x


async def async_burn(seconds: float) -> float:
    return burn(seconds)


async def async_echo_bytes(data: bytes) -> bytes:
    return data[::-1]


def skewed_durations(count: int = 400, seed: int = 20261128) -> list[float]:
    rng = random.Random(seed)
    durations = [0.001 + 0.049 * i / (count - 1) for i in range(count)]
    rng.shuffle(durations)
    return durations
