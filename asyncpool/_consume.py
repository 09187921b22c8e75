"""The caller's side of a call: waiting for results under one deadline.

`collect` serves ``run``, ``map`` and ``starmap``; `ResultStream` serves
``imap``. Either way the deadline covers the whole call (a rung starting, a slow or
rate-limited input, waiting for a worker), and however the caller leaves (results,
an error, the deadline, cancellation) the call is finished with the engine at once.
"""

from __future__ import annotations

import functools
import math
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from ._call import Call, Mode
from ._errors import MISSING, DeadlineExceeded, PoolClosed, RemoteError, public
from ._functions import name_of
from ._progress import Reporter
from ._remote import message_of

if TYPE_CHECKING:
    from ._engine import Engine
    from ._loop import Background

T = TypeVar("T")

#: Longest stretch (s) a consumer is handed buffered results without the loop running.
SLICE = 0.002


class _Feeder:
    """Pulls a fed input (async, slow, or rate-limited) while the call lasts."""

    def __init__(self, engine: Engine, call: Call) -> None:
        self.engine, self.call = engine, call
        self.task: Background | None = None

    def check(self) -> None:
        call = self.call
        if (self.task is None or self.task.finished) and call.source.needs_feeder:
            # In the caller's context: an input's code reads its context variables.
            self.task = self.engine.loop.spawn(call.source.feed, self._want, self._arrived,
                                               context=call.source.context)

    def _want(self) -> int:
        if self.call in self.engine.stalled:
            return 0  # (under a rate limit, nothing is let through for it meanwhile)
        ahead = max(1, self.engine.read_ahead(self.call))
        # Under a rate limit, few wait at most: more would go out together.
        return min([ahead, *(limit.depth for limit in self.call.source.limits)])

    def _arrived(self) -> None:
        self.engine.resume(self.call)

    async def stop(self, wait: bool = True) -> None:
        """Stop pulling and close the input. An async generator's cleanup is its own
        code: after a deadline or a cancellation it finishes in the background, not
        on the caller's time; otherwise it is waited for (at most a second or so)."""
        if wait:
            await self._stop()
        else:
            self.call.source.close()
            self.engine.loop.spawn(self._stop)

    async def _stop(self) -> None:
        if self.task is not None:
            self.task.interrupt()  # an async generator's cleanup may await (asyncio)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.task.wait()
        await self.call.source.aclose()


def _deadline(call: Call) -> float:
    timeout = call.options.timeout
    call.deadline = math.inf if timeout is None else anyio.current_time() + timeout
    return call.deadline


class _Unbounded:
    """Stands for a deadline scope when the call has no timeout (none is made: a
    cancel scope per call is measurable on the per-request path)."""

    cancelled_caught = False

    def __enter__(self) -> _Unbounded:
        return self

    def __exit__(self, *exc: object) -> bool:
        return self.cancelled_caught  # (False: typed as a cancel scope's, for mypy)


_UNBOUNDED = _Unbounded()


def _scope(deadline: float) -> anyio.CancelScope | _Unbounded:
    if deadline == math.inf:
        return _UNBOUNDED
    return anyio.move_on_after(deadline - anyio.current_time())


def _raisable(error: BaseException) -> BaseException:
    """An item's error as the caller can be given it: a StopIteration raised from a
    coroutine becomes a RuntimeError, and a StopAsyncIteration from ``__anext__``
    ends the caller's ``async for`` as if every result had come. Those come as a
    RemoteError (the original is its cause, and stays as is in a list of results)."""
    if not isinstance(error, StopIteration | StopAsyncIteration):
        return error
    name = type(error).__qualname__
    text = str(error)
    wrapped = RemoteError(f"the task raised {name}{': ' + text if text else ''}",
                          type_name=name, traceback=str(error.__cause__ or ""))
    wrapped.__cause__ = error
    return wrapped


