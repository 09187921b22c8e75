"""What a worker process holds for every task, put back after each chunk.

A worker runs many tasks, and its globals are theirs to share (a cache, a model). But
some process state is not data a task means to leave behind: a task that closes its
standard descriptors (as a daemonizing library does) made every later ``print`` in
that worker fail, and one that set ``SIGCHLD`` to ``SIG_IGN`` made every later
``subprocess.run`` report exit code 0, silently. The worker notes these once it is
ready (after the initializer: what that sets stays) and puts them back after each
chunk: the signal dispositions of :data:`SIGNALS`, descriptors 0 to 2, and
``sys.stdout``/``sys.stderr``.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from typing import Any

#: The signals whose disposition is put back (those a task's library may change).
SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGCHLD", "SIGPIPE", "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGUSR1",
    "SIGUSR2") if hasattr(signal, name))


class Baseline:
    """The state noted when the worker was ready (see the module's docstring)."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}
        for number in SIGNALS:
            handler = signal.getsignal(number)
            if handler is not None:  # (None: set outside Python, cannot be set back)
                self.handlers[number] = handler
        #: Each standard descriptor's file (device, inode), and a copy to restore it.
        self.fds: dict[int, tuple[tuple[int, int], int]] = {}
        for fd in (0, 1, 2):
            try:
                st = os.fstat(fd)
                self.fds[fd] = ((st.st_dev, st.st_ino), os.dup(fd))  # (not inherited)
            except OSError:
                pass
        self.streams = {"stdout": sys.stdout, "stderr": sys.stderr}

    def restore(self) -> None:
        """Put back what a task changed (nothing is done where nothing changed)."""
        for number, handler in self.handlers.items():
            if signal.getsignal(number) is not handler:
                try:
                    signal.signal(number, handler)
                except (OSError, TypeError, ValueError):
                    pass
        for fd, (file, copy) in self.fds.items():
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == file:
                    continue
            except OSError:
                pass  # closed
            try:
                os.dup2(copy, fd)
            except OSError:
                pass  # its copy was closed too (os.closerange): left as it is
        for (name, stream), fd in zip(self.streams.items(), (1, 2), strict=True):
            if getattr(sys, name) is stream and not getattr(stream, "closed", False):
                continue
            if stream is None or getattr(stream, "closed", False):  # closed: a new one
                stream = self.streams[name] = open(fd, "w", buffering=1, closefd=False)
            setattr(sys, name, stream)
