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
        #: A copy of each standard descriptor, to reopen it if a task closed it.
        self.fds: dict[int, int] = {}
        for fd in (0, 1, 2):
            try:
                self.fds[fd] = os.dup(fd)  # (not inherited)
            except OSError:
                pass
        self.streams = {"stdout": sys.stdout, "stderr": sys.stderr}

    def restore(self) -> None:
        """Put back what a task changed (nothing is done where nothing changed)."""
        for number, handler in self.handlers.items():
            try:
                if signal.getsignal(number) is not handler:
                    signal.signal(number, handler)
            except (OSError, TypeError, ValueError):
                pass
        for fd, copy in self.fds.items():
            try:
                os.fstat(fd)
            except OSError:  # closed (one a task opened there since is its own: kept)
                try:
                    os.dup2(copy, fd)
                except OSError:
                    pass  # its copy was closed too (os.closerange): left as it is
        for (name, stream), fd in zip(self.streams.items(), (1, 2), strict=True):
            if stream is None or (getattr(sys, name) is stream and not _closed(stream)):
                continue  # (none at start: its descriptor may be another file, kept)
            if _closed(stream):  # closed or detached: a new one on the same descriptor
                try:
                    stream = self.streams[name] = open(fd, "w", buffering=1, closefd=False)
                except OSError:
                    continue
            setattr(sys, name, stream)


def _closed(stream: Any) -> bool:
    """Whether ``stream`` can no longer be written (a detached one raises)."""
    try:
        return bool(stream.closed)
    except Exception:
        return True
