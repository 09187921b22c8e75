"""Functions the never-hang cases send to workers (importable by every checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def nap_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def pid_of(_: object = None) -> int:
    return os.getpid()


def echo(x: object) -> object:
    return x


def make_bytes(n: int) -> bytes:
    return b"x" * n


def spawn_sleeper(note: str) -> None:
    child = subprocess.Popen(["sleep", "1000"])
    Path(note).write_text(str(child.pid))
    time.sleep(60)


class TwoArgs(Exception):
    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"code {code} at {where}")


def raise_two_args(x: int) -> int:
    raise TwoArgs(x, "here")


def exit_three(x: int) -> int:
    sys.exit(3)


def note_or_die(args: tuple[int, str, bool]) -> int:
    x, path, poison = args
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if poison:
        os._exit(9)
    return x
