"""The rungs of the ladder: how each is created, fed, checked and torn down.

Every rung that hands work to other threads answers with a ``concurrent.futures.Future``
whose result is an :data:`~asyncpool._worker.Outcomes` (or bytes holding one).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import cloudpickle

from . import _loky
from ._config import PoolConfig
from ._retry import is_transient
from ._worker import Outcomes, run_chunk, run_items

logger = logging.getLogger("asyncpool")


class Rung:
    name: str = ""

    def __init__(self) -> None:
        #: No new chunk goes here (it crashed, or refused a submit).
        self.broken = False
        #: Its workers died (the executor is gone): nothing on it will finish.
        self.crashed = False
        self.retired = False
        self.in_flight = 0
        #: The worker_crash event for this rung was sent (once per rung).
        self.crash_reported = False

    def submit(self, fn: Callable[..., Any], items: Sequence[Any], star: bool,
               retries: int, key: str) -> cf.Future[Any]:
        raise NotImplementedError

    #: Pickled size of the last chunk sent (0 where nothing is pickled).
    last_payload_size = 0

    def decode(self, result: Any) -> Outcomes:
        return result  # type: ignore[no-any-return]

    def note_broken(self) -> None:
        """Called from the thread that found the rung broken, before it cleans up."""

    #: True where a crash is pinned on the chunk that caused it (the process rung reads
    #: which chunk each dead worker ran). Where it is not, the halves of a split chunk
    #: start their crash count afresh, so only crashes of the item alone count.
    exact_crashes = True

    def suspect(self, key: str) -> tuple[int | None, str] | None:
        """(exit code, description) of the crash that chunk ``key`` caused, if it did."""
        return None

    def kill_chunks(self, keys: list[str]) -> bool:
        """Stop the chunks ``keys`` where they run; False if this rung cannot."""
        return False

    async def aclose(self, kill: bool) -> None:
        raise NotImplementedError


class ProcessRung(Rung):
    """A private loky executor whose workers mark which chunk each is running."""

    name = "process"

    def __init__(self, executor: Any, reuse: bool = False) -> None:
        super().__init__()
        self.executor = executor
        self.reuse = reuse
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.marker_dir = tempfile.mkdtemp(prefix="asyncpool-", dir=base)
        self._crash_lock = threading.Lock()
        self._crash: tuple[dict[int, int], dict[str, int]] | None = None

    @classmethod
    async def create(cls, max_workers: int, timeout: float, reuse: bool) -> ProcessRung:
        # Shielded: a start abandoned half way would leave an executor nobody closes.
        with anyio.CancelScope(shield=True):
            executor = await anyio.to_thread.run_sync(
                _loky.start_executor, max_workers, timeout, reuse
            )
        rung = cls(executor, reuse)
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            await rung.aclose(kill=True)
            raise
        return rung

    def submit(self, fn: Callable[..., Any], items: Sequence[Any], star: bool,
               retries: int, key: str) -> cf.Future[Any]:
        try:
            payload = cloudpickle.dumps((fn, items, star, retries), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            # Whatever type pickling raised, it is about the items, not the machine.
            raise ChunkUnpicklable(exc) from exc
        self.last_payload_size = len(payload)
        future: cf.Future[Any] = self.executor.submit(run_chunk, payload, self.marker_dir, key)
        return future

    def decode(self, result: Any) -> Outcomes:
        tag, *rest = pickle.loads(result)
        if tag == "unpickle":
            raise _ArgumentsUnpickleable(rest[0])
        return Outcomes(*rest)

    def running(self) -> dict[str, int]:
        """chunk key -> pid of the worker running it, from the marker files."""
        found = {}
        try:
            names = os.listdir(self.marker_dir)
        except OSError:
            return {}
        for name in names:
            key, _, pid = name.rpartition(".")
            if pid.isdigit():
                found[key] = int(pid)
        return found

    def note_broken(self) -> None:
        # Runs in loky's manager thread inside its first set_exception, before loky
        # kills the surviving workers: the only dead workers now are the ones that
        # crashed, so their markers name the chunks that crashed them.
        self.broken = self.crashed = True
        with self._crash_lock:
            if self._crash is None:
                self._crash = (_loky.dead_workers(self.executor), self.running())

    def suspect(self, key: str) -> tuple[int | None, str] | None:
        if self._crash is None:
            return None
        dead, running = self._crash
        pid = running.get(key)
        if pid is None or pid not in dead:
            return None
        code = dead[pid]
        return code, f"exit code {code}{_signal_name(code)}"

    def kill_chunks(self, keys: list[str]) -> bool:
        running = self.running()
        pids = [running[k] for k in keys if k in running]
        _loky.kill_workers(self.executor, pids)
        return True

    def exit_codes(self) -> dict[int, int]:
        return dict(self._crash[0]) if self._crash else {}

    async def aclose(self, kill: bool) -> None:
        try:
            kill = kill or self.crashed
            if not kill and self.reuse and _loky.park(self.executor,
                                                      self.executor._max_workers):
                return
            try:
                # Both ways join processes, which may block: wait in a thread.
                await anyio.to_thread.run_sync(_loky.close, self.executor, kill,
                                               abandon_on_cancel=True)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # No thread to wait in: kill, which never waits for running work.
                _loky.discard(self.executor)
        finally:
            shutil.rmtree(self.marker_dir, ignore_errors=True)


class ChunkUnpicklable(Exception):
    """Some item of a chunk could not be pickled in the parent (the cause says why)."""


class _ArgumentsUnpickleable(Exception):
    """A worker could not unpickle the chunk it was sent (carries the captured error)."""


class _ThreadPool:
    """A fixed set of threads, all started up front.

    ``ThreadPoolExecutor`` starts threads inside ``submit()`` after queueing the item, so
    a failed thread start there raises while the item stays queued: resending it would
    run it twice. Starting every thread here means ``submit`` never starts one.
    """

    def __init__(self, size: int) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        for index in range(size):
            thread = threading.Thread(target=self._work, name=f"asyncpool-thread-{index}",
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError:
                if not self.threads:
                    raise
                logger.warning("thread rung started %d of %d threads", index, size)
                break
            self.threads.append(thread)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
            del job, future

    def shutdown(self) -> None:
        for _ in self.threads:
            self._queue.put(None)


class ThreadRung(Rung):
    name = "thread"

    def __init__(self, max_workers: int) -> None:
        super().__init__()
        self.pool = _ThreadPool(max_workers)

    def submit(self, fn: Callable[..., Any], items: Sequence[Any], star: bool,
               retries: int, key: str) -> cf.Future[Any]:
        return self.pool.submit(run_items, fn, items, star, retries)

    async def aclose(self, kill: bool) -> None:
        # Threads cannot be killed; they finish what they run and exit (they are
        # daemons, so a stuck task does not hold the interpreter at exit).
        self.pool.shutdown()
        if not kill:
            for thread in self.pool.threads:
                while thread.is_alive():
                    await anyio.sleep(0.01)


class InlineRung(Rung):
    """Runs items in the calling task; needs no thread and cannot fail to start."""

    name = "inline"

    async def aclose(self, kill: bool) -> None:
        return None


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f", {signal.Signals(-code).name}"
        except ValueError:
            pass
    return ""


async def create_rung(name: str, config: PoolConfig) -> Rung:
    if name == "dask":
        from ._dask import DaskRung

        return await DaskRung.create(config.dask_address, config.dask_client,
                                     config.dask_connect_timeout)
    if name == "process":
        return await ProcessRung.create(config.max_workers, config.start_timeout,
                                        config.reuse_workers)
    if name == "thread":
        return ThreadRung(config.max_workers)
    return InlineRung()
