"""The main loop of a worker process: chunks in from its socket, results out.

The fork server (:mod:`asyncpool._zygote`) forks the process and calls :func:`serve`.
Results go back in slices as items finish (every :data:`~asyncpool._execute.FLUSH_SECONDS`
at most), each chunk's items are noted in the progress area as they start, and
cancellations sent meanwhile are read between slices, so a chunk of a cancelled call
is skipped even when it was already waiting here. This module imports little.
"""

from __future__ import annotations

import functools
import os
import pickle
import select
import socket
import sys
import threading
import time

from . import _handover, _wire
from ._baseline import Baseline
from ._errors import SerializationError, pool_made
from ._execute import (FORKED, Unloadable, cut_after_running, dump_results, execute,
                       leave_if_forked, loads)
from ._remote import encode_error, encode_errors
from ._share import initialize, share_main

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable
    from collections.abc import Set as AbstractSet
    from typing import Any


class _Worker:
    """The state of one worker process between chunks."""

    def __init__(self, sock: socket.socket, progress: Any, settings: dict[str, Any],
                 wake: int = -1) -> None:
        self.sock = sock
        self.progress = progress
        #: Readable when the parent sent what cannot wait for the running item to end
        #: (a cancellation, chunks taken back): the watcher waits on it, not on the
        #: socket, so the chunks sent ahead (one per call, for a service) wake nobody.
        self.wake = wake
        if wake >= 0:
            os.set_blocking(wake, False)
        self.retries: int = settings["task_retries"]
        self.max_tasks: int | None = settings["max_tasks"]
        self.max_memory: int | None = settings["max_memory"]
        self.functions: dict[int, Callable[..., Any]] = {}
        #: Functions of the main script as loaded, by their pickle: shipped again for a
        #: later call (Shipped.kept), they are bound anew, not loaded again.
        self.loaded: dict[bytes, Any] = {}
        #: Calls cancelled, each with the last chunk read when it was: chunks come in
        #: order, so once a later one ends, none of that call is left and it goes (a
        #: service's timeouts must not pile up in a long-lived worker).
        self.cancelled: dict[int, int] = {}
        self.last_seq = 0
        self.inbox: list[tuple[int, _wire.Parts]] = []
        #: What chunks handed back unrun shipped (functions, ids to forget): later
        #: chunks count on it.
        self.shipped: list[_wire.Parts] = []
        #: The chunk running now: (its number, its runs), for the parent to cut short.
        self.running: tuple[int, list[Any]] | None = None
        self.tasks = 0
        #: A cancellation came in since the watcher last looked.
        self.cancel_seen = False
        self.retiring: str | None = None
        self.closed = False
        #: The socket is read here and by the handover watcher (while an item runs),
        #: and written by both: one lock for each direction.
        self.reading = threading.Lock()
        self.sending = threading.Lock()

    def next_frame(self) -> tuple[int, _wire.Parts] | None:
        with self.reading:
            if self.inbox:
                return self.inbox.pop(0)
            got = _wire.recv_frame(self.sock)
            if got is not None and got[0] == _wire.CHUNK:
                self.last_seq = _wire.CHUNK_HEAD.unpack(got[1][0])[0]
            return got

    def note_cancelled(self, parts: _wire.Parts) -> None:
        self.cancelled.update(dict.fromkeys(_wire.loads(parts), self.last_seq))

    def chunk_ended(self, seq: int) -> None:
        """Forget the cancelled calls that no chunk left here can hold."""
        if self.cancelled:
            for call in [c for c, upto in self.cancelled.items() if upto <= seq]:
                del self.cancelled[call]

    def poll(self, wait: bool = True) -> bool:
        """Take in what the parent sent meanwhile: cancellations act at once, and
        chunks it takes back (to give to an idle worker) are handed back unrun, or cut
        short after the item they run. False if the chunk's own thread is reading."""
        if not self.reading.acquire(wait):
            return False
        taken: list[int] = []
        try:
            while not self.closed:
                sock = self.sock.fileno()
                ready = select.select([sock] if self.wake < 0 else [sock, self.wake],
                                      [], [], 0)[0]
                if self.wake in ready:  # (read first: a wake-up for what follows stays)
                    self._woken()
                if sock not in ready:
                    break  # (a wake-up read: what it was for is read already)
                got = _wire.recv_frame(self.sock)
                if got is None:
                    self.closed = True
                elif got[0] == _wire.CANCEL:
                    self.note_cancelled(got[1])
                    self.cancel_seen = True
                elif got[0] == _wire.WITHDRAW:
                    wanted = set(_wire.loads(got[1]))
                    kept = []
                    for kind, parts in self.inbox:
                        seq: int = _wire.CHUNK_HEAD.unpack(parts[0])[0] if (
                            kind == _wire.CHUNK) else 0
                        if seq in wanted:
                            taken.append(seq)
                            head = _wire.CHUNK_HEAD.unpack(parts[0])
                            self.shipped.append(parts[1:1 + head[2]])
                        else:
                            kept.append((kind, parts))
                    self.inbox = kept
                    if self.running is not None and self.running[0] in wanted:
                        self._cut_running()
                else:
                    if got[0] == _wire.CHUNK:
                        self.last_seq = _wire.CHUNK_HEAD.unpack(got[1][0])[0]
                    self.inbox.append(got)
            if taken and not self.closed:
                # Said before the next chunk can be read: told after it had run (by
                # the chunk's thread meanwhile), the parent took that chunk's results
                # for those of one skipped.
                try:
                    self.send(_wire.WITHDRAWN, _wire.dumps(taken))
                except OSError:
                    self.closed = True
        finally:
            self.reading.release()
        return True

    def _woken(self) -> None:
        try:
            if not os.read(self.wake, 4096):
                self.wake = -1  # the parent's end closed: its socket says the rest
        except OSError:
            pass

    def _cut_running(self) -> None:
        """Cut the running chunk short after the item it runs, and tell the parent
        where, for an idle worker to run the rest now. When the running thread moved
        on meanwhile, where it stops is known only from its end report: nothing is
        told, and the parent sends the rest on then."""
        progress, running = self.progress, self.running
        if progress is None or running is None:
            return
        seq, runs = running
        keep = cut_after_running(runs, progress)
        if keep is None:
            return
        try:
            self.send(_wire.CUT, _wire.dumps((seq, keep)))
        except OSError:
            self.closed = True

    def look(self) -> bool:
        """The watcher's look: read what the parent sent. After a cancellation, what
        finished goes back at once: the parent may kill this worker for a cancelled
        call's item that runs now, and what finished must not die with it."""
        read = self.poll(wait=False)
        if self.cancel_seen:
            self.cancel_seen = False
            _handover.hand_over_now()
        return read

    def wait_for_parent(self, seconds: float) -> bool:
        """Wait until the parent sends something (True) or ``seconds`` pass."""
        if not self.closed:
            try:
                return bool(select.select([self.sock if self.wake < 0 else self.wake],
                                          [], [], seconds)[0])
            except (OSError, ValueError):
                pass
        time.sleep(seconds)
        return False

    def over_memory(self) -> bool:
        return self.max_memory is not None and _rss() > self.max_memory

    def run_chunk(self, parts: _wire.Parts) -> None:
        seq, flush, shipped = _wire.CHUNK_HEAD.unpack(parts[0])
        progress = self.progress
        if progress is not None:
            # Noted before anything is unpickled: an argument or a function whose
            # unpickling kills this process is then pinned on this chunk.
            progress[_wire.POSITION] = -1
            progress[_wire.LOADING] = 0
            progress[_wire.SEQ] = seq
        with self.reading:
            shipments, self.shipped = [*self.shipped, parts[1:1 + shipped]], []
        for shipment in shipments:
            # Numbers and bytes: this pickle always loads.
            functions, forget = _wire.loads(shipment)
            for fn_id in forget:
                self.functions.pop(fn_id, None)
            for fn_id, blob, buffers, kept in functions:
                if progress is not None:
                    progress[_wire.LOADING] = fn_id
                try:
                    key = bytes(blob) if kept else b""
                    loaded = self.loaded.get(key) if kept else None
                    if loaded is None:
                        loaded = loads(blob, buffers)
                        if kept:  # (each pickle at most 64 KB: _functions.KEPT_BYTES)
                            if len(self.loaded) >= 16:
                                self.loaded.clear()
                            self.loaded[key] = loaded
                    self.functions[fn_id] = share_main(loaded, None, fn_id)
                except BaseException as exc:
                    self.functions[fn_id] = Unloadable(exc)
        if progress is not None:
            progress[_wire.LOADING] = 0
        try:
            runs = loads(parts[1 + shipped], parts[2 + shipped:])
        except BaseException as exc:
            # An argument that pickled in the parent but does not load here.
            self.send_results(seq, 0, 0, [], {0: exc}, done=True, arguments_unloadable=True)
            return
        self.poll()
        calls = [(self.functions[f], star, call, items) for f, star, call, items in runs]

        def tick(first: int, upto: int, results: list[Any], errors: dict[int, BaseException],
                 end: tuple[list[float], int] | None) -> tuple[AbstractSet[int], bool]:
            self.tasks += upto - first
            if end is None:
                self.poll()
            if self.over_memory():
                self.retiring = "memory"
            elif end is not None and self.max_tasks is not None and (
                    self.tasks >= self.max_tasks):
                self.retiring = "tasks"
            # Memory over the ceiling stops the chunk after this item: the parent sends
            # the items that did not run to another worker.
            stop = end is None and (self.closed or self.retiring is not None)
            self.send_results(seq, first, upto, results, errors,
                              done=stop or end is not None, end=end or ([], 0))
            return self.cancelled.keys(), stop

        def late(first: int, upto: int, results: list[Any],
                 errors: dict[int, BaseException]) -> None:
            # From the watcher thread, while an item runs long: a death meanwhile may
            # be that item's or a result's (SENDING says so: see send_results).
            self.tasks += upto - first
            self.send_results(seq, first, upto, results, errors, done=False, running=True)

        self.running = (seq, calls)
        try:
            execute(calls, self.retries, tick, self.progress, self.cancelled.keys(), flush,
                    late)
        finally:
            self.running = None

    def send_results(self, seq: int, first: int, upto: int, results: list[Any],
                     errors: dict[int, BaseException], *, done: bool,
                     end: tuple[list[float], int] = ([], 0),
                     arguments_unloadable: bool = False, running: bool = False) -> None:
        if self.closed:
            return
        if arguments_unloadable:
            errors = {p: pool_made(SerializationError(f"{exc!r}")) for p, exc in errors.items()}
        if self.progress is not None:
            # A result or an error whose pickling kills this process (a __reduce__ that
            # exits, the OOM killer on a big one) is one of these, not the last run; or
            # (negative: sent while an item runs) one of these or that item.
            self.progress[_wire.SENDING] = -upto if running else upto
        try:
            meta = _wire.ResultMeta(seq, first, upto, encode_errors(errors), done, end,
                                    self.retiring, arguments_unloadable)
            self.send(_wire.RESULTS, [pickle.dumps(tuple(meta), 5), *dump_results(results)])
        except OSError:
            self.closed = True
        finally:
            if self.progress is not None:
                self.progress[_wire.SENDING] = 0

    def send(self, kind: int, parts: _wire.Parts) -> None:
        leave_if_forked()
        with self.sending:
            _wire.send_frame(self.sock, kind, parts)


