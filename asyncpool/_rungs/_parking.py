"""Idle workers of closed pools with ``reuse_workers=True``, kept for the next pool with
the same settings (``ResilientPool.close_idle_workers()`` lets them go)."""

from __future__ import annotations

import os
import socket
from typing import Any

from ._proc import Proc

# By the settings they were started with.
_parked: dict[tuple[Any, ...], list[Proc]] = {}
# A forked child must not take (or kill) its parent's parked workers.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_parked.clear)


def park(key: tuple[Any, ...], proc: Proc) -> None:
    _parked.setdefault(key, []).append(proc)


def take_parked(key: tuple[Any, ...], count: int) -> list[Proc]:
    """Up to ``count`` parked workers started with settings ``key``, still alive."""
    found: list[Proc] = []
    waiting = _parked.get(key, [])
    while waiting and len(found) < count:
        proc = waiting.pop()
        if _still_alive(proc):
            found.append(proc)
    return found


def _still_alive(proc: Proc) -> bool:
    """A parked worker is alive while its status socket holds no exit status."""
    try:
        proc.status.recv(8, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        if proc.server.alive():
            return True
    except OSError:
        pass
    proc.kill()
    for sock in (proc.sock, proc.status):
        sock.close()
    return False


def close_parked() -> int:
    """Let every parked worker go; returns how many there were."""
    procs = [p for group in _parked.values() for p in group]
    _parked.clear()
    for proc in procs:
        proc.close()
        for sock in (proc.sock, proc.status):
            try:
                sock.close()
            except OSError:
                pass
    return len(procs)
