"""The public calls on real worker processes, on asyncio and on trio."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncpool
from asyncpool import (MISSING, DeadlineExceeded, PoolClosed, RemoteTraceback, ResilientPool,
                       SerializationError)

from . import tasks
from .helpers import alive, idle, run_code, run_script, wait_until

pytestmark = pytest.mark.anyio


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.fixture
async def pool(anyio_backend: str) -> AsyncIterator[ResilientPool]:
    async with ResilientPool(max_workers=2) as p:
        yield p


async def test_run_map_starmap_imap(pool: ResilientPool, no_leaks: None) -> None:
    assert pool.backend == "process"
    assert await pool.run(tasks.add, 2, 3) == 5
    assert await pool.run(functools.partial(tasks.fail_on, bad=-1), 9) == 9
    assert await pool.map(tasks.square, range(1000)) == [i * i for i in range(1000)]
    assert await pool.map(tasks.square, (i for i in range(500))) == [i * i for i in range(500)]
    assert await pool.map(tasks.square, agen(300)) == [i * i for i in range(300)]
    assert await pool.map(tasks.square, []) == []
    assert await pool.starmap(tasks.add, [(1, 2), (3, 4)]) == [3, 7]
    ordered = [y async for y in pool.imap(tasks.square, (i for i in range(700)))]
    assert ordered == [i * i for i in range(700)]
    unordered = [y async for y in pool.imap(tasks.square, agen(700), ordered=False)]
    assert sorted(unordered) == [i * i for i in range(700)]
    assert [y async for y in pool.imap(tasks.square, [])] == []


async def test_concurrent_calls_each_get_their_own_results(pool: ResilientPool) -> None:
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        if i % 3 == 0:
            results[i] = await pool.run(tasks.add, i, 1)
        elif i % 3 == 1:
            results[i] = await pool.map(tasks.square, range(i))
        else:
            results[i] = [y async for y in pool.imap(tasks.add_one_each, [(i, 1), (i, 2)])]

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    for i in range(60):
        expected = (i + 1 if i % 3 == 0 else [x * x for x in range(i)] if i % 3 == 1
                    else [i + 1, i + 2])
        assert results[i] == expected, i


TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="unset")


def tenants(n: int) -> Iterator[str]:
    for _ in range(n):
        yield TENANT.get()


async def async_tenants(n: int) -> AsyncIterator[str]:
    for _ in range(n):
        yield TENANT.get()


async def test_an_input_sees_the_callers_context_variables(pool: ResilientPool) -> None:
    # A generator pulled in a thread saw none of them (as a thread without
    # asyncio.to_thread's copy would); on trio, an async generator neither.
    TENANT.set("acme")
    for make in (tenants, async_tenants):
        assert await pool.map(str.upper, make(50)) == ["ACME"] * 50
        assert [y async for y in pool.imap(str.upper, make(50))] == ["ACME"] * 50


async def test_a_range_too_long_for_len_is_iterated(pool: ResilientPool) -> None:
    # len() of it raised OverflowError, a bare one, from the call.
    got: list[int] = []
    with anyio.fail_after(30):
        async with pool.imap(tasks.square, range(3, sys.maxsize * 4, 2)) as results:
            async for y in results:
                got.append(y)
                if len(got) == 5:
                    break
    assert got == [9, 25, 49, 81, 121]


async def test_ordered_imap_with_uneven_items(pool: ResilientPool) -> None:
    # Early items are slow, so later chunks finish first: order must still hold.
    durations = [0.05] * 4 + [0.0] * 60
    got = [y async for y in pool.imap(tasks.nap, durations, chunk_size=2)]
    assert got == durations


async def test_imap_ordered_must_be_a_bool(pool: ResilientPool) -> None:
    # None silently streamed unordered results.
    for value in (None, "yes"):
        with pytest.raises(TypeError, match=f"ordered={value!r}"):
            pool.imap(tasks.square, range(3), ordered=value)  # type: ignore[arg-type]


async def test_per_item_errors(pool: ResilientPool) -> None:
    results = await pool.map(tasks.fail_on, range(6), return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], ValueError) and "item 3" in str(results[3])
    with pytest.raises(ValueError, match="item 3") as info:
        await pool.map(tasks.fail_on, range(6))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    got = [y async for y in pool.imap(tasks.fail_on, range(6), return_exceptions=True)]
    assert isinstance(got[3], ValueError) and got[5] == 5
    with pytest.raises(ValueError, match="item 3"):
        async for _ in pool.imap(tasks.fail_on, range(6)):
            pass
    stats = pool.statistics()
    assert stats.tasks_failed >= 3 and stats.tasks_completed >= 10
    assert await pool.map(tasks.square, range(5)) == [0, 1, 4, 9, 16]


async def test_statistics_is_frozen(pool: ResilientPool) -> None:
    await pool.map(tasks.square, range(10))
    stats = pool.statistics()
    assert stats.backend == "process" and stats.tasks_completed == 10
    assert stats.max_chunks_in_flight == 6 and stats.active_calls == 0  # 3 per worker
    with pytest.raises(AttributeError):
        stats.tasks_completed = 0  # type: ignore[misc]


async def test_every_item_taken_is_counted_once_however_its_call_ended(
        anyio_backend: str) -> None:
    # A timed-out or cancelled call's items, and those after a map's first error, were
    # counted nowhere: completed and failed did not add up to the items taken.
    async with ResilientPool(max_workers=2) as pool:
        with pytest.raises(DeadlineExceeded):
            await pool.run(tasks.nap, 5.0, timeout=0.2, kill_on_timeout=True)
        with anyio.move_on_after(0.2):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(functools.partial(pool.run, tasks.nap, 5.0,
                                                    cancel_running="kill"))
        with pytest.raises(ValueError):
            await pool.map(tasks.fail_on, [3] * 10 + list(range(3)), chunk_size=1)
        await pool.map(tasks.square, range(7))
        stats = pool.statistics()
        assert stats.tasks_completed + stats.tasks_failed + stats.tasks_abandoned == 31
        assert stats.tasks_abandoned >= 11 and stats.tasks_completed >= 7


async def test_items_read_from_a_generator_and_killed_by_a_close_are_counted(
        anyio_backend: str) -> None:
    # The items a generator input had yielded when its call timed out were counted
    # only as far as they had gone out (9 to 22 of 200 added up), and the items a
    # killing close stopped mid-run were counted nowhere.
    read = 0

    def naps() -> Iterator[float]:
        nonlocal read
        for _ in range(200):
            read += 1
            yield 0.05

    pool = ResilientPool(max_workers=2)
    async with pool:
        with pytest.raises(DeadlineExceeded):
            await pool.map(tasks.nap, naps(), timeout=0.3)
        stats = pool.statistics()
        assert stats.tasks_completed + stats.tasks_failed + stats.tasks_abandoned == read
        async with anyio.create_task_group() as tg:
            async def doomed() -> None:
                with pytest.raises(PoolClosed):
                    await pool.map(tasks.nap, [0.05] * 200)

            tg.start_soon(doomed)
            await wait_until(lambda: pool.statistics().tasks_completed > stats.tasks_completed)
            await pool.aclose(kill=True)
    stats = pool.statistics()
    assert stats.tasks_completed + stats.tasks_failed + stats.tasks_abandoned == read + 200


async def test_private_workers_per_pool(anyio_backend: str) -> None:
    async with ResilientPool(max_workers=1) as a, ResilientPool(max_workers=2) as b:
        pids_a = set(await a.map(tasks.pid_of, range(20)))
        pids_b = set(await b.map(tasks.pid_of, range(20)))
        assert pids_a.isdisjoint(pids_b) and len(pids_a) == 1
        assert a.backend == b.backend == "process"


async def test_closed_pool_refuses(anyio_backend: str) -> None:
    pool = ResilientPool(max_workers=1, rungs=("thread", "inline"))
    assert "new" in repr(pool)
    with pytest.raises(PoolClosed):
        await pool.run(tasks.square, 2)
    async with pool:
        assert "open" in repr(pool) and "thread" in repr(pool)
        assert await pool.run(tasks.square, 3) == 9
    assert "closed" in repr(pool)
    with pytest.raises(PoolClosed):
        await pool.map(tasks.square, [1])
    with pytest.raises(PoolClosed, match="entered once"):
        async with pool:
            pass
    assert pool.backend is None


async def test_lambdas_run_and_an_unpicklable_function_is_named(pool: ResilientPool) -> None:
    assert await pool.map(lambda x: x + 1, [1, 2]) == [2, 3]
    lock = threading.Lock()
    with pytest.raises(asyncpool.SerializationError, match="function"):
        await pool.map(functools.partial(lambda held, x: x, lock), [1])


async def test_an_async_function_is_refused_at_once(pool: ResilientPool) -> None:
    # Every item failed with "a coroutine ... is not plain data", and a warning that
    # the coroutine was never awaited.
    async def twice(x: int) -> int:
        return 2 * x

    class Twice:
        async def __call__(self, x: int) -> int:
            return 2 * x

    for fn in (twice, functools.partial(twice), Twice(), functools.partial(Twice())):
        with pytest.raises(TypeError, match="is an async function"):
            await pool.map(fn, [1])
    assert await pool.run(tasks.square, 3) == 9


@pytest.mark.parametrize("rungs", [("process",), ("thread",), ("inline",)])
async def test_a_generator_function_is_refused_at_once_on_every_rung(
        rungs: tuple[str, ...], anyio_backend: str) -> None:
    # Its generator failed each item on the process rung (it does not pickle), and on
    # the thread and inline rungs came back unstarted: its work then ran on the loop.
    def squares(n: int) -> Iterator[int]:
        yield from (i * i for i in range(n))

    class Squares:
        def __call__(self, n: int) -> Iterator[int]:
            yield from range(n)

    async with ResilientPool(max_workers=1, rungs=rungs) as pool:  # type: ignore[arg-type]
        for fn in (squares, functools.partial(squares), Squares()):
            with pytest.raises(TypeError, match="is a generator function.*returns a list"):
                await pool.map(fn, [3])
            with pytest.raises(TypeError, match="is a generator function"):
                await pool.run(fn, 3)
        assert await pool.run(tasks.square, 3) == 9


@pytest.mark.parametrize("rungs", [("process",), ("thread",), ("inline",)])
async def test_a_generator_or_coroutine_behind_a_wrapper_fails_its_items(
        rungs: tuple[str, ...], anyio_backend: str) -> None:
    # Behind functools.wraps or a lambda the pool cannot see the generator function: on
    # the thread and inline rungs its generator came back unstarted (to run on the
    # caller's loop), a coroutine never awaited; on the process rung, "cannot pickle".
    def squares(n: int) -> Iterator[int]:
        yield from range(n)

    async def doubled(n: int) -> int:
        return 2 * n

    @functools.wraps(squares)
    def wrapped(n: int) -> Iterator[int]:
        return squares(n)

    @functools.wraps(doubled)
    def wrapped_coroutine(n: int) -> Any:
        return doubled(n)

    cases: list[tuple[Any, str]] = [
        (wrapped, "a generator"), (lambda n: (i for i in range(n)), "a generator"),
        (wrapped_coroutine, "a coroutine")]
    async with ResilientPool(max_workers=1, rungs=rungs) as pool:  # type: ignore[arg-type]
        for fn, kind in cases:
            with pytest.raises(TypeError, match=f"returned {kind}, which nothing here"):
                await pool.run(fn, 3)
            results = await pool.map(fn, [1, 2, 3], return_exceptions=True)
            assert all(isinstance(r, TypeError) for r in results), results
        # One that returns a generator for some items only: on the thread rung, those
        # after the first item of a chunk came back as generators (on the process rung,
        # pickling them fails them, as SerializationError).
        results = await pool.map(lambda n: [n] if n % 2 == 0 else (i for i in range(n)),
                                 range(6), chunk_size=6, return_exceptions=True)
        assert results[::2] == [[0], [2], [4]]
        assert all(isinstance(r, TypeError | SerializationError) for r in results[1::2])
        assert await pool.run(tasks.square, 3) == 9


async def test_threads_need_no_pickling(anyio_backend: str) -> None:
    lock = threading.Lock()
    async with ResilientPool(max_workers=2, rungs=("thread",)) as pool:
        assert await pool.map(functools.partial(lambda held, x: x, lock), [1, 2]) == [1, 2]


async def test_imap_as_a_context_closes_at_once(pool: ResilientPool) -> None:
    async with pool.imap(tasks.nap, [0.0] * 3 + [30.0] * 4, cancel_running="kill",
                         chunk_size=1) as results:
        assert repr(results) == "<ResultStream of nap (open)>"  # (an address, it was)
        async for value in results:
            if value == 0.0:
                break
    assert repr(results) == "<ResultStream of nap (closed)>"
    # Leaving the block finished the call: nothing of it waits any more, and its
    # running items were killed, so the workers answer at once.
    assert pool.statistics().active_calls == 0
    with anyio.fail_after(10):  # a nap would take 30 s
        assert await pool.run(tasks.square, 4) == 16


@pytest.mark.parametrize("ordered", [True, False])
async def test_tasks_sharing_one_stream_each_wake_and_end(pool: ResilientPool,
                                                           ordered: bool) -> None:
    # Each waiting task's wake-up replaced the last one's: the one not handed the last
    # results waited for good, and one woken meanwhile read past the results held.
    stream = pool.imap(tasks.nap, [0.01] * 40, ordered=ordered, chunk_size=1)
    got: dict[str, list[float]] = {"a": [], "b": []}

    async def consume(name: str) -> None:
        async for value in stream:
            got[name].append(value)
            await anyio.lowlevel.checkpoint()  # (else the first one back takes them all)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, "a")
            tg.start_soon(consume, "b")
    assert len(got["a"]) + len(got["b"]) == 40 and got["a"] and got["b"], got


@pytest.mark.parametrize("ordered", [True, False])
async def test_tasks_sharing_one_stream_get_every_value_once(pool: ResilientPool,
                                                             ordered: bool) -> None:
    # A task woken as another was handing out a batch fetched the next one over it:
    # the rest of that batch was lost (1,832 of 2,000 values seen).
    stream = pool.imap(tasks.square, range(2000), ordered=ordered, chunk_size=7)
    got: list[int] = []

    async def consume() -> None:
        async for value in stream:
            got.append(value)
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(consume)
    assert sorted(got) == [i * i for i in range(2000)]


async def test_a_task_sharing_a_stream_cancelled_leaves_it_to_the_others(
        pool: ResilientPool) -> None:
    # Its cancellation closed the stream: the other task's loop ended early, silently.
    stream = pool.imap(tasks.nap, [0.02] * 60, chunk_size=1)
    got: list[float] = []

    async def consume() -> None:
        async for value in stream:
            got.append(value)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(consume)
                await wait_until(lambda: len(got) >= 5, timeout=20)
                doomed.cancel_scope.cancel()
    assert len(got) == 60
    assert pool.statistics().active_calls == 0


@pytest.mark.parametrize("ending", ["cancelled", "raised"])
async def test_a_task_sharing_a_stream_it_ended_tells_the_others(
        pool: ResilientPool, ending: str) -> None:
    # The others' loops ended as if every result had come: 32 of 40 lost, silently.
    stream = (pool.imap(tasks.nap, [0.2] * 40, chunk_size=1) if ending == "cancelled"
              else pool.imap(functools.partial(tasks.fail_on, bad=10), range(40),
                             chunk_size=1))
    outcomes: dict[str, object] = {}
    busy, released = anyio.Event(), anyio.Event()

    async def in_its_body() -> None:
        try:
            async for _ in stream:
                busy.set()
                await released.wait()  # in its loop's body as the other ends it
            outcomes["body"] = "ended"
        except Exception as exc:
            outcomes["body"] = exc

    async def waiting() -> None:
        try:
            async for _ in stream:
                pass
        except Exception as exc:
            outcomes["waiting"] = exc

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(in_its_body)
            await busy.wait()
            async with anyio.create_task_group() as other:
                other.start_soon(waiting)
                if ending == "cancelled":
                    await anyio.sleep(0.1)
                    other.cancel_scope.cancel()
            released.set()
    assert isinstance(outcomes["body"], PoolClosed), outcomes
    assert "ended by another task" in str(outcomes["body"])
    assert ("cancelled" if ending == "cancelled" else "ValueError") in str(outcomes["body"])
    if ending == "raised":
        assert isinstance(outcomes["waiting"], ValueError), outcomes


async def test_a_deadline_gives_partial_to_one_task_sharing_a_stream(
        pool: ResilientPool) -> None:
    # Every task waiting at the deadline was given the same `.partial`: a caller adding
    # them up counted each finished result once per task.
    stream = pool.imap(tasks.nap, [0.15] * 40, chunk_size=1, timeout=1.0)
    got: list[object] = []
    errors: list[Exception] = []

    async def consume() -> None:
        try:
            async for value in stream:
                got.append(value)
        except Exception as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(consume)
    assert len(errors) == 3, errors
    given = [e for e in errors if isinstance(e, DeadlineExceeded) and e.partial]
    assert len(given) == 1, errors
    assert all(isinstance(e, DeadlineExceeded | PoolClosed) for e in errors), errors
    assert not [e for e in errors if e not in given and getattr(e, "partial", None)]
    assert "another task" in str([e for e in errors if e not in given][0])
    finished = [v for v in given[0].partial if v is not MISSING]
    assert got and len(got) + len(finished) <= 40


async def test_a_stream_ended_by_a_cancelled_wait_says_so(pool: ResilientPool) -> None:
    # A timeout around one __anext__ ended the stream, and the loop that went on
    # iterating ended as if every result had come: 0 of 20, silently.
    stream = pool.imap(tasks.nap, [0.3] + [0.01] * 19, chunk_size=1)
    with anyio.fail_after(30):
        with anyio.move_on_after(0.05) as waited:
            await stream.__anext__()
        assert waited.cancelled_caught
        with pytest.raises(PoolClosed, match="wait for its next result was cancelled"):
            async for _ in stream:
                pass
    assert pool.statistics().active_calls == 0


async def test_a_task_that_ended_its_stream_sees_it_end_as_before(
        pool: ResilientPool) -> None:
    # Coming back to it, it was told the stream was ended "by another task".
    stream = pool.imap(functools.partial(tasks.fail_on, bad=3), range(10), chunk_size=1)
    got: list[int] = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        async for value in stream:
            got.append(value)
    assert got == [0, 1, 2]
    assert [value async for value in stream] == []


async def test_a_stream_closed_by_another_task_wakes_the_one_waiting_on_it(
        pool: ResilientPool) -> None:
    stream = pool.imap(tasks.nap, [0.05] * 10_000, chunk_size=1)
    ended = []

    async def read_all() -> None:
        async for _ in stream:
            pass
        ended.append(True)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            await wait_until(lambda: pool.statistics().tasks_completed > 2, timeout=20)
            await stream.aclose()
    assert ended == [True]
    assert pool.statistics().active_calls == 0


@pytest.mark.asyncio_only(reason="asyncio's debug mode is what refuses a loop call "
                                  "from another thread")
async def test_a_stream_dropped_on_another_thread_ends_its_call_on_the_loop(
        anyio_backend: str) -> None:
    # A stream left without aclose is finished when it is collected, which may happen
    # on any thread: its call must still end on the loop.
    asyncio.get_running_loop().set_debug(True)
    closed: list[bool] = []

    def items() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed.append(True)

    async with ResilientPool(max_workers=1) as pool:
        stream = pool.imap(tasks.square, items(), chunk_size=10)
        held = [stream]
        async for _ in stream:
            break
        del stream
        dropper = threading.Thread(target=held.clear)  # the last reference goes there
        dropper.start()
        dropper.join()
        await wait_until(lambda: pool.statistics().active_calls == 0 and bool(closed), 5)
        await idle(pool)
        assert await pool.run(tasks.square, 3) == 9


async def test_reuse_workers_across_pools(anyio_backend: str, no_leaks: None) -> None:
    async with ResilientPool(max_workers=2, reuse_workers=True) as first:
        pids = set(await first.map(tasks.pid_of, range(40), chunk_size=1))
    async with ResilientPool(max_workers=2, reuse_workers=True) as second:
        assert set(await second.map(tasks.pid_of, range(40), chunk_size=1)) <= pids
    async with ResilientPool(max_workers=2) as third:  # not opted in: fresh workers
        assert set(await third.map(tasks.pid_of, range(40), chunk_size=1)).isdisjoint(pids)
    assert await ResilientPool.close_idle_workers() == 2


@pytest.mark.parametrize("use", ["run", "aclose", "imap", "stream", "started"])
@pytest.mark.parametrize("other", ["asyncio", "trio"])
async def test_a_pool_used_from_another_loop_says_so(use: str, other: str,
                                                     pool: ResilientPool) -> None:
    # Closing it from another loop hung there, and left it closed for its own; a
    # stream made on its loop and read on another waited there for good (one that
    # had started on its own loop, after the results it held).
    stream = pool.imap(tasks.square, range(3 if use != "started" else 100_000))
    if use == "started":
        assert await stream.__anext__() == 0

    def elsewhere() -> BaseException | None:
        async def call() -> None:
            with anyio.fail_after(10):
                if use == "run":
                    await pool.run(tasks.square, 2)
                elif use == "aclose":
                    await pool.aclose()
                else:
                    async for _ in (pool.imap(tasks.square, range(3)) if use == "imap"
                                    else stream):
                        pass

        try:
            anyio.run(call, backend=other)
        except BaseException as exc:
            return exc
        return None

    error = await anyio.to_thread.run_sync(elsewhere)
    assert isinstance(error, PoolClosed) and "another event loop" in str(error)
    assert await pool.run(tasks.square, 3) == 9
    await stream.aclose()


async def test_run_takes_no_return_exceptions(pool: ResilientPool) -> None:
    # It was accepted, and returned the exception instead of raising it.
    with pytest.raises(TypeError, match="run\\(\\) takes no return_exceptions"):
        await pool.run(tasks.fail_on, 3, return_exceptions=True)  # type: ignore[call-arg]


async def test_backend_follows_the_serving_rung(anyio_backend: str) -> None:
    async with ResilientPool(max_workers=1, rungs=("inline",)) as pool:
        assert pool.backend == "inline"
        await wait_until(lambda: pool.statistics().backend == "inline")


async def test_reused_workers_run_each_pools_own_functions(anyio_backend: str) -> None:
    import math
    import operator

    async with ResilientPool(max_workers=1, reuse_workers=True) as first:
        assert await first.run(operator.neg, 4) == -4
    async with ResilientPool(max_workers=1, reuse_workers=True) as second:
        # The parked worker knew a function by a number this pool also used.
        assert await second.run(math.sqrt, 4) == 2.0
        assert await second.map(lambda x: x + 1, [1, 2]) == [2, 3]
    await ResilientPool.close_idle_workers()


async def test_main_script_globals_follow_the_caller() -> None:
    proc = run_script("_main_globals.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "10", "10", "hello", "42", "hello", "hello",
                                   "hello-42-0.5", "1", "100", "tagged", "100",
                                   "5-json-None", "6-pickle-{'mode':'fast'}", "140", "90",
                                   "2880067194370816120", "4660046610375530309", "832040",
                                   "23416728348467685", "True",
                                   "1000", "-1", "1000", "0"], proc.stdout


async def test_a_main_script_function_is_loaded_once_by_each_worker(
        anyio_backend: str) -> None:
    # Each call shipped a script's function anew, and the worker unpickled it each time
    # (and the parent pickled it each time, on the loop).
    script: dict[str, object] = {"__name__": "__main__"}
    exec("import sys\n"  # noqa: S102 - a main script's function, by value
         "def code_of(_):\n"
         "    code = sys._getframe().f_code\n"
         "    sys.__dict__.setdefault('codes_seen', []).append(code)  # (never freed)\n"
         "    return id(code), SCALE\n", script)
    script["SCALE"] = 2
    async with ResilientPool(max_workers=1, rungs=("process",)) as pool:
        first = await pool.run(script["code_of"], 0)
        assert await pool.run(script["code_of"], 0) == first
        assert await pool.map(script["code_of"], range(3)) == [first] * 3
        script["SCALE"] = 3  # its pickle changed: loaded anew, the new value with it
        changed = await pool.run(script["code_of"], 0)
        assert changed[1] == 3 and changed[0] != first[0]


_KEPT_SCRIPT = """
def make_counter():
    count = 0
    def counter(_):
        nonlocal count
        count += 1
        return count
    return counter

