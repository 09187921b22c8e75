"""A worker process's states, and how it died."""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import InitializerFailed
from .._retry import RungUnavailable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._call import Chunk
    from .._config import PoolConfig


class ProcState(enum.Enum):
    STARTING = "starting"  # forked, initialising
    READY = "ready"        # takes chunks
    RETIRING = "retiring"  # told us it leaves after its chunk: takes nothing more
    DEAD = "dead"


class Death:
    """How a worker died: its chunks (the running one first), whether it crashed on
    the first of them (not killed, not retiring, not idle), the item it was running or
    the function it was loading, its exit code, and whether nobody asked it to leave
    (a crash, or killed from outside while idle: the OOM killer)."""

    __slots__ = ("chunks", "exitcode", "crashed", "unasked", "culprit", "loading", "shared",
                 "began")

    def __init__(self, chunks: list[Chunk], exitcode: int | None, shared: bool) -> None:
        self.chunks, self.exitcode = chunks, exitcode
        #: Gone with its fork server, as every worker was.
        self.shared = shared
        self.crashed = False
        self.unasked = False
        self.culprit: int | None = None
        self.loading = 0
        #: Whether it had started its first chunk (those behind it had not).
        self.began = False

    def read(self, progress: Any, asked: bool) -> None:
        """What its progress area says: whether it began its first chunk, and crashed
        there, on an item or loading a function or the arguments (unless ``asked``:
        killed, retiring, or stopped at exit)."""
        chunks = self.chunks
        seq, position, loading, sending = (int(progress[i]) for i in range(4))
        on_item = bool(chunks) and 0 <= position < chunks[0].size  # else between items
        if chunks and sending:  # pickling results: whose, known if only one (see _wire)
            on_item, position = True, sending - 1 if sending - 1 == chunks[0].reported else -1
        self.began = bool(chunks) and seq == chunks[0].seq
        # Gone with its fork server: only an item it ran then is blamed (it may have
        # killed the fork server; from outside, as any outside kill, it gets a retry).
        if self.began and not asked and (on_item or not self.shared):
            self.crashed = True
            self.culprit = position if on_item and position >= 0 else None
            self.loading = loading

    def blame(self, limit: int) -> None:
        """A worker that died on its own, its first chunk not begun, more than
        ``limit`` times with the same chunk next: that chunk crashed it, whatever its
        progress area says (a task wrote over it: each went again unstarted, for good)."""
        if self.chunks and self.unasked and not (self.crashed or self.began):
            self.chunks[0].unexplained += 1
            self.crashed = self.chunks[0].unexplained > limit


class ForkServerGone(RungUnavailable):
    """A worker died as it started because its fork server did (killed, say): tried
    again on a new one, its initializer not blamed."""


def initializer_failure(error: BaseException | None, forked: bool,
                        initializer: Any) -> InitializerFailed | None:
    """The initializer's fault, if a worker did not start with ``error``: it raised,
    or the worker died while running it (``forked``: the fork itself worked)."""
    if error is None or initializer is None or isinstance(error, ForkServerGone) or (
            isinstance(error, OSError) and not forked):
        return None  # no error, the fork server died, or the fork failed (no processes)
    if isinstance(error, RungUnavailable):
        failure = InitializerFailed(f"a worker died while running the initializer "
                                    f"{initializer!r}: {error}")
        failure.__cause__ = error
        return failure
    return InitializerFailed.raised(initializer, error)


class Started(Protocol):
    """A worker through its start (a Proc)."""

    pid: int | None
    forked_at: float
    server: Any  # its fork server
    init_error: BaseException | None
    started: Any  # an event, set once it started or failed to


def _raised(proc: Started, initializer: Any) -> bool:
    """Whether ``proc``'s initializer raised (not a fork that failed, nor a worker that
    died as it started)."""
    return initializer_failure(proc.init_error, proc.pid is not None,
                               initializer) is not None and not isinstance(
        proc.init_error, RungUnavailable)


def opening_done(starting: Sequence[Started], initializer: Any) -> bool:
    """Whether each of ``starting`` started, or one's initializer raised: the open
    fails at once (it waited for a sibling hanging in its own, then said only that).
    A fork that failed is not that: the others may still serve."""
    return all(p.started.is_set() for p in starting) or any(
        _raised(p, initializer) for p in starting)


def opening_failure(starting: Sequence[Started], served: bool, initializer: Any) -> None:
    """Raise what stops a process rung from opening, once ``starting`` workers are
    through their start: an initializer that raised; a worker that died as it started
    (the OOM killer, say), unless others serve (it is replaced, as it would be later);
    no worker at all."""
    for proc in starting:
        failure = initializer_failure(proc.init_error, proc.pid is not None, initializer)
        if failure is not None and (not served or _raised(proc, initializer)):
            raise failure
    if not served:
        error = next((p.init_error for p in starting if p.init_error), None)
        raise RungUnavailable(f"no worker process could start ({error!r})") from error


