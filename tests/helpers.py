"""Test helpers, in one place: loop lag, waiting for conditions, faults, cgroups."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def children() -> set[int]:
    """Child processes (recursively), less the fork server (one per interpreter by
    design; the workers it forks are counted)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if "asyncpool._zygote" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        found.add(child.pid)
    return found


def settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes (for synchronous code)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` on the loop until it holds; fail the test after ``timeout``."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """:func:`wait_until` for a check that awaits (asks a cluster, say)."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)


async def idle(pool: Any, timeout: float = 10.0) -> None:
    """Until no chunk is in flight and no call waits (abandoned work may still finish
    for a while after its call returned)."""
    await wait_until(lambda: pool.statistics().chunks_in_flight == 0
                     and pool.statistics().active_calls == 0, timeout)


class Heartbeat:
    """How late a 5 ms sleep wakes up on the loop: the loop's longest blocked stretch."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Heartbeat]:
        async with anyio.create_task_group() as tg:
            await tg.start(self._beat)
            yield self
            # One more beat: a stretch that held the loop just before is counted (its
            # beat, due meanwhile, was cancelled unmeasured).
            beats = len(self.lags)
            with anyio.move_on_after(5):
                while len(self.lags) == beats:
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()

    async def _beat(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        for beat in itertools.count():
            before = time.perf_counter()
            await anyio.sleep(0.005)
            if beat == 0:
                task_status.started()  # beating: what follows is measured
                continue
            self.lags.append(time.perf_counter() - before - 0.005)

    @property
    def worst(self) -> float:
        return max(self.lags, default=0.0)


_original_start = threading.Thread.start


class ThreadStarts:
    """Makes chosen calls of Thread.start fail as an exhausted machine does."""

    def __init__(self) -> None:
        self.count = 0
        self.blocked = False

    def __call__(self, thread: threading.Thread) -> None:
        if _for_trio_guest_run():
            _original_start(thread)  # the test runner's machinery, not the pool's
            return
        self.count += 1
        if self.blocked:
            raise RuntimeError("can't start new thread")
        _original_start(thread)


def _for_trio_guest_run() -> bool:
    """Whether this thread start is trio's guest run waiting for I/O: anyio's pytest
    runner drives trio as a guest, which needs a thread to wait in (a run that had one
    cached ran on, one that had none hung)."""
    frame = sys._getframe(2)  # past this helper and ThreadStarts.__call__
    while frame is not None and (frame.f_code.co_name == "<lambda>" or
                                 frame.f_code.co_filename.endswith("_thread_cache.py")):
        frame = frame.f_back  # the patched start, trio's thread cache
    return frame is not None and frame.f_code.co_name == "guest_tick"


class Cgroup:
    """A cgroup of one controller (``pids``, ``memory``) under its v1 hierarchy or the
    v2 unified root; the test skips, saying why, where none can be made."""

    @staticmethod
    def root(controller: str) -> Path | None:
        v1, v2 = Path("/sys/fs/cgroup", controller), Path("/sys/fs/cgroup")
        if (v1 / "cgroup.procs").exists():
            return v1
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and controller in controllers.read_text().split():
            return v2
        return None

    @classmethod
    @contextlib.contextmanager
    def create(cls, controller: str = "pids", limit: str = "pids.max") -> Iterator[Path]:
        """A new cgroup whose ``limit`` file (its controller's) can be written."""
        root = cls.root(controller)
        if root is None:
            pytest.skip(f"no {controller} cgroup controller is mounted on this machine")
        path = root / f"asyncpool-test-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a {controller} cgroup under {root} ({exc}); run "
                        "as root on a machine with a writable cgroup hierarchy")
        if not (path / limit).exists():
            path.rmdir()
            pytest.skip(f"{root} has no {limit} for new groups")
        try:
            yield path
        finally:
            remove_cgroup(path, root)


def remove_cgroup(path: Path, root: Path) -> None:
    """Move whatever is left back to the root (nothing should be), then remove."""
    for _ in range(50):
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def run_python(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
               cwd: Path = ROOT, **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in a fresh interpreter (from the checkout), its output
    captured as text (unless ``popen`` says otherwise)."""
    captured: dict[str, Any] = {"capture_output": True} if not popen else {}
    return subprocess.run([sys.executable, *args], text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})}, **captured, **popen)


def run_script(name: str, *args: str, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``tests/<name>`` in a fresh interpreter."""
    return run_python(str(ROOT / "tests" / name), *args, timeout=timeout, env=env)


def run_code(code: str, *args: str, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code *args`` in a fresh interpreter, from the checkout."""
    return run_python("-c", code, *args, timeout=timeout, env=env)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliCluster:
    """A real Dask cluster started from the command line on loopback:
    ``dask scheduler`` and ``dask worker`` processes, each in its own session."""

    def __init__(self, workers: int = 2, threads: int = 1, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.count, self.threads = workers, threads
        self.env = {**os.environ, **(env or {})}
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, *args: str, cwd: str | None = None) -> subprocess.Popen[bytes]:
        dask = str(Path(sys.executable).with_name("dask"))
        return subprocess.Popen([dask, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                env=self.env, cwd=cwd or "/", preexec_fn=_die_with_us)

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn("scheduler", "--host", "127.0.0.1", "--port",
                                     str(self.port), "--no-dashboard")

    def start_workers(self) -> None:
        for _ in range(self.count):
            self.workers.append(self._spawn(
                "worker", self.address, "--nworkers", "1", "--nthreads", str(self.threads),
                "--no-dashboard", "--host", "127.0.0.1"))

    async def wait_ready(self, timeout: float = 60) -> None:
        """Until the scheduler answers with every worker connected."""
        from distributed import Client

        with anyio.fail_after(timeout):
            while True:
                try:
                    async with Client(self.address, asynchronous=True, timeout="2s",
                                      set_as_default=False) as client:
                        if self.count:
                            await client.wait_for_workers(self.count, timeout=timeout)
                        return
                except OSError:
                    await anyio.sleep(0.2)

    def kill_scheduler(self) -> None:
        if self.scheduler is not None:
            _kill_session(self.scheduler)
            self.scheduler = None

    def kill_worker(self, index: int = 0) -> None:
        _kill_session(self.workers[index])

    def pause_scheduler(self, paused: bool = True) -> None:
        """SIGSTOP (or SIGCONT) the scheduler: it keeps its connections open and
        answers nothing, as a hung or swapped-out process does."""
        import signal

        assert self.scheduler is not None
        os.kill(self.scheduler.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        # Asked to stop, each cleans up after itself (its multiprocessing semaphores
        # in /dev/shm too); what is left after 10 s is killed. Workers first: with
        # their scheduler gone they wait for it (10 s), with it they leave at once.
        for group in (self.workers, [self.scheduler]):
            procs = [p for p in group if p is not None]
            for proc in procs:
                proc.terminate()
            for proc in procs:
                _kill_session(proc, grace=10)
        self.scheduler, self.workers = None, []


def unlink_orphaned_semaphores() -> None:
    """Remove the multiprocessing semaphores in /dev/shm that no live process maps: a
    Dask nanny SIGKILLed with its group (its resource tracker too) leaves its own
    behind. Those of a cluster that still runs are mapped, and stay."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    found = {str(p) for p in shm.glob("sem.mp-*")}
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            found -= {line.split(maxsplit=5)[-1].strip()
                      for line in maps.read_text().splitlines() if "/dev/shm/sem." in line}
    for path in found:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _die_with_us() -> None:
    """In a cluster's process: it dies with the test run, were that killed (a run
    stopped by a timeout left a scheduler and a worker behind for good)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _kill_session(proc: subprocess.Popen[bytes], grace: float = 0) -> None:
    """SIGKILL ``proc`` (a real crash: its helpers, such as the resource tracker that
    removes its semaphores, outlive it and clean up), then, after 5 s (or ``grace``
    for a process asked to stop), whatever of its session is left."""
    import signal

    if not grace:
        proc.kill()
    try:
        proc.wait(timeout=grace or None)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def fork_server_stopped() -> Iterator[int]:
    """The running fork server stopped (SIGSTOP) for the block, then continued; its
    pid."""
    from asyncpool._forkserver import ForkServer

    server = ForkServer.current()
    assert server is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield server.process.pid
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def lose_a_worker(pool: Any, pid: int) -> None:
    """SIGKILL the worker ``pid`` (its fork server stopped: its replacement is asked
    for, never forked) and wait for ``pool`` to see it."""
    crashes = pool.statistics().worker_crashes
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: pool.statistics().worker_crashes == crashes + 1)
