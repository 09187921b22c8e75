"""Classes defined in the caller's main script come back as themselves.

Run as a script (so these classes live in ``__main__``); prints one line per case.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import InitializerFailed, RemoteError, ResilientPool  # noqa: E402


@dataclasses.dataclass
class Point:
    x: int


class Oops(Exception):
    pass


class NeedsTwo(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def make_point(x: int) -> Point:
    return Point(x)


def shift(point: Point) -> Point:
    return Point(point.x + 1)


class Session:
    @contextlib.contextmanager
    def opened(self, x: int) -> Iterator[int]:
        yield 2 * x


def library_wrapped(x: int) -> str:
    # Methods the dataclass and contextlib modules wrote (functools.wraps gives them
    # this script's name) need their own modules' globals in a worker too.
    with Session().opened(x) as doubled:
        return f"{Point(doubled)!r}"


class Greeter:
    def hello(self) -> str:
        return "hello"


class Hooks:
    greet = Greeter().hello  # a bound method as a class attribute


def signature_and_hook(x: int) -> str:
    """Rebound in a worker, it keeps what the caller's function has."""
    return f"{inspect.signature(signature_and_hook)}|{signature_and_hook.__doc__}|" + (
        Hooks.greet())


signature_and_hook.__doc__ = "assigned"


def oops(x: int) -> int:
    raise Oops(f"oops {x}")


def needs_two(x: int) -> int:
    raise NeedsTwo(x, x)


async def main() -> None:
    async with ResilientPool(max_workers=2) as pool:
        points = await pool.map(make_point, range(3))
        assert points == [Point(0), Point(1), Point(2)] and type(points[0]) is Point
        print("dataclass:Point")
        assert await pool.map(library_wrapped, range(2)) == ["Point(x=0)", "Point(x=2)"]
        assert repr(points[1]) == "Point(x=1)"
        print("library-wrapped:ok")
        # As arguments too: the workers have no such class (it went by reference).
        moved = await pool.map(shift, [Point(i) for i in range(500)])
        assert moved == [Point(i + 1) for i in range(500)] and type(moved[0]) is Point
        print("argument:Point")
        assert await pool.run(signature_and_hook, 1) == signature_and_hook(1)
        print("rebound:same")
        try:
            await pool.run(oops, 1)
        except Oops as exc:
            assert str(exc) == "oops 1"
            print("exception:Oops")
        try:
            await pool.run(needs_two, 2)
        except RemoteError as exc:
            assert exc.type_name == "__main__.NeedsTwo" and "2-2" in str(exc)
            print("two-args:RemoteError")
    # An initializer's error too (it came as a RemoteError, its class lost).
    try:
        async with ResilientPool(max_workers=1, rungs=("process",), initializer=oops,
                                 initargs=(3,)):
            pass
    except InitializerFailed as exc:
        assert type(exc.__cause__) is Oops and str(exc.__cause__) == "oops 3", exc.__cause__
        print("initializer:Oops")


if __name__ == "__main__":
    asyncio.run(main())
