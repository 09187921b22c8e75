"""Everything that touches loky's internals, in one place.

loky starts its manager thread and its call-queue feeder thread inside the first
``submit()``; when either start fails the executor is wedged for good (later submits
queue forever, ``shutdown(wait=True)`` raises). So a process rung is only "started" once
a warm-up task has come back, and a failed one is discarded with its workers killed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import weakref
from typing import Any

from loky import ProcessPoolExecutor

from ._worker import noop

logger = logging.getLogger("asyncpool")


def start_executor(max_workers: int, timeout: float, reuse: bool = False) -> ProcessPoolExecutor:
    """Build a private loky executor and prove it works. Blocking: run off the loop.

    With ``reuse``, an executor parked by a closed pool (see :func:`park`) is taken
    instead when one of the same size is healthy: its workers are already warm.
    """
    if reuse:
        parked = _take_parked(max_workers)
        if parked is not None:
            try:
                parked.submit(noop).result(timeout=timeout)
                return parked
            except BaseException:
                discard(parked)
    executor = ProcessPoolExecutor(max_workers=max_workers)
    try:
        # The first submit starts the workers and both helper threads; the answer
        # proves the round trip works.
        executor.submit(noop).result(timeout=timeout)
    except BaseException:
        discard(executor)
        raise
    track(executor)
    return executor


# Executors that are still open, for the exit hook below.
_live: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
_hook_registered = False


def _kill_at_exit() -> None:
    # An interpreter that exits with work in flight (a pool that was never closed)
    # would join loky's manager threads, which wait for the running tasks: kill the
    # workers first so the exit is prompt.
    for executor in list(_live):
        discard(executor)


def track(executor: ProcessPoolExecutor) -> None:
    """Kill ``executor``'s workers if the interpreter exits while it is open.

    Registered after loky's own exit hook (which joins its threads), and threading
    runs these hooks last-registered first, so the workers die before loky waits.
    """
    global _hook_registered
    _live.add(executor)
    if not _hook_registered:
        threading._register_atexit(_kill_at_exit)  # type: ignore[attr-defined]
        _hook_registered = True


# Executors whose pool closed with reuse_workers=True, by size, waiting for the next pool.
_parked: dict[int, list[ProcessPoolExecutor]] = {}
_parked_lock = threading.Lock()


def healthy(executor: ProcessPoolExecutor) -> bool:
    flags = getattr(executor, "_flags", None)
    if flags is None or flags.broken is not None or flags.shutdown:
        return False
    return not dead_workers(executor) and bool(worker_processes(executor))


def park(executor: ProcessPoolExecutor, max_workers: int) -> bool:
    """Keep a healthy, idle executor for the next pool; False if it cannot be kept."""
    if not healthy(executor):
        return False
    with _parked_lock:
        _parked.setdefault(max_workers, []).append(executor)
    return True


def _take_parked(max_workers: int) -> ProcessPoolExecutor | None:
    with _parked_lock:
        while _parked.get(max_workers):
            executor = _parked[max_workers].pop()
            if healthy(executor):
                return executor
            discard(executor)
    return None


def close_parked() -> int:
    """Shut down every parked executor; returns how many. Blocking: run off the loop."""
    with _parked_lock:
        executors = [e for group in _parked.values() for e in group]
        _parked.clear()
    for executor in executors:
        close(executor, kill=False)
    return len(executors)


def worker_processes(executor: ProcessPoolExecutor) -> dict[int, Any]:
    """pid -> process object of the executor's live workers (a copy)."""
    return dict(getattr(executor, "_processes", None) or {})


def dead_workers(executor: ProcessPoolExecutor) -> dict[int, int]:
    """pid -> exit code of the workers that have exited (reaping them)."""
    dead = {}
    for pid, process in worker_processes(executor).items():
        try:
            code = process.exitcode
        except Exception:  # pragma: no cover - a process object loky already closed
            continue
        if code is not None:
            dead[pid] = code
    return dead


def kill_workers(executor: ProcessPoolExecutor, pids: list[int] | None = None) -> None:
    """SIGKILL the given (default: all) worker processes of ``executor``."""
    processes = worker_processes(executor)
    for pid in processes if pids is None else pids:
        if pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def discard(executor: ProcessPoolExecutor) -> None:
    """Tear down a broken or half-built executor without waiting for any thread.

    Never blocks: a wedged executor's ``shutdown(wait=True)`` would raise or hang.
    """
    _live.discard(executor)
    processes = worker_processes(executor)
    kill_workers(executor)
    try:
        executor.shutdown(wait=False, kill_workers=True)
    except Exception:  # pragma: no cover - a wedged executor may refuse even this
        logger.debug("shutdown of a discarded executor failed", exc_info=True)
    for process in processes.values():
        try:
            process.join(timeout=5)
        except Exception:  # pragma: no cover
            pass


def close(executor: ProcessPoolExecutor, kill: bool) -> None:
    """Shut an executor down and wait for its workers. Blocking: run off the loop."""
    _live.discard(executor)
    processes = worker_processes(executor)
    if kill:
        discard(executor)
        return
    try:
        executor.shutdown(wait=True)
    except Exception:
        logger.debug("clean shutdown failed; killing workers", exc_info=True)
        discard(executor)
    for process in processes.values():
        process.join(timeout=10)