def _rss() -> int:
    """Resident memory of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux: the peak is the best we have
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _settle_in(settings: dict[str, Any], own: dict[str, str]) -> None:
    """Work where the pool's process stood when its workers' rung started, with its
    environment and command line, as a spawned process would: forked from a fork
    server started for an earlier pool, a worker saw that pool's directory and
    environment (relative paths, settings made since, modules found through '' in
    sys.path went astray). A directory removed since is an error: the worker does not
    start (it ran in an earlier one)."""
    os.chdir(settings["cwd"])
    sys.argv = list(settings["argv"])  # (the fork server's own is "-c" and a descriptor)
    environ = {**settings["environ"], **own}
    for name in [name for name in os.environ if name not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            try:
                os.environ[name] = value
            except (OSError, ValueError):
                pass  # a name the C library refuses ("", or with "="): not passed on
    if hasattr(time, "tzset"):
        time.tzset()  # TZ as set (the C library read the fork server's)


def _closed(sock: socket.socket) -> bool:
    """Whether the parent closed its end (what it sent before is read)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def serve(sock: socket.socket, progress: Any, own: dict[str, str], wake: int = -1) -> int:
    """The worker's main loop; returns the exit code. ``own``: what its environment
    holds beside its pool's; ``wake``: see _Worker.wake."""
    got = _wire.recv_frame(sock)
    if got is None or got[0] != _wire.INIT or _closed(sock):
        return 0  # (forked late, after the pool gave it up: its initializer not run)
    settings = _wire.loads(got[1])
    try:
        _settle_in(settings, own)
    except OSError:
        return 1  # its directory was removed as it started: the parent says so
    for entry in reversed(settings["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    worker = _Worker(sock, progress, settings, wake)
    os.register_at_fork(after_in_child=functools.partial(FORKED.append, True))
    _handover.on_look = worker.look
    _handover.wait_for_parent = worker.wait_for_parent
    if settings["initializer"] is not None:
        try:
            initializer, initargs = loads(settings["initializer"])
            initialize(share_main(initializer), initargs)
        except BaseException as exc:
            try:
                worker.send(_wire.INIT_FAILED,
                            [pickle.dumps(encode_error(exc, "the initializer"), 5)])
            except OSError:
                pass
            return 0
    try:
        # Its memory once initialised: the parent warns if that is over the ceiling.
        worker.send(_wire.READY, [pickle.dumps(_rss() if worker.max_memory else 0, 5)])
    except OSError:
        return 0  # the parent closed us before we were ready: nothing to do
    baseline = Baseline()
    while worker.retiring is None and not worker.closed:
        try:
            got = worker.next_frame()
        except OSError:
            return 0  # the parent is gone: its end reset with our results unread
        if got is None:
            break
        kind, parts = got
        if kind == _wire.CHUNK:
            try:
                worker.run_chunk(parts)
            except OSError:
                return 0  # the parent is gone (or closed us) mid-chunk
            baseline.restore()
            worker.chunk_ended(_wire.CHUNK_HEAD.unpack(parts[0])[0])
        elif kind == _wire.CANCEL:
            worker.note_cancelled(parts)
    return 0
