"""Globals of the main script, as workers see them: a plain value or a function
follows the caller's latest, state an initializer built stays (prints one line per
check)."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import operator
import pickle
import os
import sys
import time
from collections.abc import AsyncIterator, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests import tasks  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

SCALE = 1
STATE: dict[str, str] = {}
MODEL: int | None = None
RATE = math.nan
COMBINE = operator.add
CODEC = json
CONFIG: dict[str, str] | None = None


def init() -> None:
    global MODEL, RATE
    STATE["tag"] = "hello"
    MODEL = 42
    RATE = 0.5


def model(_: int) -> int | None:
    return MODEL


class Reader:
    def read(self, _: int) -> str:
        return STATE.get("tag", "missing")


def read_through_a_class(x: int) -> str:
    return Reader().read(x)


class Child(Reader):
    @property
    def model(self) -> int | None:
        return MODEL


class Caller:
    def __call__(self, x: int) -> str:
        return f"{Child().read(x)}-{Child().model}-{RATE}"


def scaled(_: int) -> int:
    return SCALE


def tag(_: int) -> str:
    return STATE.get("tag", "missing")


def helper(x: int) -> int:
    return x + 1


def names(_: int) -> str:
    return f"{COMBINE(2, 3)}-{CODEC.__name__}-{CONFIG}"


def via_helper(x: int) -> int:
    return helper(x)


def slowly_via_helper(x: int) -> int:
    time.sleep(0.05)
    return helper(x)


@functools.lru_cache(maxsize=64)
def cached_square(x: int) -> int:
    return x * x * SCALE


@functools.cache
def fib(n: int) -> int:  # reaches itself, cached, through the script's globals
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def refuse(x: int) -> int:
    raise LookupError(x)


class Fib:
    @functools.lru_cache(maxsize=128)  # noqa: B019 - a script's, as users write them
    def of(self, n: int) -> int:
        return n if n < 2 else self.of(n - 1) + self.of(n - 2)


def labelled(x: int) -> tuple[str, object]:
    return ("plain", x)


def decorate(fn: Callable[[int], object]) -> Callable[[int], tuple[str, object]]:
    def wrapper(x: int) -> tuple[str, object]:  # no functools.wraps
        return ("decorated", fn(x))

    return wrapper


undecorated = labelled
labelled = decorate(labelled)  # type: ignore[assignment]


def slowly_labelled(x: int) -> object:
    time.sleep(0.01)
    return labelled(x)


def make_helper() -> Callable[[int], int]:
    def helper(x: int) -> int:  # named as the script's global, and not it
        return -1

    return helper


async def slow_input() -> AsyncIterator[int]:
    await asyncio.sleep(0.3)
    yield 0


async def main() -> None:
    global SCALE, helper, COMBINE, CODEC, CONFIG
    async with ResilientPool(max_workers=2, initializer=init) as pool:
        print(await pool.run(scaled, 0))
        SCALE = 10
        values = await pool.map(scaled, range(12), chunk_size=1)
        print(values[0])
        print(min(values))  # every worker, not only one of them
        tags = set(await pool.map(tag, range(12), chunk_size=1))
        print(*tags)
        # What the initializer set stays while the caller's value does not change (each
        # task's pickle brought the caller's None back).
        print(*set(await pool.map(model, range(12), chunk_size=1)))
        # A class's methods (called by a function, or given as the function) see the
        # shared globals too: they saw their own copy, without the initializer's tag.
        print(*set(await pool.map(read_through_a_class, range(12), chunk_size=1)))
        print(*set(await pool.map(Reader().read, range(12), chunk_size=1)))
        # An inherited method, a property, a callable object, a NaN (never equal to
        # the one the previous pickle brought, it was taken for a change).
        print(*set(await pool.map(Caller(), range(12), chunk_size=1)))
        print(await pool.run(via_helper, 0))

        def helper(x: int) -> int:  # redefined, as in a notebook: it follows too
            return x + 100

        print(*set(await pool.map(via_helper, [0] * 12, chunk_size=1)))
        # A partial's subclass around a function of the script: it became a plain
        # partial, without its own __call__.
        print(*await pool.run(tasks.Tagged(via_helper), 0))
        # A library's function or module, or anything in place of a None, follows the
        # caller's changes as a number does (they stayed as the worker first got them).
        print(*set(await pool.map(names, range(12), chunk_size=1)))
        COMBINE, CODEC, CONFIG = operator.mul, pickle, {"mode": "fast"}
        print(*{s.replace(" ", "") for s in await pool.map(names, range(12), chunk_size=1)})
        # A cached function of the script (its pickle named it in the workers' main).
        print(sum(await pool.map(cached_square, range(4))),
              await pool.run(functools.partial(cached_square), 3))
        print(await pool.run(fib, 90), await pool.run(functools.partial(fib), 91))
        # A cached method of a script class (its class was rebound to the globals of
        # the cache, which has none: FunctionUnavailable).
        print(await pool.run(Fib().of, 30))
        # A cached function of the script as an argument (it pickled by name).
        print(await pool.run(operator.call, fib, 80))
        # The worker's traceback names this file and line (cloudpickle names a
        # script's code "<dynamic-code>").
        try:
            await pool.run(refuse, 1)
        except LookupError as exc:
            print("_main_globals.py\", line" in str(exc.__cause__))
    async with ResilientPool(max_workers=1) as pool:
        older = asyncio.ensure_future(pool.map(slowly_via_helper, slow_input()))
        await wait_until(lambda: pool.statistics().active_calls == 1)

        def helper(x: int) -> int:
            return x + 1000

        # The older call's pickle reached the worker in the middle of this call, and
        # brought its own helper back.
        print(*set(await pool.map(slowly_via_helper, [0] * 20)))
        await older
        # A function made elsewhere under the name of a script global is not that
        # global: the items of a call running meanwhile called it instead.
        done = pool.statistics().tasks_completed
        running = asyncio.ensure_future(pool.map(slowly_via_helper, [0] * 20, chunk_size=2))
        await wait_until(lambda: pool.statistics().tasks_completed > done)  # it runs
        print(await pool.run(make_helper(), 0))
        print(*set(await running))
        # Nor is one kept under another name once a decorator rebound its own.
        done = pool.statistics().tasks_completed
        running = asyncio.ensure_future(pool.map(slowly_labelled, range(20), chunk_size=2))
        await wait_until(lambda: pool.statistics().tasks_completed > done)  # it runs
        await pool.run(undecorated, 0)
        print(sum(value[0] != "decorated" for value in await running))  # type: ignore[index]


if __name__ == "__main__":
    asyncio.run(main())
