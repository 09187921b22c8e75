"""The parent's side of the fork server (:mod:`asyncpool._zygote`).

One fork server per interpreter, started by the first process rung and shared by every
pool after it (on any event loop or thread). Asking it for a worker is one message on
its control socket carrying the new worker's three descriptors: the worker's socket,
a status socket on which the fork server reports the worker's pid and later its exit
status, and a 32-byte shared memory area where the worker notes what it is running
(read by the parent only after a crash). Nothing touches the file system.
"""

from __future__ import annotations

import array
import atexit
import errno
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any

from ._retry import RungUnavailable, RungUnsupported, is_transient

logger = logging.getLogger("asyncpool")

#: Size of each worker's progress area: four 64-bit numbers.
PROGRESS_BYTES = 32

# Started without `site` (-S) to start in a few milliseconds: it reads the parent's
# import path instead, led by the folder holding this package (which an editable
# install may make importable through a finder that -S would skip), from its stdin
# (on its command line, a long path was more than exec takes: E2BIG).
_BOOT = ("import os, sys; sys.path[:0] = os.fsdecode(sys.stdin.buffer.read()).split('\\0'); "
         "from asyncpool._zygote import main; main()")


class ForkServerBusy(BlockingIOError):
    """The fork server's control socket is full: a few hundred requests it has not read
    yet (room comes as it reads on, unless it is stopped)."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "the fork server has not read its requests yet")


class Spawned:
    """A worker just asked for: its socket, its status socket, its progress area and
    its wake-up pipe's end to write (see Proc.send)."""

    __slots__ = ("sock", "status", "progress", "server", "wake")

    def __init__(self, sock: socket.socket, status: socket.socket, progress: Any,
                 server: ForkServer, wake: int) -> None:
        self.sock, self.status, self.progress, self.server = sock, status, progress, server
        self.wake = wake


#: What a system that lacks the fork server's sockets says (any other error, EMFILE
#: say, passes: a process rung taken for unsupported was never tried again).
_UNSUPPORTED = {errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EOPNOTSUPP,
                errno.EAFNOSUPPORT, errno.EPROTOTYPE, errno.EINVAL}


#: What exec takes of one variable ("name=value" and its NUL).
_ONE_VARIABLE = 1 << 17