def bump(_, *, seen=0):
    bump.__kwdefaults__["seen"] = seen + 1
    return seen

def a_or_b(_):
    try:
        return ("A", A)
    except NameError:
        return ("B", B)

def make_late():
    def late_reader(_):
        return later
    def fill(value):
        nonlocal later
        later = value
    return late_reader, fill
    later = None  # (never run: makes it a cell, empty until filled)
"""


async def test_a_main_script_function_shipped_again_is_as_a_fresh_pickle(
        anyio_backend: str) -> None:
    # Its pickle kept, and one loaded copy in the worker for every call: a closure's
    # cells and a keyword default a call changed carried over to the next calls, and a
    # global that went and another that came with the same value read alike.
    script: dict[str, Any] = {"__name__": "__main__"}
    exec(_KEPT_SCRIPT, script)  # noqa: S102 - a main script's functions, by value
    async with ResilientPool(max_workers=1, rungs=("process",)) as pool:
        counter = script["make_counter"]()
        assert [await pool.run(counter, 0) for _ in range(3)] == [1, 1, 1]
        assert [await pool.run(script["make_counter"](), 0) for _ in range(2)] == [1, 1]
        assert [await pool.run(script["bump"], 0) for _ in range(3)] == [0, 0, 0]
        script["B"] = 1
        assert await pool.run(script["a_or_b"], 0) == ("B", 1)
        script["A"] = 1
        del script["B"]
        assert await pool.run(script["a_or_b"], 0) == ("A", 1)
        reader, fill = script["make_late"]()
        with pytest.raises(NameError):
            await pool.run(reader, 0)
        fill(None)
        assert await pool.run(reader, 0) is None


@pytest.mark.parametrize("size", [10, 100_000, 3_000_000])  # in one frame; out of band; own buffer
async def test_buffers_come_back_as_writable_as_they_left(pool: ResilientPool,
                                                           size: int) -> None:
    # NumPy arrays pickle their data as such a buffer: a read-only array back from a
    # worker would refuse ``a[0] = 1``.
    for writable in (True, False):
        grid = await pool.run(tasks.make_grid, (size, writable))
        assert grid.writable is writable and len(memoryview(grid.data)) == size
        grids = await pool.map(tasks.make_grid, [(size, writable)] * 3)
        assert [g.writable for g in grids] == [writable] * 3
        sent = tasks.Grid(bytearray(size) if writable else bytes(size))
        assert await pool.run(tasks.fill_grid, sent) == (writable, size)
    got = await pool.run(tasks.make_bytearray, size)
    assert type(got) is bytearray and got == bytearray(b"x" * size)


@pytest.mark.parametrize("kill", [False, True])
async def test_a_pool_closed_while_it_opens_is_not_entered(
        kill: bool, tmp_path: Path, anyio_backend: str) -> None:
    # Closed by another task as it started its workers, it was entered all the same:
    # a closed pool that looked open, each call then failing, its workers alive. Then
    # the close returned at once and stopped nothing: the entering task waited for the
    # initializer until start_timeout, and was told the initializer hung.
    started = tmp_path / "started"
    pool = ResilientPool(max_workers=2, initializer=tasks.note_pid_then_nap,
                         initargs=(str(started), 60), start_timeout=120)
    outcome: list[BaseException] = []

    async def enter() -> None:
        try:
            await pool.__aenter__()
        except PoolClosed as exc:
            outcome.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter)
            await wait_until(started.exists)  # a worker runs the initializer
            await pool.aclose(kill=kill)
            pids = [int(pid) for pid in started.read_text().split()]
            # What the open started stops with the close, not later.
            assert not [pid for pid in pids if alive(pid)], pids
    assert len(outcome) == 1 and "while it opened" in str(outcome[0]), outcome


@pytest.mark.parametrize("rungs", [("process",), ("thread",)])
async def test_max_chunks_in_flight_bounds_what_a_pool_holds(
        rungs: tuple[str, ...], anyio_backend: str) -> None:
    # Below the workers' own depth (three chunks each), only this bound holds them.
    seen: list[int] = []
    async with ResilientPool(max_workers=2, max_chunks_in_flight=1,
                             rungs=rungs) as pool:  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(pool.map, tasks.nap, [0.05] * 12, chunk_size=1))
            tg.start_soon(functools.partial(pool.map, tasks.nap, [0.05] * 12, chunk_size=1))
            while len(seen) < 40:
                seen.append(pool.statistics().chunks_in_flight)
                await anyio.sleep(0.01)
    assert max(seen) == 1, seen


async def test_a_stream_read_slowly_takes_a_bounded_number_of_small_items(
        anyio_backend: str) -> None:
    # A call holds at most enough items for every slot to be busy four times over:
    # 4 x 6 chunks of 10 here (the byte bound is far off for small ints).
    read = 0

    async def counted() -> AsyncIterator[int]:
        nonlocal read
        for i in range(100_000):
            read += 1
            yield i

    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        async with pool.imap(tasks.square, counted(), chunk_size=10) as results:
            assert await results.__anext__() == 0
            last = -1
            while read != last:  # until it stops reading, with no one consuming
                last = read
                await wait_until(lambda: pool.statistics().chunks_in_flight == 0)
                await anyio.sleep(0.2)
            assert 4 * 6 * 10 <= read <= 4 * 6 * 10 + 3 * 10, read


async def test_a_map_raises_its_first_item_s_error(anyio_backend: str) -> None:
    # Items 1, 3, 5... fail in one chunk: the call raises item 1's error.
    async with ResilientPool(max_workers=1) as pool:
        with pytest.raises(ValueError, match="^item 1 is odd") as info:
            await pool.map(tasks.fail_if_odd, range(20), chunk_size=20)
        # The error says which item raised it (in a note, as its message is the task's).
        assert str(info.value) == "item 1 is odd"
        assert info.value.__notes__ == ["asyncpool: raised by item 1 of the input"]
        with pytest.raises(ValueError, match="^item 23 is odd") as info:
            async for _ in pool.imap(tasks.fail_if_odd, range(22, 40), chunk_size=4):
                pass
        assert info.value.__notes__ == ["asyncpool: raised by item 1 of the input"]
        with pytest.raises(ValueError) as info:  # in the second chunk
            await pool.map(tasks.fail_on, range(20), chunk_size=2)
        assert info.value.__notes__ == ["asyncpool: raised by item 3 of the input"]
    # One object raised again (the thread rung hands the task's own): this call's
    # item, not the first call's.
    shared = ValueError("one object")

    def raise_shared(x: int) -> int:
        if x == 2:
            raise shared
        return x

    async with ResilientPool(max_workers=1, rungs=("thread",)) as threads:
        for items, index in (([0, 1, 2], 2), ([2, 5], 0)):
            with pytest.raises(ValueError) as info:
                await threads.map(raise_shared, items)
            assert info.value.__notes__ == [f"asyncpool: raised by item {index} of the input"]
    async with ResilientPool(max_workers=2) as pool:
        # An ordered stream raises the first failure in input order, which may not be
        # the first to come back: the note went to the other, and this one had none.
        with pytest.raises(ValueError, match="^item 1 failed") as info:
            async for _ in pool.imap(tasks.fail_late_and_early, range(6), chunk_size=1):
                pass
        assert info.value.__notes__ == ["asyncpool: raised by item 1 of the input"]
    async with ResilientPool(max_workers=1) as pool:
        # A single call's error needs no note.
        with pytest.raises(ValueError, match="^item 3 is odd") as info:
            await pool.run(tasks.fail_if_odd, 3)
        assert not hasattr(info.value, "__notes__")


def test_without_posix_only_modules_the_pool_serves_on_threads() -> None:
    # Windows has no `resource` (nor os.fork): opening a pool raised ModuleNotFoundError
    # instead of falling back to threads, as the README says it does there.
    code = """if True:
        import os, socket, sys
        for name in ("resource", "fcntl", "termios", "grp", "pwd"):
            sys.modules[name] = None  # an import of it raises ImportError
        del os.fork, socket.send_fds
        import anyio
        from asyncpool import ResilientPool
        from tests import tasks

        async def main():
            async with ResilientPool(max_workers=2) as pool:
                print(pool.backend, await pool.map(tasks.square, range(4)))

        anyio.run(main)
    """
    out = run_code(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "thread [0, 1, 4, 9]", out.stdout
