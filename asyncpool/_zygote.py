"""The fork server: a small, single-threaded interpreter that forks the workers.

The parent starts it once (``python -m asyncpool._zygote``) and asks it for workers over
a control socket, passing each new worker's sockets along. Forking a process that has
already imported what workers need takes a few milliseconds; a fresh interpreter takes
tens. Because it has no threads, forking it is safe whatever threads the parent runs.

It keeps the workers' lives tied to the parent's: each worker is the leader of its own
process group (so killing the group kills what the task started too), dies with the
fork server (``PR_SET_PDEATHSIG`` on Linux), and when the parent goes away, however it
died, the control socket reaches end-of-file and the fork server kills every worker's
group before it exits. Each worker's exit status goes back on that worker's own status
socket.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import struct
import sys

STATUS = struct.Struct("<ii")  # (pid, wait status); pid -errno when the fork failed
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except Exception:  # pragma: no cover - no prctl: the fork server still kills them
        pass


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


#: Set in each worker's environment, which what its tasks start inherits: an adopted
#: process names the worker it came from.
OWNER = "ASYNCPOOL_WORKER_PID"


def _owner(pid: int) -> int | None:
    """The worker an adopted process came from, if its environment says."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(OWNER.encode() + b"="):
                    return int(entry.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _orphans_of_gone_workers(children: dict[int, socket.socket]) -> list[int]:
    """Adopted processes whose worker is gone (or unknown): not one a task of a live
    worker started and left running."""
    return [pid for pid in _adopted(children) if _owner(pid) not in children]


def _adopted(known: dict[int, socket.socket]) -> list[int]:
    """Processes this fork server adopted (as a subreaper): what a task started in a
    session of its own, whose parent is gone. Linux only (it reads /proc)."""
    me = os.getpid()
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) in known:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(name))
    return found


def _worker(sock_fd: int, progress_fd: int, parent: int, wake_fd: int) -> None:
    """In the forked child: become a worker and never return."""
    code = 1
    try:
        os.setpgid(0, 0)
        for fd in (sock_fd, wake_fd):  # received, they are inherited: a task that runs
            if fd >= 0:  # another program (exec) would keep its connection open
                os.set_inheritable(fd, False)
        _die_with_parent()
        if os.getppid() != parent:  # the fork server died before prctl took hold
            os._exit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import mmap

        from asyncpool import _worker

        progress = None
        if progress_fd >= 0:
            area = mmap.mmap(progress_fd, 32)  # _forkserver.PROGRESS_BYTES
            os.close(progress_fd)
            progress = memoryview(area).cast("q")
        sock = socket.socket(fileno=sock_fd)
        code = _worker.serve(sock, progress, {OWNER: str(os.getpid())}, wake_fd)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    control_fd = int(sys.argv[1])
    # Keyboard interrupts are the parent's to handle; workers are stopped by it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What a task starts in a session of its own is reparented here, not to init,
    # when its parent dies: so it can be stopped with the worker.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # Stopped (SIGSTOP) when the parent dies, it would read nothing, and the workers
    # (whose death signal is tied to this process) ran on: the parent's death wakes it.
    _prctl(PR_SET_PDEATHSIG, signal.SIGCONT)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control = socket.socket(fileno=control_fd)
    # What every worker needs, imported once.
    import ctypes  # noqa: F401  (prctl)
    import mmap  # noqa: F401

    import asyncpool._worker  # noqa: F401

    children: dict[int, socket.socket] = {}
    # Imported while idle, so that later workers start with them: `site` (skipped at
    # start for speed) brings the import hooks of .pth files, cloudpickle loads
    # functions sent by value.
    preload: list[str] = ["site", "cloudpickle"]
    me = os.getpid()
    try:
        while True:
            ready = select.select([control.fileno(), wake_r], [], [],
                                  None if not preload else 0.05)[0]
            if not ready and preload:
                _import(preload.pop(0))
                continue
            if wake_r in ready:
                os.read(wake_r, 4096)
                _reap(children)
            if control.fileno() not in ready:
                continue
            try:
                message, fds, _, _ = socket.recv_fds(control, 4096, 4)
            except OSError:
                message, fds = b"", []
            if not message:
                # The parent is gone (or closed us): its workers go too.
                _stop_all(children)
                os._exit(0)
            op, *names = message.decode().split("\0")
            if op == "preload":
                preload.extend(names)
            elif op == "fork":
                sock_fd, status_fd, progress_fd, wake_fd = (fds + [-1] * 4)[:4]
                status = socket.socket(fileno=status_fd)
                try:
                    pid = os.fork()
                except OSError as exc:
                    with contextlib.suppress(OSError):  # the parent may be gone
                        status.send(STATUS.pack(-(exc.errno or 1), 0))
                    status.close()
                    _close(sock_fd, progress_fd, wake_fd)
                    continue
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    control.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    status.close()
                    for other in children.values():
                        other.close()
                    _worker(sock_fd, progress_fd, me, wake_fd)
                _close(sock_fd, progress_fd, wake_fd)  # (the worker's now)
                children[pid] = status  # stopped with the others, told or not
                try:
                    status.send(STATUS.pack(pid, 0))
                except OSError:  # the pool gave it up before its fork (or is gone)
                    _kill_group(pid)
    finally:
        # Whatever went wrong here (a parent gone as it was told of a fork: a
        # BrokenPipeError), the workers and what they started go too; never in a
        # forked child.
        if os.getpid() == me:
            _stop_all(children)
            os._exit(0)


def _import(name: str) -> None:
    try:
        if name == "site":
            from asyncpool._execute import load_site

            load_site()
        else:
            importlib.import_module(name)
    except BaseException:
        pass


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _kill_group(pid: int) -> None:
    """SIGKILL ``pid``'s process group (what a worker started) and ``pid`` itself."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _stop_all(children: dict[int, socket.socket], grace: float = 5.0) -> None:
    """Kill every worker's group, then what they started in sessions of their own,
    which this process adopts as each worker dies; until no child is left (or
    ``grace`` seconds passed: a process in uninterruptible sleep cannot be waited for)."""
    import time

    for pid in children:
        _kill_group(pid)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(children)
        for pid in _adopted(children):
            _kill_group(pid)
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # none left
        time.sleep(0.005)


def _reap(children: dict[int, socket.socket]) -> None:
    """Reap every child that exited, reporting workers' exit statuses."""
    reaped = False
    while True:
        try:
            # Look before reaping: while the worker is a zombie its pid (and so its
            # process group's id) cannot be reused, so killing the group is safe.
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            break
        if found is None:
            break
        pid = found.si_pid
        if pid in children:
            # Whatever the worker started dies with it (killed while the worker is a
            # zombie, so its group's id cannot have been reused).
            _kill_group(pid)
        _, status = os.waitpid(pid, 0)
        sock = children.pop(pid, None)
        reaped = True
        if sock is None:
            continue  # an adopted orphan, already killed: what it started is adopted now
        try:
            sock.send(STATUS.pack(pid, status))
        except OSError:
            pass
        sock.close()
    if reaped:
        # A worker (or an orphan of one) left: what it started in sessions of their own
        # was adopted here (what live workers' tasks started and left is theirs to keep).
        for pid in _orphans_of_gone_workers(children):
            _kill_group(pid)


if __name__ == "__main__":
    main()
