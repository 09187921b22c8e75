"""The process rung: worker processes forked by the fork server, fed over sockets.

Each worker holds at most :data:`DEPTH` chunks (one running, the rest waiting in its socket).
A worker that dies takes only its own chunks down: the item it was running is named by the
progress area, what it had sent back stays delivered, and a replacement is forked (with
backoff when out of processes). Workers that reach ``max_tasks_per_worker`` or
``max_worker_memory`` retire after their chunk, replaced before they leave.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from .. import _wire
from .._call import Resend
from .._errors import InitializerFailed, exit_described
from .._execute import FLUSH_SECONDS
from .._forkserver import ForkServer, ForkServerBusy
from .._loop import preload
from .._rebalance import STUCK_SECONDS, has_waiting, overlong, work_held
from .._retry import RungUnavailable, RungUnsupported, is_transient
from ._parking import check_directory, directory, park, take_parked, worker_settings
from ._death import Death, ProcState, opening_done, opening_failure, opening_timed_out
from ._frames import chunk_frame, runs_of
from ._proc import HAND_OVER_SECONDS, Events, Proc
from ._recycling import IDLE_SECONDS, Recycling
from ._starts import Starts
from .base import ChunkUnpicklable, Listener, Rung, RungState, unpicklable_items

if TYPE_CHECKING:
    from .._call import Chunk
    from .._config import PoolConfig
    from .._loop import Background, Loop

logger = logging.getLogger("asyncpool")

#: Chunks a worker holds at once: one running, two waiting in its socket (a worker
#: whose loop is busy a few ms, with HTTP requests say, must not run dry meanwhile).
DEPTH = 3


class ProcessRung(Rung, Events):
    name = "process"

    def __init__(self, config: PoolConfig, listener: Listener, loop: Loop) -> None:
        super().__init__()
        self.config, self.listener, self.loop = config, listener, loop
        self.procs: list[Proc] = []
        self._seq, self._memory_warned = 0, False
        #: The task keeping the number of workers (see _supervise), and its wake-up.
        self._supervisor: Background | None = None
        self._nudge: Any = None
        self._looking = math.inf  # how often (s) the supervisor looks for stuck workers
        self._settings, self._park_key = worker_settings(config)
        self._directory = directory()
        #: A busy worker gets a third chunk only while what it holds should take at most
        #: this (s): DEPTH target-sized chunks (behind long items, one waits there).
        self._depth = DEPTH * config.target_chunk_seconds
        self._recycling = Recycling(config)
        #: Set when a worker dies (what closing waits for).
        self._death = loop.event()

    @classmethod
    async def create(cls, config: PoolConfig, listener: Listener, loop: Loop) -> ProcessRung:
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
            raise RungUnsupported("worker processes are forked by a fork server, which "
                                  "needs os.fork and socket.send_fds (POSIX)")
        rung = cls(config, listener, loop)
        try:
            await rung._start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await rung.aclose(kill=True)
            raise
        return rung

    async def _start(self) -> None:
        if self._park_key is not None and self.config.reuse_workers:
            for proc in take_parked(self._park_key, self.config.max_workers):
                proc.attach(self, self.loop)
                self.procs.append(proc)
        starting: list[Proc] = []
        asked = self._fork_all(starting)
        imported = preload(self.loop, "cloudpickle")  # while the workers start
        try:
            async with self.loop.fail_after(self.config.start_timeout):
                while not asked:
                    # Full (300 asked for at once): room comes as it reads, or the deadline.
                    await anyio.sleep(0.005)
                    asked = self._fork_all(starting)
                while not opening_done(starting, self.config.initializer):
                    self._nudge = self.loop.event()  # set as one starts, or dies
                    await self._nudge.wait()
                await imported.wait()  # what the first call needs (else on the loop)
        except TimeoutError:
            opening_timed_out(starting, self.config, ForkServer.current())
        ready = sum(p.state is ProcState.READY for p in self.procs)
        opening_failure(starting, ready > 0, self.config.initializer)
        if ready < self.config.max_workers:
            self.listener.rung_warning(f"process rung started {ready} of "
                                       f"{self.config.max_workers} workers; starting the "
                                       "rest in the background", rung=self.name)
        self._supervisor = self.loop.spawn(self._supervise)

    def _fork_all(self, starting: list[Proc]) -> bool:
        """Ask for every missing worker; False if the fork server's socket is full."""
        while len(self.procs) < self.config.max_workers:
            try:
                starting.append(self._fork())
            except ForkServerBusy:
                return False
            except OSError as exc:
                if not is_transient(exc) or not starting:
                    raise
                break
        return True

    def _fork(self) -> Proc:
        check_directory(*self._directory)
        proc = Proc(ForkServer.spawn(), self, self.loop)
        self._recycling.forked(proc)
        proc.attach(self, self.loop)
        proc.send(_wire.INIT, self._settings)
        self.procs.append(proc)
        return proc

    # -- taking chunks -------------------------------------------------------------

    def _pick(self, wait_on_stuck: bool = True) -> Proc | None:
        best = None
        stuck = time.monotonic() - STUCK_SECONDS
        # Not behind a long item, or a big argument still written to its worker; while a
        # worker is replaced (after a crash), not behind any: it waits a few ms for it.
        replacing = wait_on_stuck and self.replacing()
        room = self._recycling.room(self.procs)  # max_workers run items (Recycling.room)
        for proc in self.procs:
            if not self._recycling.serves(proc):
                continue
            room -= 1
            if room < 0:
                break
            if len(proc.chunks) >= DEPTH:
                continue
            if wait_on_stuck and proc.chunks and (
                    replacing or proc.outbox or proc.heard < stuck
                    or (len(proc.chunks) > 1 and work_held(proc.chunks) > self._depth)):
                continue
            if best is None or len(proc.chunks) < len(best.chunks):
                best = proc
        return best

    def replacing(self) -> bool:
        return self._supervisor is not None and (
            self._recycling.live(self.procs) < self.config.max_workers or any(
                p.state is ProcState.STARTING and not p.killed for p in self.procs))

    def offer(self) -> int | None:
        if self.state is not RungState.SERVING or self.in_flight >= self.config.in_flight:
            return 0
        proc = self._pick()
        if proc is None:
            return 0
        limit = self.config.max_tasks_per_worker
        return None if limit is None else max(1, limit - proc.tasks)

    def submit(self, chunk: Chunk) -> None:
        # As offer() found it (a head chunk may have turned stuck since).
        proc = self._pick() or self._pick(wait_on_stuck=False)
        assert proc is not None, "submit() without offer()"
        functions = {p.call.shipped.id: p.call.shipped for p in chunk.pieces
                     if p.call.shipped.id not in proc.functions}
        self._seq += 1
        # After a crash among a call's items, results go back ten times as often (a
        # crash loses at most 0.5 ms of work; one by one, tiny items ran 30x slower).
        careful = chunk.crashes > 0 or any(p.call.crashed for p in chunk.pieces)
        try:
            parts = chunk_frame(self._seq, FLUSH_SECONDS / (10 if careful else 1),
                                functions.values(), proc.forget, runs_of(chunk))
        except (Exception, SystemExit) as exc:  # an argument's own code ran
            raise ChunkUnpicklable(unpicklable_items(chunk)) from exc
        chunk.seq = self._seq
        chunk.rung = self
        chunk.expected = sum(len(p.items) * (p.call.timing.per_item or 0.0)
                             for p in chunk.pieces)
        # What the items weigh (for chunk sizing): the message, less the functions.
        chunk.payload_bytes = sum(memoryview(p).nbytes for p in parts) - sum(
            len(f.blob) + sum(memoryview(b).nbytes for b in f.buffers)
            for f in functions.values())
        proc.take(chunk, parts, functions)
        # Leaving soon (or after this chunk), it is replaced now, so no call waits for
        # it; or items wait behind others: the supervisor looks for a stuck worker.
        if self._recycling.replace_early(proc, chunk) or self._recycling.spent(proc) or (
                self._looking == math.inf) or (self._looking > STUCK_SECONDS and (
                    chunk.size > 1 or len(proc.chunks) > 1)):
            self._grow()

    def forget(self, fn_id: int) -> None:
        """A call's function is no longer needed in the workers."""
        for proc in self.procs:
            proc.drop_function(fn_id)

    def cancel(self, calls: Iterable[int]) -> None:
        wanted = set(calls)
        for proc in self.procs:
            if proc.state is not ProcState.DEAD and any(
                    wanted & {p.call.id for p in c.pieces} for c in proc.chunks):
                proc.send(_wire.CANCEL, _wire.dumps(list(wanted)))

    def resume(self) -> None:
        for proc in self.procs:
            proc.resume()

    def kill(self, chunks: Iterable[Chunk], calls: set[int] | None = None) -> bool:
        for chunk in chunks:
            proc = next((p for p in self.procs if chunk in p.chunks), None)
            if proc is None:
                continue
            if calls is None and proc.chunks[0] is chunk:
                proc.kill()
                continue
            # Killed now if one of their items runs, or if one starts before the
            # worker reads that they are cancelled (a waiting chunk it just took up).
            proc.doom({p.call.id for p in chunk.pieces} if calls is None else calls)
            self._grow()  # the supervisor looks again while they are there
        return True

    # -- what workers report -------------------------------------------------------

    def proc_ready(self, proc: Proc) -> None:
        self._recycling.ready(proc)
        self._grow()  # the supervisor counts it started
        limit = self.config.max_worker_memory
        if limit and proc.ready_rss > limit and not self._memory_warned:
            self._memory_warned = True
            self.listener.rung_warning(f"a worker holds {proc.ready_rss >> 20} MB once "
                                       f"initialised, over max_worker_memory={limit >> 20} "
                                       "MB: each is replaced after its first chunk; raise "
                                       "the ceiling", rung=self.name)
        self.listener.rung_changed()

    def proc_results(self, proc: Proc, chunk: Chunk, meta: _wire.ResultMeta,
                     results: list[Any] | BaseException, errors: dict[int, BaseException],
                     nbytes: int) -> None:
        first, upto, done = meta.first, meta.upto, meta.done
        seconds, retried = meta.end
        if meta.arguments_unloadable:
            assert isinstance(results, BaseException)
            self.listener.chunk_unloadable(chunk, results)
            return
        if isinstance(results, BaseException):
            self.listener.chunk_undecodable(chunk, first, upto, results)
        elif upto > first:
            self.listener.chunk_progress(chunk, first, upto, results, errors, nbytes)
            now = time.monotonic()
            # Sized on a cost far too low? (see _rebalance)
            over = not done and proc.pace.report(chunk, first, upto, now, self.config,
                                                 sum(c.size for c in proc.chunks) - chunk.size)
            if proc.doomed:
                proc.kill_doomed()  # what it was waiting for may have come
            elif over:
                proc.withdraw(overlong(chunk, now - proc.pace.began, proc.chunks,
                                       self.config, proc.pace.per_item))
        if done:
            self.listener.chunk_done(chunk, upto, seconds, retried)
            if not proc.chunks:
                self._take_back()

    def proc_cut(self, proc: Proc, chunk: Chunk, keep: int) -> None:
        self.listener.chunk_cut(chunk, keep)

    def proc_withdrawn(self, proc: Proc, chunk: Chunk) -> None:
        self.listener.chunk_lost(chunk, Resend.MOVED)

    def proc_changed(self, proc: Proc) -> None:  # it sent all, or it is gone (replaced)
        self._grow()
        self.listener.rung_changed()

    def _take_back(self) -> None:
        """While a worker is idle, ask for the chunks that wait behind an item running
        long (or hung): they go to the idle one instead. Not while every slot is taken:
        cut off, they would wait for one all the same (and a graceful close would fail
        them)."""
        if self.state is RungState.SERVING and not self.listener.closing and (
                self.in_flight < self.config.in_flight) and any(
                p.state is ProcState.READY and not p.chunks and not p.killed
                for p in self.procs):
            stuck = time.monotonic() - STUCK_SECONDS
            for proc in self.procs:
                proc.take_back(stuck)

    def _retire_idle(self) -> None:
        """Idle workers near their limit leave, once replaced (see Recycling)."""
        for proc in self._recycling.idle_leavers(self.procs):
            proc.retire()
            self.listener.worker_recycled(f"worker {proc.pid} retires after {proc.tasks} "
                                          "item(s), its replacement ready", pid=proc.pid)

    def proc_retiring(self, proc: Proc) -> None:
        self.listener.worker_recycled(f"worker {proc.pid} retires after {proc.tasks} "
                                      "item(s); a new one replaces it", pid=proc.pid)
        self._grow()

    def proc_dead(self, proc: Proc, death: Death) -> None:
        self._death.set()
        self._recycling.gone(proc)
        death.blame(self.config.max_crashes_per_item)
        if proc in self.procs:
            self.procs.remove(proc)
        if death.crashed:
            self.listener.worker_crashed(
                f"worker {proc.pid} died ({exit_described(death.exitcode)}) while running a "
                "chunk; resending what had not come back", pid=proc.pid,
                exitcode=death.exitcode)
        elif death.unasked and self.state is RungState.SERVING:
            self.listener.worker_crashed(
                f"worker {proc.pid} died between items ({exit_described(death.exitcode)}); "
                "replacing it", pid=proc.pid, exitcode=death.exitcode)
        for index, chunk in enumerate(death.chunks):
            if death.crashed and index == 0:
                self.listener.chunk_crashed(chunk, death.culprit, death.exitcode,
                                            function=death.loading, shared=death.shared)
            else:  # a chunk it had not started goes again unstarted: not a rerun
                self.listener.chunk_lost(chunk, Resend.LOST if index == 0 and death.began
                                         else Resend.MOVED)
        if self.state is RungState.SERVING:
            self._grow()

    # -- keeping the number of workers ---------------------------------------------

    @property
    def in_flight(self) -> int:
        """The chunks its workers hold: a chunk leaves its worker's list (in
        :class:`Proc`) just before the final report on it."""
        return sum(len(proc.chunks) for proc in self.procs)

    @property
    def workers(self) -> int:
        # A replacement started early waits for the worker it replaces: never more
        # than max_workers run items.
        return min(self.config.max_workers,
                   sum(1 for p in self.procs if p.state is ProcState.READY and not p.killed))

    @property
    def capacity(self) -> int:
        return min(self.config.in_flight, DEPTH * self.config.max_workers)

    def _grow(self) -> None:
        """A worker left (or will), or started: the supervisor forks what is missing."""
        self._nudge is not None and self._nudge.set()

    async def _supervise(self) -> None:
        """Keep ``max_workers`` workers: fork what is missing, backing off while forks
        fail; give the rung up when none serves and none can be made (one task)."""
        config = self.config
        starts = Starts(config)
        while self.state is RungState.SERVING:
            error: BaseException | None = None
            missing = config.max_workers - self._recycling.live(self.procs)
            backoff = starts.backoff() if missing > 0 else 0.0
            # Out of attempts with none serving, those starting are the last tries.
            hold = backoff > 0 or bool(
                starts.starting and starts.out_of_attempts() and not self.workers)
            for _ in range(0 if hold else missing):
                try:
                    starts.forked(self._fork())
                except (OSError, RungUnavailable) as exc:
                    error = exc
                    starts.failed()
                    break
            if error is None and not starts.any_started():
                # Woken as a worker starts, leaves or will; while chunks wait behind
                # busy workers, to look for stuck ones; while doomed calls have items
                # in a running chunk, for one starting; while any works, for a stopped one.
                self._nudge = self.loop.event()
                self._looking = STUCK_SECONDS if any(p.chunks and (
                    p.doomed or has_waiting(p.chunks, p.progress)) for p in self.procs) else (
                    HAND_OVER_SECONDS if any(p.chunks for p in self.procs) else math.inf)
                with anyio.move_on_after(min(
                        self._looking, IDLE_SECONDS if self._recycling.leaving else math.inf,
                        backoff if backoff > 0 else math.inf, starts.next_deadline())):
                    await self._nudge.wait()
            self._retire_idle()
            self._take_back()
            for proc in self.procs:
                proc.kill_stuck()
            error = starts.settle() or error
            # While a worker serves, or one starts, replacements are tried (or awaited);
            # an initializer that hung is not waited for again, nor in workers forked later.
            if error is not None and not self.workers and (starts.hung or (
                    not starts.starting and starts.out_of_attempts())):
                if isinstance(error, InitializerFailed):
                    self._broke(error, error.__cause__)
                else:
                    self._broke(RungUnavailable(f"no worker process could be started "
                                                f"({error!r})"), error)
                return

    def _broke(self, error: BaseException, cause: BaseException | None) -> None:
        error.__cause__ = cause
        self.listener.rung_warning(f"the process rung cannot run any worker: {error!r}",
                                   rung=self.name)
        self._out_of_service(error)
        self.listener.rung_changed()

    # -- closing -------------------------------------------------------------------

    def abandon(self) -> None:
        super().abandon()
        for proc in list(self.procs):
            proc.kill()
        if self._supervisor is not None:
            self.loop.call_soon_threadsafe(self._supervisor.cancel)

    async def aclose(self, kill: bool) -> None:
        self._move(RungState.CLOSED)
        if self._supervisor is not None:
            self._supervisor.cancel()
        parking = self.config.max_workers  # (not a worker that leaves when replaced)
        for proc in list(self.procs):
            if kill or proc.state is ProcState.STARTING:  # one initialising reads nothing
                proc.kill()
            elif (self.config.reuse_workers and self._park_key is not None and parking
                  and proc.state is ProcState.READY and not proc.chunks
                  and proc not in self._recycling.leaving):
                parking -= 1
                self.procs.remove(proc)
                proc.detach()
                park(self._park_key, proc, self.config.max_workers)
            else:
                proc.close()
        # Workers leave at once on end-of-file; one that does not is killed.
        for then_kill in (True, False):
            with anyio.move_on_after(5):
                while True:
                    self._death = self.loop.event()
                    if all(p.exited() for p in self.procs):
                        break
                    await self._death.wait()
            for proc in [p for p in self.procs if then_kill and not p.exited()]:
                proc.kill()
        if self._supervisor is not None:
            await self._supervisor.wait()
