"""ResilientPool: the public façade and its lifecycle."""

from __future__ import annotations

import enum
import functools
import logging
import os
import weakref
from collections.abc import AsyncIterable, Callable, Iterable
from types import TracebackType
from typing import Any, Literal, TypeVar, TypeVarTuple, Unpack, overload

from ._call import Call, Mode
from ._config import PoolConfig, PoolOptions
from ._consume import ResultStream, collect
from ._engine import Engine, build_engine
from ._errors import PoolClosed, public
from ._events import Counters, Emitter, EventHook, PoolStatistics
from ._functions import FunctionBook, Shipped, check_function
from ._loop import Loop, current_loop
from ._options import PER_CALL, CallKwargs, CallOptions
from ._rungs import CLUSTER, OUT_OF_PROCESS, close_parked_workers
from ._source import RateLimit, Source

logger = logging.getLogger("asyncpool")

T = TypeVar("T")
A = TypeVar("A")
Ts = TypeVarTuple("Ts")


class PoolState(enum.IntEnum):
    NEW, OPEN, CLOSING, CLOSED = range(4)


class ResilientPool:
    """A pool of worker processes that degrades to threads, then inline, and climbs back.

    Use it as ``async with ResilientPool() as pool:``.

    Args:
        max_workers: Worker processes (threads on the thread rung); by default the
            cores this process may use.
        config: A [`PoolConfig`][asyncpool.PoolConfig] to start from.
        on_event: Called on the loop with a [`PoolEvent`][asyncpool.PoolEvent] for each
            fault and recovery (they are also logged on the ``asyncpool`` logger).
        **options: Any other field of [`PoolConfig`][asyncpool.PoolConfig]
            (``initializer``, ``max_tasks_per_worker``, ``rungs``, ``dask_address``...).

    Raises:
        TypeError: an unknown option (the message names the nearest valid one), or a
            value of the wrong type.
        ValueError: a value out of range.
        InitializerFailed: (on entering) the ``initializer`` raised, killed its worker or
            did not return within ``start_timeout``.
        PoolClosed: (on entering) the pool was entered before (make a new one), or
            another task closed it while it opened.

    Example:
        ```python
        def square(x: int) -> int:
            return x * x

        async with ResilientPool(max_workers=4) as pool:
            total = await pool.run(sum, [1, 2, 3])
            squares = await pool.map(square, range(1000))
        ```
    """

    def __init__(self, max_workers: int | None = None, *, config: PoolConfig | None = None,
                 on_event: EventHook | None = None, **options: Unpack[PoolOptions]) -> None:
        settings: dict[str, Any] = dict(options)
        if max_workers is not None:
            settings["max_workers"] = max_workers
        self.config = PoolConfig.build(config, settings, PER_CALL)
        """The settings: a [`PoolConfig`][asyncpool.PoolConfig] (``pool.config.rungs``)."""
        self._state = PoolState.NEW
        self._counters = Counters()
        # Its background tasks must not keep the pool alive (see Ladder.abandon).
        self._emit = Emitter(on_event, functools.partial(_backend_of, weakref.ref(self)))
        self._functions = FunctionBook()
        self._limit = RateLimit(self.config.rate_limit) if self.config.rate_limit else None
        #: Functions travel to worker processes only if the ladder has any.
        self._pickles = not OUT_OF_PROCESS.isdisjoint(self.config.ladder)
        self._loop: Loop | None = None
        self._engine: Engine | None = None
        #: The process that opened the pool: a forked child may not touch its workers.
        self._pid: int | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ResilientPool:
        if self._state is not PoolState.NEW:
            raise PoolClosed("a ResilientPool can be entered once; create a new one")
        self._loop = current_loop()
        self._pid = os.getpid()
        self._engine = build_engine(self.config, self._counters, self._emit, self._loop)
        self._finalizer = weakref.finalize(self, self._engine.ladder.abandon, self._pid)
        self._finalizer.atexit = False  # at exit the fork server stops every worker
        self._state = PoolState.OPEN
        try:
            await self._engine.ladder.open()
        except BaseException:
            await self.aclose(kill=True)
            raise
        if self._state is not PoolState.OPEN:  # another task closed it (it looked open)
            raise PoolClosed("the pool was closed while it opened")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Leaving on KeyboardInterrupt, SystemExit or cancellation must not wait for
        # running work: it is killed. A normal exit (or an ordinary error) lets it finish.
        await self.aclose(kill=exc_type is not None and not issubclass(exc_type, Exception))

    async def aclose(self, *, kill: bool = False) -> None:
        """Close the pool; later calls raise [`PoolClosed`][asyncpool.PoolClosed].

        Args:
            kill: Stop running work at once (worker processes are killed, with
                whatever they started). Without it, what was sent to workers for
                calls still waiting finishes first (up to three chunks a worker),
                and items nobody waits for any more (their call timed out or was
                cancelled) are killed.

        Items of waiting calls that were never sent fail with ``PoolClosed``. Idempotent:
        a second call while the first closes returns once the pool is closed (with
        ``kill``, it stops the running work the first one waits for).

        A caller's deadline or cancellation ends the wait: what runs is then killed.

        Raises:
            PoolClosed: called from another event loop (or thread) than the one that
                entered the pool; the pool stays open for its own loop.

        Example:
            ```python
            pool = ResilientPool()
            await pool.__aenter__()       # an application's startup
            ...
            with anyio.move_on_after(10):  # its shutdown, with a deadline
                await pool.aclose()
            ```
        """
        if self._state is PoolState.CLOSED:
            return
        if self._pid is not None and self._pid != os.getpid():
            self._state = PoolState.CLOSED  # the parent's workers are the parent's
            return
        if self._loop is not None and not self._loop.is_current():
            # Its tasks and events are the other loop's: closing from here would hang,
            # and leave the pool broken for its own loop (its finalizer kept).
            raise PoolClosed("this pool was opened on another event loop (or thread); "
                             "close it there, where it was entered")
        if self._finalizer is not None:
            self._finalizer.detach()
        engine = self._engine
        self._state = PoolState.CLOSING
        try:
            if engine is not None:
                await engine.aclose(kill)
        finally:
            if engine is None or engine.closed:  # (not a second close given up waiting)
                self._state = PoolState.CLOSED

    @staticmethod
    async def close_idle_workers() -> int:
        """Stop the idle workers that pools with ``reuse_workers=True`` left parked;
        returns how many there were. Never raises.

        Example:
            ```python
            async with ResilientPool(reuse_workers=True) as pool:
                await pool.map(square, range(100))
            stopped = await ResilientPool.close_idle_workers()
            ```
        """
        return close_parked_workers()

    @property
    def backend(self) -> str | None:
        """The rung serving now: "process", "thread", "inline" or "dask" (None when
        closed or between rungs).

        Example:
            ```python
            if pool.backend != "process":
                log.warning("degraded: serving on %s", pool.backend)
            ```
        """
        engine = self._engine
        if engine is None or self._state is not PoolState.OPEN:
            return None
        rung = engine.ladder.serving
        return rung.name if rung is not None and rung.usable else None

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool's counters; never blocks, never raises.

        Example:
            ```python
            stats = pool.statistics()
            log.info("%s: %d done", stats.backend, stats.tasks_completed)
            ```
        """
        engine = self._engine
        rung = engine.ladder.serving if engine is not None else None
        return self._counters.snapshot(
            self.backend,
            workers=rung.workers if rung is not None else 0,
            chunks_in_flight=len(engine.in_flight) if engine is not None else 0,
            max_chunks_in_flight=rung.capacity if rung is not None else 0,
            active_calls=len(engine.calls) if engine is not None else 0)

    def __repr__(self) -> str:
        return (f"<ResilientPool {self._state.name.lower()} backend={self.backend} "
                f"max_workers={self.config.max_workers}>")

    # -- the public calls ----------------------------------------------------------

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts,
                  **options: Unpack[CallKwargs]) -> T:
        """Run ``fn(*args)`` in a worker and return its result.

        Concurrent ``run`` calls share chunks, so many small calls cost few round
        trips; each caller gets its result as soon as its own item finishes. Keyword
        arguments for ``fn`` go through ``functools.partial``.

        Args:
            fn: A picklable callable (module-level function, partial, lambda).
            *args: Its arguments.
            **options: Per-call options (see [`CallKwargs`][asyncpool.CallKwargs]):
                ``timeout``, ``kill_on_timeout``, ``cancel_running``, and the Dask
                ``resources``, ``workers``, ``allow_other_workers``, ``priority``
                (``chunk_size``, ``rate_limit`` and ``progress`` are accepted too).

        Raises:
            Exception: ``fn``'s own exception, with the worker's traceback as
                ``__cause__``.
            DeadlineExceeded: ``timeout`` passed (a ``TimeoutError``).
            WorkerCrashed: the item killed its worker ``max_crashes_per_item`` times.
            SerializationError: ``fn``, an argument or the result cannot be pickled.
            RemoteError: the exception cannot be rebuilt here, or the task raised
                ``SystemExit``/``KeyboardInterrupt``.
            FunctionUnavailable: the workers cannot load ``fn``.
            InitializerFailed: the ``initializer`` fails in the replacement workers.
            PoolUnavailable: no rung of the ladder can start (none ends inline).
            PoolClosed: the pool is not open, or belongs to another event loop.
            TypeError, ValueError: an unknown or invalid option (named, with the
                nearest valid one), or ``fn`` is not callable or is async.

        Example:
            ```python
            # One call per request, from many tasks at once.
            score = await pool.run(model_score, features, timeout=2.0)
            # Keyword arguments through a partial.
            text = await pool.run(functools.partial(render, page, lang="fr"))
            ```
        """
        if "return_exceptions" in options:
            raise TypeError("run() takes no return_exceptions: it returns one result; "
                            "catch the exception instead")
        call = self._call(fn, [args], True, Mode.LIST, CallOptions.build(**options))
        results = await collect(self._engine_now(), call)
        return results[0]  # type: ignore[no-any-return]

    @overload
    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: Literal[False] = ...,
                  **options: Unpack[CallKwargs]) -> list[T]: ...

    @overload
    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: bool, **options: Unpack[CallKwargs]
                  ) -> list[T | BaseException]: ...

    async def map(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
                  return_exceptions: bool = False, **options: Unpack[CallKwargs]) -> list[Any]:
        """``[fn(x) for x in items]`` in the workers, in input order.

        ``items`` may be any iterable (read lazily, never blocking the loop) or an
        async iterable.

        Args:
            fn: A picklable callable of one argument.
            items: The inputs.
            return_exceptions: Put each failed item's exception in its place instead
                of raising the first.
            **options: Per-call options (see [`CallKwargs`][asyncpool.CallKwargs]):
                ``timeout``, ``kill_on_timeout``, ``cancel_running``, ``chunk_size``,
                ``rate_limit``, ``progress``, and the Dask ones.

        Raises:
            Exception: The first failing item's exception (unless
                ``return_exceptions``), with the worker's traceback as ``__cause__``;
                or the exception the input itself raised.
            DeadlineExceeded: ``timeout`` passed; ``.partial`` holds every finished
                result in place and ``MISSING`` for the rest.
            WorkerCrashed, SerializationError, RemoteError: for an item, as for
                [`run`][asyncpool.ResilientPool.run] (in place with ``return_exceptions``).
            FunctionUnavailable, InitializerFailed, PoolUnavailable: as for ``run``,
                for the whole call even with ``return_exceptions``.
            PoolClosed: the pool is not open, or belongs to another event loop.
            TypeError, ValueError: as for ``run``; also an input that is not iterable.

        Example:
            ```python
            sizes = await pool.map(len, ["a", "bb", "ccc"])           # [1, 2, 3]
            outcomes = await pool.map(parse, lines, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            ```
        """
        call = self._call(fn, items, False, Mode.LIST,
                          CallOptions.build(return_exceptions, **options))
        del items  # the call holds the input: dropping it is the call's (off the loop)
        return await collect(self._engine_now(), call)

    @overload
    async def starmap(self, fn: Callable[[*Ts], T],
                      items: Iterable[tuple[*Ts]] | AsyncIterable[tuple[*Ts]], *,
                      return_exceptions: Literal[False] = ...,
                      **options: Unpack[CallKwargs]) -> list[T]: ...

    @overload
    async def starmap(self, fn: Callable[[*Ts], T],
                      items: Iterable[tuple[*Ts]] | AsyncIterable[tuple[*Ts]], *,
                      return_exceptions: bool, **options: Unpack[CallKwargs]
                      ) -> list[T | BaseException]: ...

    async def starmap(self, fn: Callable[[*Ts], T],
                      items: Iterable[tuple[*Ts]] | AsyncIterable[tuple[*Ts]], *,
                      return_exceptions: bool = False,
                      **options: Unpack[CallKwargs]) -> list[Any]:
        """Like [`map`][asyncpool.ResilientPool.map], calling ``fn(*args)`` for each
        tuple ``args`` in ``items``.

        Args:
            fn: A picklable callable.
            items: Tuples of arguments.
            return_exceptions: As for [`map`][asyncpool.ResilientPool.map].
            **options: As for [`map`][asyncpool.ResilientPool.map].

        Raises:
            Exception: Each as for [`map`][asyncpool.ResilientPool.map]. An item is
                unpacked as by ``itertools.starmap``: one not iterable (or that does not
                pickle) fails alone, as its own ``TypeError`` (``SerializationError``).

        Example:
            ```python
            powers = await pool.starmap(pow, [(2, 5), (3, 2)])  # [32, 9]
            ```
        """
        call = self._call(fn, items, True, Mode.LIST,
                          CallOptions.build(return_exceptions, **options))
        del items  # the call holds the input: dropping it is the call's (off the loop)
        return await collect(self._engine_now(), call)

    @overload
    def imap(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
             ordered: bool = True, return_exceptions: Literal[False] = ...,
             **options: Unpack[CallKwargs]) -> ResultStream[T]: ...

    @overload
    def imap(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
             ordered: bool = True, return_exceptions: bool,
             **options: Unpack[CallKwargs]) -> ResultStream[T | BaseException]: ...

    def imap(self, fn: Callable[[A], T], items: Iterable[A] | AsyncIterable[A], *,
             ordered: bool = True, return_exceptions: bool = False,
             **options: Unpack[CallKwargs]) -> ResultStream[Any]:
        """Stream ``fn(x)`` for each item, in input order or (``ordered=False``) as done.

        Memory stays flat: the input is read only as far ahead as the workers and the
        consumer need. Leaving an ``async for`` early finishes the call; to have it
        finished at a known point, use ``async with pool.imap(...) as results:``.

        Args:
            fn: A picklable callable of one argument.
            items: The inputs (iterable or async iterable, read lazily).
            ordered: Yield in input order (default) or as items finish.
            return_exceptions: Yield each failed item's exception instead of raising.
            **options: As for [`map`][asyncpool.ResilientPool.map].

        Raises:
            Exception: (while iterating) a failed item's exception, unless
                ``return_exceptions``; or the exception the input raised.
            DeadlineExceeded: ``timeout`` passed; ``.start`` is the first index not
                yielded and ``.partial`` what finished from there.
            WorkerCrashed, SerializationError, RemoteError: (while iterating) as for
                [`map`][asyncpool.ResilientPool.map]; so are ``FunctionUnavailable``,
                ``InitializerFailed`` and ``PoolUnavailable``.
            PoolClosed, TypeError, ValueError: raised by ``imap()`` itself, as for
                ``map``.

        Example:
            ```python
            async with pool.imap(parse, open("huge.jsonl"), ordered=False) as results:
                async for record in results:
                    await store(record)
            ```
        """
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered={ordered!r} is invalid: it must be True or False")
        mode = Mode.ORDERED if ordered else Mode.UNORDERED
        call = self._call(fn, items, False, mode,
                          CallOptions.build(return_exceptions, ("ordered",), **options))
        return ResultStream(self._engine_now(), call, self)

    # -- helpers -------------------------------------------------------------------

    def _engine_now(self) -> Engine:
        engine = self._engine
        if self._state is not PoolState.OPEN or engine is None:
            raise PoolClosed("the pool is closed (or was never entered): use "
                             "`async with ResilientPool() as pool:`")
        assert self._loop is not None
        if self._pid != os.getpid():
            raise PoolClosed(f"this pool belongs to process {self._pid}, which forked this "
                             "one; open a ResilientPool in this process")
        if not self._loop.is_current():
            raise PoolClosed("this pool was opened on another event loop (or thread); "
                             "open one ResilientPool per event loop, inside it")
        return engine

    def _call(self, fn: Any, items: Any, star: bool, mode: Mode,
              options: CallOptions) -> Call:
        self._engine_now()
        check_function(fn)
        shipped = self._functions.ship(fn) if self._pickles else _LOCAL
        if options.dask and CLUSTER.isdisjoint(self.config.ladder):
            logger.debug("Dask options %s ignored: this pool has no Dask cluster",
                         sorted(options.dask))
        limits = [RateLimit(options.rate_limit)] if options.rate_limit else []
        if self._limit is not None:
            limits.append(self._limit)  # the pool's last (see Source.feed)
        assert self._loop is not None
        return Call(fn, shipped, star, Source(items, limits), options,
                    self._functions.timing(fn, apart=options.placed), mode, self._loop.event)


def _backend_of(pool: weakref.ref[ResilientPool]) -> str | None:
    found = pool()
    return None if found is None else found.backend


#: Functions that never leave this process (a ladder of threads and inline) ship as this.
_LOCAL = Shipped(0, b"", "local", True)
public(ResilientPool)
