"""One worker process as the parent sees it: its socket, its chunks, its death.

Everything here runs on the event loop, in callbacks on the worker's sockets, and nothing
blocks. A worker runs its chunks in order: its messages are about the oldest it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import _wire
from .._errors import exit_described
from .._forkserver import ForkServer, Spawned
from .._rebalance import Pace, has_waiting
from .._remote import decode_error
from .._retry import RungUnavailable
from .._zygote import STATUS
from ._death import Death, ForkServerGone, ProcState, Reach, running, stopped, watch_exit
from ._inbox import Inbox, Loaded, Unpacked, unpack

if TYPE_CHECKING:
    from .._call import Chunk
    from .._loop import Loop

logger = logging.getLogger("asyncpool")

#: How long (s) a worker about to be killed for a cancelled call's item has to send
#: what finished before that item (it does so within milliseconds when it can).
HAND_OVER_SECONDS = 0.25


class Events:
    """What a worker tells its rung (the rung implements these)."""

    def proc_ready(self, proc: Proc) -> None: ...
    def proc_results(self, proc: Proc, chunk: Chunk, meta: _wire.ResultMeta,
                     results: list[Any] | BaseException, errors: dict[int, BaseException],
                     nbytes: int) -> None: ...
    def proc_retiring(self, proc: Proc) -> None: ...
    def proc_withdrawn(self, proc: Proc, chunk: Chunk) -> None: ...
    def proc_cut(self, proc: Proc, chunk: Chunk, keep: int) -> None: ...
    def proc_dead(self, proc: Proc, death: Death) -> None: ...
    def proc_changed(self, proc: Proc) -> None: ...


class Proc:
    """A worker process: fork server child, pid known once the fork server answers."""

    def __init__(self, spawned: Spawned, events: Events, loop: Loop) -> None:
        self.sock, self.status, self.wake = spawned.sock, spawned.status, spawned.wake
        self.progress, self.server = spawned.progress, spawned.server
        self.events, self.loop = events, loop
        self.pid: int | None = None
        self.forked_at = 0.0  # when the fork server said its pid (monotonic)
        self.state = ProcState.STARTING
        #: Chunks sent and not finished, oldest (the running one) first.
        self.chunks: deque[Chunk] = deque()
        self.heard = 0.0  # when it last reported progress (or took up a new chunk)
        #: Function ids this worker holds, and ids it should drop.
        self.functions, self.forget = set[int](), list[int]()
        self.tasks = 0  # items sent to it, for max_tasks_per_worker
        self.pace = Pace()  # how its running chunk goes (see _rebalance)
        self.withdrawing: set[int] = set()  # chunks asked back (see withdraw), by seq
        #: Calls whose items running here are to be killed (see kill_doomed).
        self.doomed, self.doomed_since = set[int](), 0.0
        #: Killed; asked to leave (closed, retired): an exit is no surprise.
        self.killed = self.asked_to_leave = False
        self.init_error: BaseException | None = None
        self.ready_rss = 0  # its memory (bytes) once ready, when there is a ceiling
        self.started = loop.event()
        self._reader = _wire.FrameReader()
        #: Its messages in order (see _inbox); ``inbox.holding``: gone, its death held.
        self.inbox = Inbox(self._on_frame, self)
        #: What is still to be written to its socket (see ProcessRung._pick).
        self.outbox: deque[memoryview] = deque()
        self._stops: list[Callable[[], object]] = []
        self._writing: Callable[[], object] | None = None
        self._urgent = False  # written: the worker's watcher is woken once it is out
        self._exit_status: int | None = None
        self._reach: Reach | None = None  # signals to it, once its pid is known
        #: _orphaned: the fork server died before reporting this worker's exit.
        self._eof = self._buried = self._orphaned = False

    def attach(self, events: Events, loop: Loop) -> None:
        """Start listening on ``loop`` (a fresh worker, or one taken from the park)."""
        self.events, self.loop = events, loop
        self._stops = [loop.watch_readable(self.sock.fileno(), self._on_readable),
                       loop.watch_readable(self.status.fileno(), self._on_status)]

    def detach(self) -> None:
        for stop in self._stops:
            stop()
        self._stops = []
        if self._writing is not None:
            self._writing()
            self._writing = None

    # -- sending -------------------------------------------------------------------

    def send(self, kind: int, parts: list[Any]) -> None:
        if self._reach and os.getpid() != self._reach.owner:
            return  # a process forked from the pool's: the worker is not its own
        views = [memoryview(b).cast("B") for b in _wire.frame(kind, parts)]
        self.outbox.extend(v for v in views if v.nbytes)
        self._urgent = self._urgent or kind in (_wire.CANCEL, _wire.WITHDRAW)
        if self._writing is None:
            self._flush()

    def _flush(self) -> None:
        outbox, budget = self.outbox, _wire.TURN_BYTES
        while outbox and budget > 0:
            try:
                sent = self.sock.sendmsg(list(outbox)[:64])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                outbox.clear()  # the worker is gone: its death is reported elsewhere
                break
            budget -= sent
            while sent:
                if sent >= outbox[0].nbytes:
                    sent -= outbox.popleft().nbytes
                else:
                    outbox[0] = outbox[0][sent:]
                    sent = 0
        if outbox and self._writing is None and self.state is not ProcState.DEAD:
            self._writing = self.loop.watch_writable(self.sock.fileno(), self._flush)
        elif not outbox and self._writing is not None:
            self._writing()
            self._writing = None
            self.events.proc_changed(self)
        if self._urgent and not outbox:
            self._urgent = False
            with contextlib.suppress(OSError):  # full: it is woken already
                os.write(self.wake, b"!")

    # -- receiving -----------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._reader.read(self.sock, self.inbox.put):
            self._eof = True
            self._stop_reading()
            if not self.server.alive():  # else its exit status follows at once
                self._orphaned = True
            if self._exit_status is not None or self._orphaned:
                self._dead()
            elif self.pid is not None:
                self._on_status()  # its exit, if already said
                if self.state is not ProcState.DEAD and not self.killed and (
                        self.state is not ProcState.RETIRING) and running(self.pid):
                    # Alive, it closed its end (a task closed the descriptors it
                    # inherited, as daemons do): stopped, as a crash of what it runs.
                    logger.debug("worker %s closed its connection to the pool while "
                                 "running: stopped", self.pid)
                    self._sigkill()
                if self.state is not ProcState.DEAD:
                    # Its exit not said yet: a stopped fork server (SIGSTOP) never says
                    # it (the death went unseen for good; a kill, or a close, waited
                    # for it). Read where it lies meanwhile.
                    self.loop.spawn(watch_exit, self)

    def _stop_reading(self) -> None:
        if self._stops:
            self._stops[0]()
            self._stops[0] = lambda: None

    def _on_status(self) -> None:
        if self._exit_status is not None:
            return  # said: its end-of-file is no fork server's death
        while True:
            try:
                data = self.status.recv(STATUS.size * 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                if self.state is not ProcState.DEAD:
                    # The fork server is gone: nobody will report this worker's exit,
                    # or stop what it started.
                    self._orphaned = True
                    self._exit_status = -1
                    self._drain_and_die()
                return
            for at in range(0, len(data) - len(data) % STATUS.size, STATUS.size):
                pid, status = STATUS.unpack_from(data, at)
                if self.pid is None:
                    if pid < 0:
                        # The fork server could not fork (EAGAIN: out of processes).
                        self.init_error = OSError(-pid, os.strerror(-pid))
                        self._dead()
                        return
                    self.pid, self.forked_at = pid, time.monotonic()
                    self._reach = Reach(pid)
                    if self.killed:  # killed before its pid was known
                        self.kill()
                else:
                    self._exit_status = status
                    self._drain_and_die()
                    return

    def _drain_and_die(self) -> None:
        # What the worker sent before it died is in the socket: read it first.
        if not self._eof:
            self._reader.read(self.sock, self.inbox.put)
        self._dead()

    def _on_frame(self, kind: int, parts: list[Any], unpacked: Unpacked | None) -> None:
        if kind == _wire.RESULTS:
            self._on_results(*(unpacked or unpack(parts)),
                             sum(memoryview(part).nbytes for part in parts[1:]))
        elif kind == _wire.READY:
            self.ready_rss = pickle.loads(parts[0])
            if self.state is ProcState.STARTING:
                self.state = ProcState.READY
            self.started.set()
            self.events.proc_ready(self)
        elif kind == _wire.WITHDRAWN:
            for seq in _wire.loads(parts):
                chunk = next((c for c in self.chunks if c.seq == seq), None)
                self.withdrawing.discard(seq)
                if chunk is not None:
                    self._release(chunk, ran=0)
                    self.events.proc_withdrawn(self, chunk)
        elif kind == _wire.CUT:
            seq, keep = _wire.loads(parts)
            chunk = next((c for c in self.chunks if c.seq == seq), None)
            if chunk is not None and keep < chunk.size:
                self.tasks -= chunk.size - keep
                self.events.proc_cut(self, chunk, keep)
        elif kind == _wire.INIT_FAILED:
            blob, text = pickle.loads(parts[0])
            self.init_error = decode_error(blob, text)
            self.started.set()

    def _on_results(self, meta: _wire.ResultMeta, errors: dict[int, BaseException],
                    loaded: Loaded | None, size: int) -> None:
        seq, first, done = meta.seq, meta.first, meta.done
        if not self.chunks:  # pragma: no cover - a worker never answers unasked
            return
        chunk = self.chunks[0]
        if chunk.seq != seq:  # never seen: a worker answers for the chunk it runs
            found = next((c for c in self.chunks if c.seq == seq), None)
            logger.warning("worker %s sent results of chunk %s, not of %s at the head of "
                           "its queue (%s)", self.pid, seq, chunk.seq,
                           "found further back" if found else "not held")
            if found is None:
                return
            chunk = found
        results: list[Any] | BaseException
        if meta.arguments_unloadable or loaded is None:
            results = errors.pop(0)
        elif isinstance(loaded, BaseException):  # the results' own code ran: SystemExit too
            results = loaded
        else:
            results, errors_here = loaded
            errors.update((first + p, e) for p, e in errors_here.items())
        self.heard = time.monotonic()
        if done:  # cut short at upto (the rest runs elsewhere); unloadable: at 0
            self._release(chunk, ran=meta.upto)
        if meta.retiring and self.state is not ProcState.DEAD:
            self.state = ProcState.RETIRING
            self.events.proc_retiring(self)
        self.events.proc_results(self, chunk, meta, results, errors, size)

    def _dead(self, unreaped: bool = False) -> None:
        """Gone; ``unreaped``: its exit read where the kernel keeps it."""
        if self._buried:
            return
        if self.inbox.hold(lambda: self._dead(unreaped), self.killed):
            self.detach()  # (its exit is known: its status socket says no more)
            self.events.proc_changed(self)  # (replaced meanwhile)
            return
        self._buried = True
        was_starting = self.state is ProcState.STARTING
        retiring = self.state is ProcState.RETIRING
        self.state = ProcState.DEAD
        self.detach()
        self.outbox.clear()
        if self._reach is not None:
            if self._orphaned or unreaped:  # its fork server died, or is stopped: nobody
                self._reach.kill(group_only=True)  # else stops what this worker started
            self._reach.close()
        for closable in (self.sock, self.status):
            with contextlib.suppress(OSError, ValueError):
                self.loop.closing(closable.fileno())
                closable.close()
        with contextlib.suppress(OSError):
            os.close(self.wake)  # (then never written: its number may be reused)
        self.wake = -1
        status = self._exit_status
        exitcode = None if status is None or status < 0 else os.waitstatus_to_exitcode(status)
        chunks = list(self.chunks)
        for chunk in chunks:
            self._release(chunk, ran=chunk.size)
        death = Death(chunks, exitcode, self._orphaned)
        death.read(self.progress, self.killed or retiring or ForkServer.exiting)
        # Not asked, nor gone with the fork server (killed, or stopped at exit).
        death.unasked = not (self.killed or retiring or was_starting or self.asked_to_leave
                             or self._orphaned or ForkServer.exiting)
        if was_starting:
            if self.init_error is None:  # (with its fork server: not the initializer)
                self.init_error = (ForkServerGone if self._orphaned or ForkServer.exiting
                                   else RungUnavailable)(f"the worker died before it was "
                                                         f"ready ({exit_described(exitcode)})")
            self.started.set()
        self.events.proc_dead(self, death)

    def _release(self, chunk: Chunk, ran: int) -> None:
        """``chunk`` leaves the worker, the one way out (finished, perhaps cut short;
        handed back; its death), ``ran`` of its items run here (for its task count)."""
        if self.chunks[0] is chunk:
            self.pace.start(time.monotonic())  # the next chunk starts
        self.chunks.remove(chunk)
        self.withdrawing.discard(chunk.seq)
        self.tasks -= chunk.size - ran
        if self.doomed:
            self.doomed &= {p.call.id for c in self.chunks for p in c.pieces}

    def take(self, chunk: Chunk, parts: _wire.Parts, functions: Iterable[int]) -> None:
        """Send it ``chunk`` as ``parts``, shipping ``functions`` (and what to forget)."""
        self.functions.update(functions)
        self.forget = []
        if not self.chunks:
            self.heard = time.monotonic()
            self.pace.start(self.heard)
        self.chunks.append(chunk)
        self.tasks += chunk.size
        self.send(_wire.CHUNK, parts)

    def drop_function(self, fn_id: int) -> None:
        """No call needs the function any more: the next chunk says so."""
        if fn_id in self.functions:
            self.functions.discard(fn_id)
            self.forget.append(fn_id)

    def doom(self, calls: set[int]) -> None:
        """Kill it should it run an item of ``calls`` (see kill_doomed)."""
        if not self.doomed:
            self.doomed_since = time.monotonic()
        self.doomed.update(calls)
        self.kill_doomed()

    def take_back(self, stuck: float) -> None:
        """Ask for the items waiting here if nothing was heard since ``stuck``."""
        if self.state is ProcState.READY and has_waiting(self.chunks, self.progress) and (
                self.heard < stuck):
            self.withdraw(self.chunks)

    def withdraw(self, chunks: Iterable[Chunk]) -> None:
        """Ask the worker for ``chunks``: one not started comes back whole (WITHDRAWN),
        the running one is cut after its item (CUT; asked again if it could not be)."""
        seqs = [c.seq for c in chunks if c.seq not in self.withdrawing]
        if seqs and self.state is ProcState.READY:
            self.withdrawing.update(s for s in seqs if s != self.chunks[0].seq)  # (its own)
            self.send(_wire.WITHDRAW, _wire.dumps(seqs))

    # -- stopping ------------------------------------------------------------------

    def kill_doomed(self) -> None:
        """Kill the worker if the item it runs is a doomed call's (cancelled or timed
        out, with kill), or it loads a chunk only such calls have: never while another
        caller's item runs; items of those calls not started are skipped (cancelled)."""
        if not self.doomed or not self.chunks or self.state is ProcState.DEAD:
            return
        seq, position = int(self.progress[_wire.SEQ]), int(self.progress[_wire.POSITION])
        # The chunk it runs may be one we have not heard it start yet.
        chunk = next((c for c in self.chunks if c.seq == seq), None)
        if chunk is not None and position == -1:  # loading (which may never end)
            if all(p.call.id in self.doomed for p in chunk.pieces):
                self.kill()
        elif chunk is not None and 0 <= position < chunk.size:
            piece, _ = chunk.locate(position)
            # What finished before it comes back first (the worker sends it on reading
            # the cancellation): killed with the worker, it would run again.
            if piece.call.id in self.doomed and (chunk.reported >= position or (
                    time.monotonic() >= self.doomed_since + HAND_OVER_SECONDS)):
                self.kill()

    def kill_stuck(self) -> None:
        """kill_doomed; and kill the worker if it was stopped (SIGSTOP) before it began
        its next chunk's first item: the chunks it holds go elsewhere, none started."""
        self.kill_doomed()
        if (self.state is ProcState.READY and self.chunks and self.pid and not self.killed
                and time.monotonic() - self.heard > HAND_OVER_SECONDS
                and (int(self.progress[_wire.SEQ]) not in {c.seq for c in self.chunks}
                     or self.progress[_wire.POSITION] < 0)  # (loading it, say)
                and stopped(self.pid)):
            self.kill()

    def retire(self) -> None:
        """Leave now, idle (its replacement is ready)."""
        if self.state is ProcState.READY and not self.chunks:
            self.state = ProcState.RETIRING
            self.close()

    def kill(self) -> None:
        """SIGKILL the worker's process group: the worker and whatever it started. One
        not forked yet (its fork server stopped, say) is gone for the pool at once."""
        self.killed = True
        self.inbox.hurry()  # a death seen already waits no longer than a moment
        if self.pid is None:
            self._on_status()  # its pid, if said meanwhile (then it is killed there)
        if self.pid is None:  # forked later, its status socket is closed: the fork
            self._dead()  # server kills it (and it leaves, finding its connection closed)
        self._sigkill()

    def _sigkill(self) -> None:
        if self._reach and self._exit_status is None and self.state is not ProcState.DEAD:
            self._reach.kill()

    def close(self) -> None:
        """Ask the worker to leave (it reads end-of-file), keeping the status watch."""
        self.asked_to_leave = True
        if self.state is ProcState.DEAD:
            return
        self._stop_reading()
        if self._writing is not None:
            self._writing()
            self._writing = None
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)
        self.resume()  # (one stopped would not read it)
        if self.pid is not None and self._stops:  # (not parked: its loop may be gone)
            self.loop.spawn(watch_exit, self)  # (it stops reading: see _on_readable)

    def resume(self) -> None:
        if self._reach is not None:
            self._reach.resume()

    def exited(self) -> bool:
        return self.state is ProcState.DEAD

    def exit_seen(self, status: int | None) -> None:
        """Its exit status, if said or ``status`` (read where the kernel keeps it)."""
        self._on_status()
        if status is not None and self.state is not ProcState.DEAD:
            self._exit_status = status
            self._dead(unreaped=True)

    def __repr__(self) -> str:
        return f"<Proc {self.pid} {self.state.value} chunks={len(self.chunks)}>"

