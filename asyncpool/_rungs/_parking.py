"""Idle workers of closed pools with ``reuse_workers=True``, kept for the next pool with
the same settings (``ResilientPool.close_idle_workers()`` lets them go)."""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from .. import _wire
from .._errors import SerializationError
from .._retry import RungUnavailable
from .._share import dumps_for_workers
from ._proc import Proc

if TYPE_CHECKING:
    from .._config import PoolConfig

# By the settings they were started with.
_parked: dict[tuple[Any, ...], list[Proc]] = {}
# A forked child must not take (or kill) its parent's parked workers.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_parked.clear)


def park(key: tuple[Any, ...], proc: Proc, workers: int) -> None:
    """Park ``proc`` with settings ``key``. At most two per CPU wait in all (or the
    parking pool's ``workers``): beyond, those parked longest ago under other settings
    go (a pool opened per job in a directory of its own parked more each time)."""
    group = _parked.pop(key, [])
    group.append(proc)
    _parked[key] = group  # the settings parked last, last
    extra = sum(map(len, _parked.values())) - max(workers, 2 * (os.cpu_count() or 1))
    for old in list(_parked.values()):
        while old and extra > 0:
            _let_go(old.pop(0))
            extra -= 1
    for emptied in [k for k, group in _parked.items() if not group]:
        del _parked[emptied]


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
        _let_go(proc)
    return len(procs)


def _let_go(proc: Proc) -> None:
    proc.close()
    for sock in (proc.sock, proc.status):
        try:
            sock.close()
        except OSError:
            pass


def directory() -> tuple[str, tuple[int, int]]:
    """The current directory, where workers start, and what tells it from one made
    anew under its name. A removed one raises RungUnavailable: workers would work in
    an earlier pool's (the fork server's)."""
    try:
        cwd = os.getcwd()
        return cwd, directory_of(cwd)
    except OSError as exc:
        raise RungUnavailable("the current directory was removed: worker processes "
                              f"cannot start in it ({exc})") from exc


def check_directory(cwd: str, where: tuple[int, int]) -> None:
    """Raise FileNotFoundError (a fork that cannot be made) if the directory workers
    start in was removed since: each worker started there failed with a traceback."""
    try:
        same = directory_of(cwd) == where
    except OSError:
        same = False
    if not same:
        raise FileNotFoundError(errno.ENOENT, "the directory this pool's workers start "
                                "in was removed", cwd)


def directory_of(path: str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def worker_settings(config: PoolConfig) -> tuple[_wire.Parts, tuple[Any, ...] | None]:
    """What a new worker is told first, and the key of the parked workers that a
    pool with ``config`` may take over (none with an initializer: its state is the
    pool's own)."""
    initializer = None
    if config.initializer is not None:
        try:
            initializer = dumps_for_workers((config.initializer, config.initargs))
        except Exception as exc:
            raise SerializationError(
                f"the initializer {config.initializer!r} or its initargs cannot be "
                f"pickled for the worker processes ({exc}); pass picklable initargs, "
                "or make the object in the initializer") from exc
    cwd, where = directory()
    environ = dict(os.environ)
    settings = _wire.dumps({
        "sys_path": list(sys.path), "cwd": cwd, "environ": environ, "argv": list(sys.argv),
        "initializer": initializer,
        "task_retries": config.task_retries, "max_tasks": config.max_tasks_per_worker,
        "max_memory": config.max_worker_memory})
    key = None if initializer else (config.task_retries, config.max_tasks_per_worker,
                                    config.max_worker_memory, tuple(sys.path), cwd,
                                    where, tuple(sys.argv),
                                    tuple(sorted(environ.items())))
    return settings, key