def _ended(call: Call, start: int) -> BaseException:
    """The error that ended ``call``: the pool's close says what finished (``partial``
    from input index ``start``), in an error of the call's own (one close error may
    stand for the items of several calls)."""
    error = call.error or call.first_error
    assert error is not None
    if isinstance(error, PoolClosed):
        return PoolClosed(str(error), _unfinished(call.partial(start)), start)
    return error


def _unfinished(values: list[Any]) -> list[Any]:
    """``values`` with the items the pool's close failed as MISSING: they did not run."""
    return [MISSING if isinstance(v, PoolClosed) else v for v in values]


def _exceeded(engine: Engine, call: Call, start: int = 0) -> DeadlineExceeded:
    """The call's deadline passed: said (a ``deadline`` event), and the error to raise
    (``.partial`` from input index ``start``)."""
    unfinished = call.pulled - call.finished
    engine.emit("deadline", f"deadline of {call.options.timeout} s passed",
                unfinished=unfinished)
    return DeadlineExceeded(
        f"the deadline of {call.options.timeout} s passed with {unfinished} item(s) "
        "taken and unfinished; `.partial` holds what finished", call.partial(start), start)


def _kills(error: BaseException, call: Call) -> bool:
    """Whether ``call``, ended by ``error``, stops its items where they run: at its
    deadline as ``kill_on_timeout`` says, cancelled (or interrupted) as
    ``cancel_running`` says; failing with an error, no."""
    if isinstance(error, DeadlineExceeded):
        return call.options.kill_on_timeout
    return False if isinstance(error, Exception) else call.options.kill_on_cancel


async def collect(engine: Engine, call: Call) -> list[Any]:
    """Every result of ``call``, in input order; raises its first failure."""
    reporter = Reporter(call.options.progress, lambda: call.source.total)
    feeder = _Feeder(engine, call)
    deadline = _deadline(call)
    kill = False
    engine.add(call)
    late = True  # ended by its deadline or a cancellation
    try:
        with _scope(deadline):
            while True:
                feeder.check()
                reporter.advance(call.finished - reporter.done)
                if call.error is not None or call.first_error is not None:
                    late = False
                    # Not through a local: this frame, in its traceback, would
                    # hold it (a cycle, its arguments in it, until the cyclic GC).
                    raise _raisable(_ended(call, 0))
                if call.complete:
                    late = False
                    return call.results()
                await call.wait()
        raise _exceeded(engine, call) from None
    except BaseException as exc:
        kill = _kills(exc, call)
        raise
    finally:
        await _end(engine, call, reporter, feeder, kill, wait=not late)


async def _end(engine: Engine | None, call: Call, reporter: Reporter, feeder: _Feeder,
               kill: bool, wait: bool) -> None:
    """The call is over: the engine (if it was given the call) forgets it, killing its
    running items with ``kill``; its progress closes, its feeder stops (``wait``: for
    the input's own cleanup), and it lets go of what it holds."""
    if engine is not None:
        engine.finish(call, kill=kill)
    reporter.close()
    await feeder.stop(wait)
    call.let_go()


