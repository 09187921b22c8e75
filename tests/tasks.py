"""Functions the tests send to workers (importable by worker processes)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def burn(seconds: float) -> float:
    """Spin the CPU for `seconds` (no sleep, so it really occupies a core)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def kill_self_once(args: tuple[int, str]) -> int:
    """SIGKILL this worker the first time item 0 runs; the retry succeeds."""
    x, marker = args
    if x == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def exit_on(args: tuple[int, int]) -> int:
    """A poison item: os._exit every time it runs."""
    x, poison = args
    if x == poison:
        os._exit(7)
    return x


def segfault_on(args: tuple[int, int]) -> int:
    x, poison = args
    if x == poison:
        import faulthandler

        faulthandler._sigsegv()
    return x


def pid_of(_: object = None) -> int:
    return os.getpid()


def thread_name(_: object = None) -> str:
    return threading.current_thread().name


class Unpicklable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("Unpicklable refuses to be pickled")


def _boom() -> None:
    raise ValueError("Unloadable refuses to be unpickled")


class Unloadable:
    """Pickles fine, fails when unpickled."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_boom, ())


def return_unpicklable(x: int) -> object:
    return Unpicklable() if x == 2 else x


def return_unloadable(x: int) -> object:
    return Unloadable() if x == 2 else x


def flaky_thread_start(args: tuple[int, str]) -> int:
    """Fails like an exhausted machine the first time, then succeeds."""
    x, marker = args
    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("can't start new thread")
    return x


def slow_echo(x: object) -> object:
    time.sleep(0.02)
    return x


class RefusesWithRuntimeError:
    """Its pickling fails with a RuntimeError, which must not be taken for exhaustion."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("RefusesWithRuntimeError cannot be pickled")
