"""ResilientPool: lifecycle, the ladder of rungs, and run/map/imap."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import gc
import itertools
import logging
import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Sized,
)
from types import TracebackType
from typing import Any, Literal, TypeVar, TypeVarTuple, overload

import anyio
import cloudpickle
from aiolimiter import AsyncLimiter
from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

from ._backends import (
    ChunkUnpicklable,
    InlineRung,
    ProcessRung,
    Rung,
    _ArgumentsUnpickleable,
    create_rung,
)
from ._bridge import Background, Schedule, loop_scheduler, on_asyncio, spawn
from ._chunks import Chunk, ChunkSizer, Permit, Segment, chunks_of
from ._config import PoolConfig
from ._errors import (
    MISSING,
    DeadlineExceeded,
    PoolClosed,
    RemoteTraceback,
    SerializationError,
    WorkerCrashed,
)
from ._progress import Progress, Reporter
from ._events import Counters, EventHook, EventKind, PoolEvent, PoolStatistics
from ._retry import backoff_delays, is_transient
from ._worker import Outcomes

logger = logging.getLogger("asyncpool")
# A library does not decide where its logs go: without this, Python's last-resort
# handler would print our WARNINGs to stderr in applications that configure no logging.
logger.addHandler(logging.NullHandler())

T = TypeVar("T")
A = TypeVar("A")
Ts = TypeVarTuple("Ts")
CancelRunning = Literal["finish", "kill"]

#: The inline rung gives the loop a turn at least this often (seconds).
_INLINE_SLICE = 0.002


class ResilientPool:
    """A pool of worker processes that degrades to threads, then inline, and climbs back.

    Use it as ``async with ResilientPool() as pool:``. Settings are the fields of
    :class:`PoolConfig`, given as keywords or as ``config=``.
    """

    def __init__(self, max_workers: int | None = None, *, config: PoolConfig | None = None,
                 on_event: EventHook | None = None, **options: Any) -> None:
        if max_workers is not None:
            options["max_workers"] = max_workers
        unknown = set(options) - {f.name for f in dataclasses.fields(PoolConfig)}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; the options are the "
                             f"fields of PoolConfig")
        self.config = dataclasses.replace(config, **options) if config else PoolConfig(**options)
        self._on_event = on_event
        self._counters = Counters()
        self._rung: Rung | None = None
        self._index = 0
        self._retired: list[Rung] = []
        self._state = "new"
        self._keys = itertools.count()
        self._promoter: Background | None = None
        self._in_flight = 0
        #: Why the last rung failed to start, for the error when none of them can.
        self._last_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ResilientPool:
        if self._state != "new":
            raise PoolClosed("a ResilientPool can be entered once; create a new one")
        self._schedule: Schedule = loop_scheduler()
        self._slots = anyio.Semaphore(self.config.in_flight)
        self._rung_lock = anyio.Lock()
        self._limiter = _limiter(self.config.rate_limit)
        self._background: set[Background] = set()
        self._state = "open"
        try:
            rungs = self.config.ladder
            if self.config.warm_start and "process" in rungs and "thread" in rungs:
                # Serve on threads at once; the promoter brings up processes off the loop.
                self._install(await create_rung("thread", self.config),
                              rungs.index("thread"), promote_now=True)
            else:
                await self._current()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        # Leaving on KeyboardInterrupt, SystemExit or cancellation must not wait for
        # running work: it is killed. A normal exit (or an ordinary error) lets it finish.
        leaving_hard = exc_type is not None and not issubclass(exc_type, Exception)
        await self.aclose(kill=leaving_hard)
        return None

    async def aclose(self, *, kill: bool = False) -> None:
        """Close the pool: wait for running work off the loop, or with ``kill`` stop it."""
        if self._state in ("closed", "new"):
            self._state = "closed"
            return
        self._state = "closed"
        if self._promoter is not None:
            self._promoter.cancel()
        rungs = [r for r in [self._rung, *self._retired] if r is not None]
        self._rung, self._retired = None, []
        with anyio.CancelScope(shield=True):
            for rung in rungs:
                await rung.aclose(kill)
            while self._background:
                task = self._background.pop()
                await task.wait()

    @staticmethod
    async def close_idle_workers() -> int:
        """Shut down the warm workers that pools with ``reuse_workers=True`` left parked."""
        from . import _loky

        return await anyio.to_thread.run_sync(_loky.close_parked)

    @property
    def backend(self) -> str | None:
        """The rung serving now: "process", "thread" or "inline" (None when closed)."""
        return self._rung.name if self._rung is not None else None

    def statistics(self) -> PoolStatistics:
        return self._counters.snapshot(self.backend, self._in_flight)

    # -- the public calls ----------------------------------------------------------

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts,
                  timeout: float | None = None, kill_on_timeout: bool = False,
                  cancel_running: CancelRunning = "finish") -> T:
        """Run ``fn(*args)`` on the pool and return its result."""
        call = _Call(timeout=timeout, kill_on_timeout=kill_on_timeout,
                     cancel_running=cancel_running, chunk_size=1)
        results = await self._collect(fn, [args], True, call)
        return results[0]  # type: ignore[no-any-return]

    @overload
    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: Literal[False] = ..., timeout: float | None = ...,
                  kill_on_timeout: bool = ..., cancel_running: CancelRunning = ...,
                  chunk_size: int | None = ..., rate_limit: float | None = ...,
                  progress: Progress = ...) -> list[T]: ...

    @overload
    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: bool, timeout: float | None = ...,
                  kill_on_timeout: bool = ..., cancel_running: CancelRunning = ...,
                  chunk_size: int | None = ..., rate_limit: float | None = ...,
                  progress: Progress = ...) -> list[T | BaseException]: ...

    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: bool = False, timeout: float | None = None,
                  kill_on_timeout: bool = False, cancel_running: CancelRunning = "finish",
                  chunk_size: int | None = None, rate_limit: float | None = None,
                  progress: Progress = None) -> list[Any]:
        """``[fn(x) for x in items]`` on the pool, in input order.

        The first failing item's exception is raised (its worker traceback is the
        ``__cause__``) unless ``return_exceptions`` puts exceptions in place. With a
        ``timeout``, :class:`DeadlineExceeded` carries the finished results.
        ``rate_limit`` starts at most that many items per second (for this call, on top
        of the pool's own). ``progress=True`` draws a tqdm bar; ``progress=callback``
        calls ``callback(done, total)`` as items finish (``total`` is None if unknown).
        """
        call = _Call(timeout, kill_on_timeout, cancel_running, chunk_size, rate_limit,
                     return_exceptions, progress)
        return await self._collect(fn, items, False, call)

    async def starmap(self, fn: Callable[..., T], items: Iterable[Iterable[Any]]
                      | AsyncIterable[Iterable[Any]], *, return_exceptions: bool = False,
                      timeout: float | None = None, kill_on_timeout: bool = False,
                      cancel_running: CancelRunning = "finish",
                      chunk_size: int | None = None, rate_limit: float | None = None,
                      progress: Progress = None) -> list[Any]:
        """Like :meth:`map`, calling ``fn(*args)`` for each tuple ``args``."""
        call = _Call(timeout, kill_on_timeout, cancel_running, chunk_size, rate_limit,
                     return_exceptions, progress)
        return await self._collect(fn, items, True, call)

    async def imap(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                   ordered: bool = True, return_exceptions: bool = False,
                   timeout: float | None = None, kill_on_timeout: bool = False,
                   cancel_running: CancelRunning = "finish",
                   chunk_size: int | None = None, rate_limit: float | None = None,
                   progress: Progress = None) -> AsyncIterator[T]:
        """Stream ``fn(x)`` for each item, in input order or (``ordered=False``) as done.

        Memory stays flat: at most ``max_chunks_in_flight`` chunks are out or waiting.
        """
        call = _Call(timeout, kill_on_timeout, cancel_running, chunk_size, rate_limit,
                     return_exceptions, progress)
        segments = self._segments(fn, items, False, ordered, call)
        reporter = Reporter(progress, len(items) if isinstance(items, Sized) else None)
        try:
            async for segment in segments:
                reporter.advance(len(segment.results))
                errors = segment.errors
                for position, value in enumerate(segment.results):
                    if errors and position in errors:
                        if not return_exceptions:
                            raise errors[position]
                        value = errors[position]
                    yield value
        finally:
            reporter.close()
            await segments.aclose()

    # -- the job engine ------------------------------------------------------------

    async def _collect(self, fn: Callable[..., Any], items: Any, star: bool,
                       call: _Call) -> list[Any]:
        done: list[Segment] = []
        total = len(items) if isinstance(items, Sized) else None
        reporter = Reporter(call.progress, total)
        segments = self._segments(fn, items, star, False, call)
        try:
            async for segment in segments:
                reporter.advance(len(segment.results))
                if segment.errors and not call.return_exceptions:
                    raise segment.errors[min(segment.errors)]
                done.append(segment)
        except DeadlineExceeded as exc:
            exc.partial = _assemble(done, total=total)
            raise
        finally:
            reporter.close()
            await segments.aclose()
        return _assemble(done)

    async def _segments(self, fn: Callable[..., Any], items: Any, star: bool,
                        ordered: bool, call: _Call) -> AsyncGenerator[Segment, None]:
        if self._state != "open":
            raise PoolClosed("the pool is closed (or was never entered): use "
                             "`async with ResilientPool() as pool:`")
        try:
            cloudpickle.dumps(fn)
        except Exception as exc:
            raise SerializationError(
                f"the function {fn!r} cannot be pickled for the worker processes ({exc!r}); "
                "define it at module level, or pass it through functools.partial"
            ) from exc
        limiters = [x for x in (self._limiter, _limiter(call.rate_limit)) if x is not None]
        config = self.config
        if call.chunk_size is not None or limiters:
            # A rate limit counts items as they start, so items travel one by one.
            config = dataclasses.replace(config, chunk_size=1 if limiters else call.chunk_size)
        timeout, kill_on_timeout = call.timeout, call.kill_on_timeout
        cancel_running = call.cancel_running
        job = _Job(self, fn, star, config, items, limiters)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        try:
            async for segment in job.run(ordered, deadline):
                yield segment
        except _DeadlineHit as hit:
            if kill_on_timeout:
                job.kill_running()
            self._emit("deadline", logging.WARNING, f"deadline of {timeout} s passed",
                       pending_chunks=len(job.in_flight))
            raise DeadlineExceeded(
                f"the deadline of {timeout} s passed with {len(job.in_flight)} chunk(s) "
                "unfinished; `.partial` holds what finished",
                _assemble(hit.buffered, start=hit.start), hit.start
            ) from None
        except BaseException:
            if cancel_running == "kill":
                job.kill_running()
            raise
        finally:
            job.abandon()

    # -- the ladder ----------------------------------------------------------------

    async def _current(self) -> Rung:
        """The serving rung, rebuilt (from the top of the ladder) if it broke."""
        rung = self._rung
        if rung is not None and not rung.broken:
            return rung
        async with self._rung_lock:
            rung = self._rung
            if rung is not None and not rung.broken:
                return rung
            if self._state != "open":
                raise PoolClosed("the pool was closed")
            ladder = self.config.ladder
            for index, name in enumerate(ladder):
                # A cluster that does not answer costs one connect timeout, not three.
                attempts = 1 if name == "dask" else self.config.creation_attempts
                new = await self._create(name, attempts)
                if new is not None:
                    self._install(new, index)
                    return new
                if index + 1 < len(ladder):
                    following = ladder[index + 1]
                    self._counters.fallbacks += 1
                    self._emit("fallback", logging.WARNING,
                               f"the {name} rung could not start after {attempts} "
                               f"attempt(s); falling back to the {following} rung",
                               failed=name, to=following)
            raise self._last_error or RuntimeError("no rung of the ladder could start")

    async def _create(self, name: str, attempts: int) -> Rung | None:
        """Try to start rung ``name`` up to ``attempts`` times; None if it could not."""
        delays = backoff_delays(self.config.backoff_initial, self.config.backoff_factor,
                                self.config.backoff_max, self.config.backoff_jitter)
        for attempt in range(1, attempts + 1):
            self._counters.creation_attempts += 1
            try:
                return await create_rung(name, self.config)
            except Exception as exc:
                if not is_transient(exc, starting=True):
                    raise
                self._last_error = exc
                self._counters.creation_failures += 1
                self._emit("creation_failed", logging.INFO,
                           f"starting the {name} rung failed (attempt {attempt} of "
                           f"{attempts}): {exc!r}", rung=name, attempt=attempt, error=exc)
            if attempt < attempts:
                # Freed memory and reaped objects may be what the next try needs.
                gc.collect()
                await anyio.sleep(next(delays))
        return None

    def _install(self, rung: Rung, index: int, *, promote_now: bool = False) -> None:
        old, self._rung, self._index = self._rung, rung, index
        if old is not None:
            self._retire(old)
        if index > 0 and self._promoter is None:
            self._promoter = self._spawn(self._promote,
                                         0.0 if promote_now else self.config.promote_after)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> Background:
        async def run() -> None:
            try:
                await fn(*args)
            finally:
                self._background.discard(task)

        task = spawn(run)
        self._background.add(task)
        return task

    def _retire(self, rung: Rung) -> None:
        rung.retired = True
        if rung.in_flight == 0 or rung.crashed:
            self._spawn(rung.aclose, rung.crashed)
        else:
            # It refused a submit, or a better rung came up: let its chunks finish.
            self._retired.append(rung)

    def _chunk_entered(self, rung: Rung) -> None:
        rung.in_flight += 1
        self._in_flight += 1

    def _chunk_left(self, rung: Rung) -> None:
        rung.in_flight -= 1
        self._in_flight -= 1
        if rung.retired and rung.in_flight == 0 and rung in self._retired:
            self._retired.remove(rung)
            self._spawn(rung.aclose, False)

    async def _promote(self, delay: float) -> None:
        """Climb back up the ladder in the background, backing off while it fails."""
        try:
            while self._index > 0 and self._state == "open":
                await anyio.sleep(delay)
                if await self._promote_once():
                    delay = self.config.promote_after
                else:
                    delay = min(max(delay, self.config.promote_after) * 2,
                                self.config.promote_max)
        finally:
            self._promoter = None

    async def _promote_once(self) -> bool:
        """Try each rung above the serving one, best first; True if one started."""
        for index, name in enumerate(self.config.ladder[: self._index]):
            try:
                rung = await self._create(name, 1)
            except Exception:
                logger.exception("unexpected error starting the %s rung", name)
                rung = None
            if rung is None:
                continue
            if self._state != "open":
                await rung.aclose(True)
                return True
            async with self._rung_lock:
                before = self.backend
                self._install(rung, index)
            self._counters.promotions += 1
            self._emit("promotion", logging.INFO,
                       f"promoted from the {before} rung to the {name} rung",
                       previous=before, to=name)
            return True
        return False

    # -- events ----------------------------------------------------------------------

    def _emit(self, kind: EventKind, level: int, message: str, **details: Any) -> None:
        logger.log(level, "%s: %s", kind, message)
        if self._on_event is not None:
            try:
                self._on_event(PoolEvent(kind, self.backend, message, details))
            except Exception:
                logger.exception("the on_event hook raised on a %s event; ignored", kind)


@dataclasses.dataclass(frozen=True)
class _Call:
    """The options of one run/map/imap call."""

    timeout: float | None = None
    kill_on_timeout: bool = False
    cancel_running: CancelRunning = "finish"
    chunk_size: int | None = None
    rate_limit: float | None = None
    return_exceptions: bool = False
    progress: Progress = None

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout!r} is invalid: it must be > 0 or None")
        if self.cancel_running not in ("finish", "kill"):
            raise ValueError(f"cancel_running={self.cancel_running!r} is invalid: "
                             "use 'finish' or 'kill'")
        # chunk_size is validated by PoolConfig, through the replace() that applies it.


class _DeadlineHit(Exception):
    def __init__(self, buffered: list[Segment], start: int) -> None:
        self.buffered, self.start = buffered, start


class _Job:
    """One run/map/imap call: its chunks in flight, and what to do as each comes back."""

    def __init__(self, pool: ResilientPool, fn: Callable[..., Any], star: bool,
                 config: PoolConfig, items: Any, limiters: list[AsyncLimiter]) -> None:
        self.pool, self.fn, self.star, self.config = pool, fn, star, config
        self.limiters = limiters
        self.items = items
        total = len(items) if isinstance(items, Sized) else None
        self.sizer = ChunkSizer(config, total)
        self.send, self.receive = anyio.create_memory_object_stream[tuple[Chunk, Any]](math.inf)
        self.in_flight: set[Chunk] = set()

    async def run(self, ordered: bool, deadline: float) -> AsyncGenerator[Segment, None]:
        pool = self.pool
        source = chunks_of(self.items, self.sizer)
        ready: dict[int, Segment] = {}
        next_start = 0
        exhausted = False
        try:
            while True:
                while not exhausted:
                    if self.in_flight:
                        try:
                            pool._slots.acquire_nowait()
                        except anyio.WouldBlock:
                            break
                    else:
                        await pool._slots.acquire()
                    permit = Permit(pool._slots)
                    nxt = await anext(source, None)
                    if nxt is None:
                        permit.release()
                        exhausted = True
                        break
                    await self.dispatch(Chunk(nxt[0], nxt[1], permit))
                if not self.in_flight:
                    if exhausted:
                        return
                    continue
                received = None
                with anyio.move_on_after(deadline - anyio.current_time()):
                    received = await self.receive.receive()
                if received is None:
                    raise _DeadlineHit(list(ready.values()), next_start)
                chunk, future = received
                self.in_flight.discard(chunk)
                segment = await self.settle(chunk, future)
                if segment is None:
                    continue
                segment.permit = chunk.permit
                if not ordered:
                    yield _release_after(segment)
                    continue
                ready[segment.start] = segment
                while next_start in ready:
                    segment = ready.pop(next_start)
                    next_start += len(segment.results)
                    yield _release_after(segment)
        finally:
            for segment in ready.values():
                if segment.permit is not None:
                    segment.permit.release()
            await source.aclose()

    async def dispatch(self, chunk: Chunk) -> None:
        """Send a chunk to the serving rung; a transient refusal sends it again."""
        pool = self.pool
        for limiter in self.limiters:
            await limiter.acquire()
        while True:
            try:
                rung = await pool._current()
            except BaseException:
                chunk.permit.release()
                raise
            self.in_flight.add(chunk)
            chunk.rung = rung
            if isinstance(rung, InlineRung):
                outcome = await _run_inline(self.fn, chunk.items, self.star,
                                            self.config.task_retries)
                pool._chunk_entered(rung)
                self._deliver(chunk, _done(outcome))
                return
            chunk.key = str(next(pool._keys))
            try:
                future = rung.submit(self.fn, chunk.items, self.star, self.config.task_retries,
                                     chunk.key)
            except ChunkUnpicklable as exc:
                # Split it until the bad items stand alone.
                self.in_flight.discard(chunk)
                await self._unpicklable(chunk, exc.__cause__ or exc, "argument")
                return
            except Exception as exc:
                self.in_flight.discard(chunk)
                if not (isinstance(exc, BrokenProcessPool) or is_transient(exc)):
                    raise
                logger.info("submit to the %s rung failed (%r); sending the chunk again",
                            rung.name, exc)
                rung.broken = True
                pool._counters.resubmitted_chunks += 1
                continue
            chunk.future = future
            self.sizer.observe_bytes(len(chunk.items), rung.last_payload_size)
            pool._chunk_entered(rung)
            pool._counters.chunks_submitted += 1
            future.add_done_callback(functools.partial(self._finished, chunk))
            return

    def _finished(self, chunk: Chunk, future: cf.Future[Any]) -> None:
        # Runs in whichever thread completed the future.
        if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
            chunk.rung.note_broken()
        self.pool._schedule(lambda: self._deliver(chunk, future))

    def _deliver(self, chunk: Chunk, future: cf.Future[Any]) -> None:
        if not chunk.abandoned:
            try:
                self.send.send_nowait((chunk, future))
                return
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        self.pool._chunk_left(chunk.rung)
        chunk.permit.release()

    async def settle(self, chunk: Chunk, future: cf.Future[Any]) -> Segment | None:
        """Turn a finished chunk into a segment, or send it (or its halves) again."""
        pool, rung = self.pool, chunk.rung
        pool._chunk_left(rung)
        error = future.exception()
        if error is None:
            result = future.result()
            if isinstance(result, bytes):
                self.sizer.observe_bytes(len(chunk.items), len(result))
            try:
                outcome = rung.decode(result)
            except _ArgumentsUnpickleable as exc:
                await self._unpicklable(chunk, exc.args[0][0], "argument in the worker")
                return None
            except Exception as exc:
                await self._unpicklable(chunk, exc, "result in the parent")
                return None
            return self._segment(chunk, outcome)
        if isinstance(error, BrokenProcessPool):
            return await self._crashed(chunk, error)
        if isinstance(error, ShutdownExecutorError):
            # Its executor was shut down under it: the pool closed, or gave the rung up.
            if pool._state != "open":
                closed: BaseException = PoolClosed(
                    "the pool was closed while this item was running")
                everyone = {i: (closed, "") for i in range(len(chunk.items))}
                return self._segment(chunk, Outcomes([None] * len(chunk.items), everyone, 0.0))
            pool._counters.resubmitted_chunks += 1
            await self.dispatch(chunk)
            return None
        if is_transient(error):
            pool._counters.resubmitted_chunks += 1
            await self.dispatch(chunk)
            return None
        # Items' own exceptions come back inside the outcome, so an error of the whole
        # chunk is the transport's (a result that would not pickle): find its item.
        await self._unpicklable(chunk, error, "result in the worker")
        return None

    async def _crashed(self, chunk: Chunk, error: BaseException) -> Segment | None:
        pool, rung = self.pool, chunk.rung
        if not rung.crash_reported:
            rung.crash_reported = True
            codes = rung.exit_codes() if isinstance(rung, ProcessRung) else {}
            pool._counters.worker_crashes += max(1, len(codes))
            pool._emit("worker_crash", logging.WARNING,
                       f"worker process(es) died (exit codes {codes or 'unknown'}); "
                       "resubmitting the chunks that had not come back",
                       exit_codes=codes)
        suspect = rung.suspect(chunk.key)
        pieces = [chunk]
        if suspect is not None:
            exitcode, how = suspect
            chunk.crashes += 1
            if len(chunk.items) == 1 and chunk.crashes >= self.config.max_crashes_per_item:
                crash = WorkerCrashed(
                    f"item {chunk.start} crashed its worker process {chunk.crashes} times "
                    f"(last: {how}); it was not retried again. Run it alone to debug, "
                    "or catch WorkerCrashed", index=chunk.start, exitcode=exitcode)
                crash.__cause__ = error
                return self._segment(chunk, Outcomes([None], {0: (crash, "")}, 0.0))
            if len(chunk.items) > 1:
                # Bisect: the item that kills its worker ends up alone.
                pieces = list(chunk.split())
                if not rung.exact_crashes:
                    for piece in pieces:
                        piece.crashes = 0
        pool._counters.resubmitted_chunks += len(pieces)
        for piece in pieces:
            pool._emit("resubmit", logging.DEBUG,
                       f"resubmitting items {piece.start}..{piece.start + len(piece.items) - 1}",
                       start=piece.start, size=len(piece.items))
            await self.dispatch(piece)
        return None

    async def _unpicklable(self, chunk: Chunk, exc: BaseException, where: str) -> None:
        """Bisect a chunk that failed in transport until the bad item stands alone."""
        if len(chunk.items) > 1:
            for piece in chunk.split():
                await self.dispatch(piece)
            return
        item = chunk.items[0]
        shown = type(tuple(item) if self.star else item).__qualname__
        problem = {
            "argument": f"its argument (a {shown}) could not be pickled",
            "argument in the worker": f"its argument (a {shown}) could not be unpickled in "
                                      "the worker",
            "result in the parent": "its result could not be unpickled in the parent",
            "result in the worker": "its result could not be sent back from the worker",
        }[where]
        fix = ("pass plain, picklable data (no locks, sockets or generators; classes "
               "importable by the workers)" if where.startswith("argument") else
               "return plain data (built-in types, or classes importable in both processes)")
        error = SerializationError(f"item {chunk.start}: {problem}: {exc!r}; {fix}")
        error.__cause__ = exc
        chunk.rung = _DONE
        self.in_flight.add(chunk)
        self.pool._chunk_entered(_DONE)
        self._deliver(chunk, _done(Outcomes([None], {0: (error, "")}, 0.0)))

    def _segment(self, chunk: Chunk, outcome: Outcomes) -> Segment:
        results, raw_errors, seconds, retried = outcome
        counters = self.pool._counters
        if retried:
            self.pool._emit("task_retry", logging.INFO,
                            f"{retried} retr{'y' if retried == 1 else 'ies'} after transient "
                            f"errors in items {chunk.start}..{chunk.start + len(results) - 1}",
                            start=chunk.start, retries=retried)
        errors: dict[int, BaseException] = {}
        if raw_errors:
            for position, (exc, tb) in raw_errors.items():
                if isinstance(exc, SerializationError) and str(exc).startswith("the "):
                    # Found in the worker, which knows the item only by its place in the
                    # chunk: name it by its index in the input.
                    named = SerializationError(f"item {chunk.start + position}: {exc}")
                    named.__cause__ = exc.__cause__
                    exc = named
                elif tb and isinstance(chunk.rung, ProcessRung):
                    exc.__cause__ = RemoteTraceback(tb)
                errors[position] = exc
        counters.tasks_failed += len(errors)
        counters.tasks_completed += len(results) - len(errors)
        self.sizer.observe(len(results), seconds)
        return Segment(chunk.start, results, errors)

    def kill_running(self) -> None:
        """Stop this job's chunks where they run (process rungs kill their workers)."""
        by_rung: dict[Rung, list[str]] = {}
        for chunk in self.in_flight:
            if chunk.rung is not None and chunk.key:
                by_rung.setdefault(chunk.rung, []).append(chunk.key)
        for rung, keys in by_rung.items():
            if not rung.kill_chunks(keys):
                logger.warning("the %s rung cannot stop running tasks; they finish in "
                               "the background", rung.name)

    def abandon(self) -> None:
        """Drop this job: cancel what has not started; the rest finishes unseen."""
        while True:
            try:
                chunk, _ = self.receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            self.in_flight.discard(chunk)
            self.pool._chunk_left(chunk.rung)
            chunk.permit.release()
        for chunk in self.in_flight:
            chunk.abandoned = True
            if chunk.future is not None:
                chunk.future.cancel()
        self.in_flight.clear()
        self.send.close()
        self.receive.close()


class _Done(Rung):
    """The rung of a chunk whose outcome was decided in the parent."""

    name = "parent"

    async def aclose(self, kill: bool) -> None:
        return None


_DONE = _Done()


def _done(outcome: Outcomes) -> cf.Future[Any]:
    future: cf.Future[Any] = cf.Future()
    future.set_result(outcome)
    return future


def _release_after(segment: Segment) -> Segment:
    if segment.permit is not None:
        segment.permit.release()
        segment.permit = None
    return segment


async def _run_inline(fn: Callable[..., Any], items: list[Any], star: bool,
                      retries: int) -> Outcomes:
    """Run items in this task, giving the loop a turn between items every few ms."""
    results: list[Any] = []
    errors: dict[int, tuple[BaseException, str]] | None = None
    retried = 0
    started = last = time.perf_counter()
    for position, item in enumerate(items):
        delays = backoff_delays(0.05, 2.0, 1.0, 0.1)
        for attempt in range(retries + 1):
            try:
                results.append(fn(*item) if star else fn(item))
                break
            except Exception as exc:
                if attempt < retries and is_transient(exc):
                    retried += 1
                    await anyio.sleep(next(delays))
                    continue
                results.append(None)
                errors = errors or {}
                errors[position] = (exc, "")
                break
        now = time.perf_counter()
        if now - last >= _INLINE_SLICE:
            await anyio.lowlevel.checkpoint()
            last = time.perf_counter()
    await anyio.lowlevel.checkpoint()
    return Outcomes(results, errors, time.perf_counter() - started, retried)


def _assemble(segments: list[Segment], *, start: int = 0, total: int | None = None) -> list[Any]:
    """Results in input order from index ``start``, exceptions in place, MISSING in gaps."""
    out: list[Any] = []
    for segment in sorted(segments, key=lambda s: s.start):
        if len(out) < segment.start - start:
            out.extend([MISSING] * (segment.start - start - len(out)))
        values = segment.results
        if segment.errors:
            values = list(values)
            for position, exc in segment.errors.items():
                values[position] = exc
        out.extend(values)
    if total is not None and len(out) < total - start:
        out.extend([MISSING] * (total - start - len(out)))
    return out


def _limiter(rate: float | None) -> AsyncLimiter | None:
    """One item per 1/rate seconds: no burst, so no one-second window holds more than
    ``rate`` + 1 starts (a bucket of size ``rate`` would let 2 x rate through)."""
    if rate is None:
        return None
    if rate <= 0:
        raise ValueError(f"rate_limit={rate!r} is invalid: it must be a number > 0")
    if not on_asyncio():
        raise NotImplementedError(
            "rate_limit is backed by aiolimiter, which runs on asyncio only; under trio, "
            "limit the rate in the calling code")
    return AsyncLimiter(1, 1.0 / rate)