def opening_timed_out(starting: Sequence[Started], config: PoolConfig, server: Any) -> None:
    """Raise why ``starting`` workers were not through their start in
    ``config.start_timeout``, if they were not (else only the imports were slow: the
    first call finishes them). None asked for at all: ``server``'s socket stayed full."""
    initializer, seconds = config.initializer, config.start_timeout
    if starting and opening_done(starting, initializer):
        return
    now = time.monotonic()
    if initializer is not None and starting and all(
            had_its_time(p, now, seconds) for p in starting if not p.started.is_set()):
        raise InitializerFailed.timed_out(initializer, seconds) from None
    # A stopped fork server (SIGSTOP) would keep every other try as long.
    halted = server_stopped(server)
    raise RungUnavailable(f"the worker processes did not start within {seconds} s" + (
        " (the fork server is stopped)" if halted else ""), again=not halted) from None


def had_its_time(proc: Started, deadline: float, seconds: float | None) -> bool:
    """Whether ``proc``, still starting at ``deadline`` (``seconds`` after it was asked
    for), was forked early enough for its initializer to be what hangs. Forked late
    (its fork server stopped a while), a slow one was blamed for the fork server."""
    return proc.pid is not None and proc.forked_at <= deadline - 0.9 * (seconds or 0)


def server_stopped(server: Any) -> bool:
    """Whether the fork server ``server`` (if any) is stopped (SIGSTOP): it forks
    nothing."""
    if server is None:
        return False
    try:
        return _stat(server.process.pid)[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def exit_status(pid: int) -> int | None:
    """The wait status of ``pid`` if it exited and its parent has not reaped it (read
    where the kernel keeps it); None otherwise (a zombie whose threads run on, too)."""
    try:
        fields = _stat(pid)
        if fields[0] != b"Z" or len(os.listdir(f"/proc/{pid}/task")) > 1:
            return None
        return int(fields[49])
    except (OSError, IndexError, ValueError):
        return None


class Exiting(Protocol):
    """A worker gone from its socket (a Proc)."""

    pid: int | None

    def exited(self) -> bool: ...
    def exit_seen(self, status: int | None) -> None: ...


async def watch_exit(proc: Exiting) -> None:
    """Until ``proc``'s exit is known: said by the fork server, or read where the
    kernel keeps it (a stopped fork server reaps nothing: a worker's threads may still
    be leaving, or it may still run, closed off and killed, when its socket ends)."""
    import anyio

    while not proc.exited() and proc.pid is not None:
        proc.exit_seen(exit_status(proc.pid))
        await anyio.sleep(0.05)


#: pidfd_send_signal's flag for the target's process group (Linux 6.9).
PIDFD_SIGNAL_PROCESS_GROUP = 4


class Reach:
    """SIGKILL for a worker and its process group through a pidfd: it names the
    process, not its number, so no signal reaches one that took the pid after the fork
    server reaped the worker (unknown to the pool until the fork server says so)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.owner = pid, os.getpid()
        self.fd: int | None = None
        self.gone = False  # reaped before it was reached: nothing to signal
        try:
            self.fd = os.pidfd_open(pid)
        except OSError as exc:
            self.gone = exc.errno == errno.ESRCH
        except AttributeError:  # pragma: no cover - not Linux
            pass

    def kill(self, group_only: bool = False) -> None:
        """Kill the worker's group (what it started: the group outlives a reaped
        worker), then the worker (just forked, it may not lead its group yet). Not
        from a process forked from the pool's: its workers are not that one's."""
        if self.gone or os.getpid() != self.owner:
            return
        for flags in (PIDFD_SIGNAL_PROCESS_GROUP,) + (() if group_only else (0,)):
            if self.fd is None:  # pragma: no cover - no pidfd: by number
                with contextlib.suppress(OSError):
                    (os.kill if flags == 0 else os.killpg)(self.pid, signal.SIGKILL)
                continue
            try:
                signal.pidfd_send_signal(self.fd, signal.SIGKILL, None, flags)
            except OSError as exc:
                if exc.errno == errno.EINVAL and flags:  # a kernel before 6.9
                    self._kill_group_by_number()

    def resume(self) -> None:
        """SIGCONT the worker: one stopped (job control, a debugger let go) and asked to
        leave reads its end-of-file and leaves, rather than be killed seconds later."""
        if self.fd is not None and os.getpid() == self.owner:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.fd, signal.SIGCONT)

    def _kill_group_by_number(self) -> None:  # pragma: no cover - a kernel before 6.9
        # While the worker is not reaped (a zombie still is), its group id is its own.
        with contextlib.suppress(OSError):
            assert self.fd is not None
            signal.pidfd_send_signal(self.fd, 0)
            os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
            self.gone = True


def running(pid: int) -> bool:
    """Whether ``pid`` runs (not exiting, exited, or waiting to be reaped); unknown is
    yes. (An exiting process closes its descriptors before it is a zombie.)"""
    try:
        fields = _stat(pid)
        return fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING
    except FileNotFoundError:
        return False
    except (OSError, IndexError, ValueError):
        return True


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, job control; not a tracer's stop)."""
    try:
        return _stat(pid)[0] == b"T"
    except (OSError, IndexError):
        return False


PF_EXITING = 0x4  # in /proc/<pid>/stat's flags


def _stat(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command's name, the state first."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rpartition(b")")[2].split()