def _for_exec(command: list[str]) -> dict[str, str]:
    """The environment the fork server starts with ``command``: without the variables
    exec cannot take (E2BIG: no worker could start), the longest first. Workers get the
    pool's whole environment from the pool itself (restoring thousands of variables one
    by one took each worker seconds: only what exec cannot take is left out)."""
    # Exec takes strings and their pointers up to a quarter of the stack's limit, at
    # most 6 MiB: the command's share first, a margin. (SC_ARG_MAX says that quarter,
    # but never less than 128 KiB: under a smaller stack, what exec takes fills it, and
    # the new interpreter crashed.)
    import resource  # (POSIX: here, so the package imports where it is missing)

    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    most = min(6 << 20, os.sysconf("SC_ARG_MAX"), (1 << 62) if stack == resource.RLIM_INFINITY
               else stack // 4) - (8 << 10) - sum(len(os.fsencode(arg)) + 9 for arg in command)
    sizes = sorted(((len(os.fsencode(k)) + len(os.fsencode(v)) + 2, k) for k, v in
                    os.environ.items()), reverse=True)
    total = sum(size + 8 for size, _ in sizes)
    dropped = set()
    for size, name in sizes:
        if size <= _ONE_VARIABLE and total <= most:
            break
        dropped.add(name)
        total -= size + 8
    return {k: v for k, v in os.environ.items() if k not in dropped}


class ForkServer:
    """A running fork server."""

    _lock = threading.Lock()
    _current: ForkServer | None = None
    _hooks = False
    #: The interpreter is exiting: the fork server and its workers are being stopped.
    exiting = False

    def __init__(self) -> None:
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except (OSError, AttributeError) as exc:  # macOS has no SOCK_SEQPACKET
            if isinstance(exc, OSError) and exc.errno not in _UNSUPPORTED:
                raise  # out of descriptors or memory for now: tried again later
            raise RungUnsupported(f"this system has no AF_UNIX SOCK_SEQPACKET sockets, "
                                  f"which the fork server needs ({exc})") from exc
        try:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = [here, *(p for p in sys.path if p != here)]
            # The interpreter's own options (-O, -W, -X), as a spawned process has them.
            flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
            command = [sys.executable, *flags, "-S", "-c", _BOOT, str(child.fileno())]
            # In a file, not a pipe: a path over 64 KiB waited for it to read, and it
            # stopped (SIGSTOP) as it started froze the loop. Entries that are not
            # paths (None, say) are skipped, as imports skip them.
            with (os.fdopen(os.memfd_create("asyncpool-path"), "w+b")  # no file system
                  if hasattr(os, "memfd_create") else tempfile.TemporaryFile()) as stdin:
                stdin.write(b"\0".join(os.fsencode(p) for p in path
                                       if isinstance(p, str | bytes | os.PathLike)))
                stdin.seek(0)
                # Its own session: a Ctrl-C in the terminal is the parent's to handle,
                # and a worker that writes to the terminal is not stopped (SIGTTOU) as a
                # background job would be.
                self.process = subprocess.Popen(command, pass_fds=(child.fileno(),),
                                                stdin=stdin, env=_for_exec(command),
                                                start_new_session=True)
        except OSError as exc:
            parent.close()
            if is_transient(exc):
                raise  # out of processes or memory for now: tried again later
            raise RungUnavailable(f"the fork server could not start ({exc})") from exc
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.control = parent

    @classmethod
    def spawn(cls) -> Spawned:
        """Ask for a new worker, starting (or restarting) the fork server if needed.

        Blocks for the start of the fork server (a few ms, once); raises OSError
        (EAGAIN when no process can be created) if it cannot start.
        """
        for attempt in range(2):
            with cls._lock:
                server = cls._current
                if server is None or server.process.poll() is not None:
                    if server is not None:
                        server.close()
                    server = cls._current = cls()
                    cls._install_hooks()
            try:
                return server._fork()
            except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                if attempt:
                    raise
                with cls._lock:
                    if cls._current is server:
                        server.close()
                        cls._current = None
        raise AssertionError("unreachable")

    def _fork(self) -> Spawned:
        made: list[socket.socket] = []
        wake: tuple[int, ...] = ()
        try:
            made += [*socket.socketpair(), *socket.socketpair()]
            wake = os.pipe()
            fd, progress = _progress_area()
        except BaseException:  # out of descriptors: none is kept (by a traceback)
            for sock in made:
                sock.close()
            for end in wake:
                os.close(end)
            raise
        ours, theirs, status, status_theirs = made
        os.set_blocking(wake[1], False)
        try:
            # Not blocking: a stopped fork server (SIGSTOP) stops reading, and the
            # loop froze once a few hundred requests filled its socket (a full socket
            # is ForkServerBusy: the caller waits for room, within its own time).
            # (socket.send_fds drops its flags: sendmsg itself.)
            fds = array.array("i", [theirs.fileno(), status_theirs.fileno(), fd, wake[0]])
            try:
                self.control.sendmsg([b"fork"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  fds)], socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise ForkServerBusy from None
        except BaseException:
            ours.close()
            status.close()
            os.close(wake[1])
            raise
        finally:
            theirs.close()
            status_theirs.close()
            os.close(fd)
            os.close(wake[0])
        ours.setblocking(False)
        status.setblocking(False)
        return Spawned(ours, status, progress, self, wake[1])

    def alive(self) -> bool:
        return self.process.poll() is None

    def preload(self, modules: list[str]) -> None:
        """Have later workers start with these modules already imported."""
        try:
            self.control.send("\0".join(["preload", *modules]).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    @classmethod
    def current(cls) -> ForkServer | None:
        return cls._current

    def close(self) -> None:
        """Stop the fork server; it kills every worker it forked that is still alive."""
        try:
            self.control.close()
        except OSError:
            pass
        # Stopped (SIGSTOP), it would be killed after 5 s, and what the workers started
        # left running: it goes on, and stops them all.
        self.process.send_signal(signal.SIGCONT)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - it did not exit
            self.process.kill()
            self.process.wait()

    @classmethod
    def _install_hooks(cls) -> None:
        if cls._hooks:
            return
        cls._hooks = True
        atexit.register(cls._at_exit)
        # A child forked by the application must not hold the control socket open, or
        # the fork server would not notice when this process dies.
        os.register_at_fork(after_in_child=cls._after_fork)

    @classmethod
    def _at_exit(cls) -> None:
        cls.exiting = True
        server, cls._current = cls._current, None
        if server is not None:
            try:
                server.close()
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: its control socket is closed, it stops on its own

    @classmethod
    def _after_fork(cls) -> None:
        server, cls._current = cls._current, None
        if server is not None:
            try:
                server.control.close()
            except OSError:
                pass


def _progress_area() -> tuple[int, Any]:
    """A 32-byte area shared with one worker: (chunk number, position of the item
    running or -1, id of the function being loaded or 0, unused)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("asyncpool-progress", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux: an unlinked temporary file
        handle = tempfile.TemporaryFile()
        fd = os.dup(handle.fileno())
        handle.close()
    try:
        os.ftruncate(fd, PROGRESS_BYTES)
        area = mmap.mmap(fd, PROGRESS_BYTES)
    except BaseException:
        os.close(fd)
        raise
    view = memoryview(area).cast("q")
    view[0] = view[1] = -1
    view[2] = 0
    return fd, view