class ResultStream(Generic[T]):
    """The results of [`imap`][asyncpool.ResilientPool.imap], as they come.

    Use `async for value in pool.imap(...)`. To leave early and have the call finished
    at a known point (on trio, or when other work follows), use it as a context (see
    the example). Leaving the block (or `await results.aclose()`) finishes the call:
    items not started never run, and running ones finish unseen, or are killed with
    `cancel_running="kill"`.

    Several tasks may iterate one stream: each value goes to one of them. One of them
    cancelled while others wait for a value leaves the stream to those; the last one
    waiting that is cancelled ends the call, and so does an error raised to one of
    them: the others then get `PoolClosed` saying so (not a silent end).

    Raises:
        Exception: (from `async for`) what [`imap`][asyncpool.ResilientPool.imap]
            raises: a failed item's exception (unless `return_exceptions`),
            `DeadlineExceeded`, `WorkerCrashed`, `SerializationError`, `RemoteError`;
            `PoolClosed` if iterated from another event loop, after the pool closed,
            or after another task sharing the stream ended it.

    Example:
        ```python
        async with pool.imap(fn, items) as results:
            async for value in results:
                if done(value):
                    break
        ```
    """

    def __init__(self, engine: Engine, call: Call, pool: object = None) -> None:
        self._engine = engine
        self._call = call
        #: A pool dropped unclosed stops its workers: not while a stream of it lives.
        self._pool = pool
        self._reporter = Reporter(call.options.progress, lambda: call.source.total)
        self._feeder = _Feeder(engine, call)
        self._deadline = _deadline(call)
        #: What arrived and is not yet handed over: values[at:], failed ones by offset.
        self._values: list[Any] = []
        self._failed_at: frozenset[int] = frozenset()
        self._at = 0
        self._closed = False
        self._started = False
        #: Tasks inside __anext__ (several may share a stream), and which one ended it
        #: and how (an error raised to it, its cancellation), if one did.
        self._inside = 0
        self._ended: tuple[int, str] | None = None
        #: When this stream last let the loop run: a consumer handed results that are
        #: already here never waits, so it yields once every SLICE.
        self._yielded = time.perf_counter()

    def __repr__(self) -> str:
        return (f"<ResultStream of {name_of(self._call.fn)} "
                f"({'closed' if self._closed else 'open'})>")

    def __aiter__(self) -> ResultStream[T]:
        return self

    async def __aenter__(self) -> ResultStream[T]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def __anext__(self) -> T:
        self._inside += 1
        try:
            while True:
                if self._at >= len(self._values):
                    await self._refill()
                if self._at & 3 or time.perf_counter() - self._yielded <= SLICE:
                    break
                # Before a value is taken: a task cancelled here takes none (another
                # task sharing the stream gets it).
                await anyio.lowlevel.checkpoint()
                self._yielded = time.perf_counter()
        finally:
            self._inside -= 1
        at, values, failed_at = self._at, self._values, self._failed_at
        self._at += 1
        value = values[at]
        if at in failed_at and not self._call.options.return_exceptions:
            if isinstance(value, PoolClosed):  # an item's: the call's own, saying more
                value = self._closed_at(value, values, at)
            elif self._call.mode is Mode.ORDERED:  # not always the first that failed
                self._call.name_item(value, self._call.consumed - len(values) + at)
            self._ended = _how_ended(value)
            await self.aclose(kill=False)
            try:
                raise _raisable(value)
            finally:
                del value, values  # this frame, in its traceback, must not hold it (a cycle)
        return value  # type: ignore[no-any-return]

    async def _refill(self) -> None:
        """The next values (raises StopAsyncIteration at the end)."""
        if not self._closed:
            if not self._engine.loop.is_current():
                # Before every wait, not only the first: it would wait for good (and
                # nothing of the pool's may be touched from here).
                raise PoolClosed("this pool was opened on another event loop (or "
                                 "thread); iterate its imap there")
            try:
                await self._fill()
            except BaseException as exc:
                if not isinstance(exc, Exception) and self._inside > 1:
                    raise  # this task's cancellation: the others inside go on
                self._ended = _how_ended(exc)
                late = isinstance(exc, DeadlineExceeded) or not isinstance(exc, Exception)
                with anyio.CancelScope(shield=True):
                    await self._finish(_kills(exc, self._call), wait=not late)
                raise
        if self._at < len(self._values):
            return
        if self._ended is not None:
            task, how = self._ended
            if task != anyio.get_current_task().id:
                # Another task sharing the stream ended it: no silent end for this one.
                raise PoolClosed(f"this imap stream was ended by another task iterating "
                                 f"it ({how}); its other results are lost" + (
                                     " (a wait under asyncio.wait_for is a task of its "
                                     "own: to bound the wait, give the call a timeout=)"
                                     if how == CANCELLED else ""))
            if how == CANCELLED:  # nor for one whose wait was cancelled (a timeout)
                raise PoolClosed("this imap stream ended when this task's wait for its "
                                 "next result was cancelled; its other results are lost "
                                 "(to bound the wait, give the call a timeout=)")
        await self.aclose(kill=False)
        raise StopAsyncIteration

    def _closed_at(self, error: PoolClosed, held: list[Any], at: int) -> PoolClosed:
        """The pool's close that failed item ``at`` of those ``held``, with what
        finished from there (a close with kill fails every item left, not the call)."""
        call = self._call
        start = call.consumed - len(held) + at
        return PoolClosed(str(error), _unfinished([*held[at:], *call.partial(call.consumed)]),
                          start)

    async def _fill(self) -> None:
        call, engine = self._call, self._engine
        if not self._started:
            self._started = True
            engine.add(call)
        ordered = call.mode is Mode.ORDERED
        with _scope(self._deadline):
            while True:
                if self._closed or self._at < len(self._values):
                    return  # closed, or values fetched, by another task as this one waited
                self._feeder.check()
                got = call.next_ordered() if ordered else call.next_unordered()
                if got is not None:
                    self._values, self._failed_at = got
                    self._at = 0
                    self._reporter.advance(len(self._values))
                    engine.resume(call)
                    return
                if call.error is not None:
                    raise _raisable(_ended(call, call.consumed))
                if call.complete:
                    return
                await call.wait()
                self._yielded = time.perf_counter()
        if self._ended is not None:  # another task sharing it met the deadline first
            raise DeadlineExceeded(f"the deadline of {call.options.timeout} s passed; "
                                   "another task iterating this imap stream was given "
                                   "`.partial`", [], call.consumed) from None
        raise _exceeded(engine, call, call.consumed) from None

    async def aclose(self, kill: bool | None = None) -> None:
        """Finish the call now: what has not started never runs, and what runs
        finishes unseen, or with ``cancel_running="kill"`` (the default for ``kill``
        here) is stopped. An async generator input is closed before this returns
        (given a second or so). Idempotent; never raises.

        Args:
            kill: Stop its running items now (True), or let them finish unseen
                (False); by default as the call's ``cancel_running`` says.

        Example:
            ```python
            results = pool.imap(search, candidates, ordered=False)
            async for hit in results:
                if hit.good:
                    break
            await results.aclose(kill=True)  # the rest stops now, not at collection
            ```
        """
        await self._finish(kill, wait=True)

    async def _finish(self, kill: bool | None, wait: bool) -> None:
        if kill is None:
            kill = self._call.options.kill_on_cancel
        if self._closed:
            return
        self._closed = True
        self._values, self._at = [], 0
        self._call.wake()  # another task waiting for its next result sees it closed
        await _end(self._engine if self._started else None, self._call, self._reporter,
                   self._feeder, kill, wait)

    def __del__(self) -> None:
        # Left without aclose (a `break` in `async for`): finish the call, which needs
        # no await, on the loop (the garbage collector may run this on any thread).
        # (Not if __init__ failed: it has no _closed.)
        if not getattr(self, "_closed", True) and self._started:
            self._closed = True
            finish = functools.partial(_abandon, self._engine, self._call,
                                       self._feeder.task)
            try:
                if self._engine.loop.is_current():
                    finish()
                else:
                    self._engine.loop.call_soon_threadsafe(finish)
            except Exception:
                pass


CANCELLED = "it was cancelled"


def _how_ended(error: BaseException) -> tuple[int, str]:
    """The task ending a stream with ``error``, and how, for others sharing it."""
    task = anyio.get_current_task().id
    if not isinstance(error, Exception):
        return task, CANCELLED
    message = message_of(error)
    return task, f"it raised {type(error).__name__}" + (f": {message}" if message else "")


def _abandon(engine: Engine, call: Call, feeder: Background | None) -> None:
    """A stream left without aclose: its call ends, its feeder task is cancelled."""
    engine.finish(call, kill=call.options.kill_on_cancel)
    if feeder is not None:
        feeder.cancel()
    call.source.close()


public(ResultStream)
