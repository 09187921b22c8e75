"""The pure parts, alone: sizing, chunks, assembly, backoff, errors, config, the wire."""

from __future__ import annotations

import collections
import dataclasses
import functools
import errno
import importlib
import math
import pickle
import select
import socket
import itertools
import sys
import threading
import time
import types
import typing
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio
import cloudpickle
import pytest

import asyncpool
from asyncpool import (
    MISSING,
    AsyncPoolError,
    DeadlineExceeded,
    PoolConfig,
    RemoteError,
    ResilientPool,
    SerializationError,
    WorkerCrashed,
)
from asyncpool import _wire
from asyncpool._call import Chunk, Piece
from asyncpool._execute import call_item, cut_runs, execute
from asyncpool._remote import portable
from asyncpool._options import CallOptions
from asyncpool._retry import RungUnavailable, backoff_delays, is_transient, retry_again
from asyncpool._salvage import load_results
from asyncpool._sizing import (SEND_SECONDS, TARGET_CHUNK_BYTES, Timing, assemble,
                               guided_cap)

from . import tasks
from .helpers import wait_until

# -- sizing --------------------------------------------------------------------------


def test_timing_ramps_until_measured_then_aims_at_the_target() -> None:
    timing = Timing()
    sizes = []
    for _ in range(5):
        sizes.append(timing.ramp)
        timing.grow()
    assert sizes == [1, 2, 4, 8, 16]
    timing.observe(100, 0.1)  # 1 ms per item
    assert timing.per_item == pytest.approx(0.001)
    timing.observe(100, 0.2)  # slower: moves 70% of the way
    assert timing.per_item == pytest.approx(0.0017)
    timing.observe(100, 0.0)  # faster: moves 30% of the way
    assert timing.per_item == pytest.approx(0.00119)


def test_timing_caps_items_by_what_sending_them_costs_the_loop() -> None:
    # Items whose own pickling is slow (1 ms each) went out 2,000 to a chunk, and the
    # loop stood still for a second while the chunk was pickled.
    timing = Timing()
    # Until sending is known to be quick, chunks grow from 64 items.
    assert timing.send_cap() == 64
    timing.observe_send(50, 0.0004)
    assert timing.send_per_item is None and timing.send_cap() == 100
    for _ in range(12):
        timing.observe_send(timing.send_cap(), 0.0004)
    assert timing.send_cap() == 1 << 30
    timing.observe_send(2, 0.002)  # 1 ms an item: one slow chunk may be a pause
    assert timing.send_cap() == 1 << 30
    timing.observe_send(2, 0.002)  # a second: it is the items
    assert timing.send_cap() == int(SEND_SECONDS / 0.001)
    # One slow item in fifty: a chunk without one halves the guess, one with two keeps
    # it (the guess followed the last chunk, and a quick one lifted the cap: chunks of
    # thousands of items held the loop for half a second).
    timing = Timing()
    for chunk in range(40):
        slow = 1 if chunk % 3 else 0
        items = timing.send_cap() if chunk else 50
        items = min(items, 16384)
        timing.observe_send(items, slow * 0.005 * max(1, items // 50) + items * 1e-7)
        assert chunk < 2 or timing.send_cap() <= 200
    # Items that became quick (or a pause of the loop): forgotten in a few chunks.
    for _ in range(16):
        timing.observe_send(min(timing.send_cap(), 16384), 0.00005)
    assert timing.send_cap() == 1 << 30


def test_timing_caps_items_by_bytes() -> None:
    timing = Timing()
    while timing.send_cap() < 1 << 20:  # sending is quick
        timing.observe_send(timing.send_cap(), 0.0001)
    timing.observe_bytes(10, 10 * 100_000)
    assert timing.send_cap() == TARGET_CHUNK_BYTES // 100_000
    timing.observe_bytes(10, 10 * 10_000_000)  # a bigger item raises the estimate at once
    assert timing.send_cap() == 1


def test_guided_cap_shrinks_with_what_is_left() -> None:
    assert guided_cap(None, 4) is None
    assert guided_cap(800, 4) == 100
    assert guided_cap(3, 4) == 1
    assert guided_cap(0, 2) == 1


def test_assemble_puts_segments_in_order_with_gaps() -> None:
    segments = {5: [50, 60], 0: [0, 1], 2: [20]}
    assert assemble(segments) == [0, 1, 20, MISSING, MISSING, 50, 60]
    assert assemble(segments, start=2) == [20, MISSING, MISSING, 50, 60]
    assert assemble(segments, total=9)[-2:] == [MISSING, MISSING]
    assert assemble({}) == []


def _chunk(*lengths: int) -> Chunk:
    pieces = [Piece(SimpleNamespace(id=i), 100 * i, list(range(100 * i, 100 * i + n)))
              for i, n in enumerate(lengths)]
    return Chunk(pieces)  # type: ignore[arg-type]


def test_a_cut_chunk_keeps_its_head_and_names_the_calls_it_let_go() -> None:
    calls = [_Caller(i) for i in range(3)]
    chunk = Chunk([Piece(c, 100 * c.id, list(range(100 * c.id, 100 * c.id + n)))  # type: ignore[arg-type]
                   for c, n in zip(calls, (3, 2, 4), strict=True)])
    assert chunk.cut(4) == {calls[2]}
    assert chunk.size == 4 and [(p.start, p.items) for p in chunk.pieces] == [
        (0, [0, 1, 2]), (100, [100])]


def test_chunk_positions_map_to_pieces() -> None:
    chunk = _chunk(3, 2, 4)
    assert chunk.size == 9
    spans = [(p.call.id, lo, hi, off) for p, lo, hi, off in chunk.between(2, 7)]
    assert spans == [(0, 2, 3, 0), (1, 0, 2, 3), (2, 0, 2, 5)]
    assert chunk.locate(4) == (chunk.pieces[1], 101)
    again = chunk.pieces_between(1, 6)
    assert [(p.start, p.items) for p in again] == [(1, [1, 2]), (100, [100, 101]),
                                                    (200, [200])]
    assert chunk.pieces_between(9, 9) == []
    with pytest.raises(IndexError):
        chunk.locate(9)


# -- crash splitting -----------------------------------------------------------------


class _Caller:
    """What the listener needs of a call: its state, chunks and delivered outcomes."""

    def __init__(self, id: int) -> None:
        from asyncpool._call import CallState

        self.id, self.state, self.crashed = id, CallState.ACTIVE, False
        self.timing = Timing()
        self.chunks: set[Chunk] = set()
        self.delivered: dict[int, BaseException] = {}
        self.woken = 0

    def deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        self.delivered.update({start + i: e for i, e in errors.items()})

    def wake(self) -> None:
        self.woken += 1


def _crash(lengths: list[int], culprit: int | None, *, deaths: int = 1, reported: int = 0,
           crashes: int = 0, suspect: bool = False
           ) -> tuple[Any, list[_Caller], list[Any], list[str]]:
    """Crash a chunk of calls with ``lengths`` items: the listener, its calls, each
    resend in sending order as (first input index, size, crash count), and the
    reasons given, in the order given."""
    from asyncpool._events import Counters
    from asyncpool._outcomes import Outcomes

    reasons: list[str] = []
    outcomes = Outcomes(PoolConfig(max_crashes_per_item=3), Counters(),
                        lambda kind, message, **fields: reasons.append(fields["reason"]),
                        kick=lambda: None, settled=lambda rung: None)
    callers = [_Caller(i) for i in range(len(lengths))]
    chunk = Chunk([Piece(c, 100 * c.id, list(range(n)))  # type: ignore[arg-type]
                   for c, n in zip(callers, lengths, strict=True)], crashes)
    chunk.reported = reported
    chunk.suspect = suspect
    outcomes.sent(chunk)
    outcomes.chunk_crashed(chunk, culprit, -9, deaths)
    assert chunk not in outcomes.in_flight and all(c.chunks == set() for c in callers)
    resent = [(again.pieces[0].start, again.size, again.crashes) for again in outcomes.again]
    assert outcomes.counters.resubmitted_chunks == len(resent) == len(reasons)
    return outcomes, callers, resent, reasons


def test_a_crash_with_no_culprit_splits_the_rest_in_halves() -> None:
    outcomes, callers, resent, reasons = _crash([6, 4], None, reported=2)
    # Items 0-1 had reported; 2-9 go out again in two suspect parts, counts afresh.
    assert sorted(resent) == [(2, 4, 0), (100, 4, 0)] and reasons == ["split"] * 2
    assert all(again.suspect for again in outcomes.again)
    assert callers[0].crashed and callers[1].crashed


def test_a_crash_costing_several_deaths_splits_in_up_to_32_parts() -> None:
    _, _, resent, _ = _crash([100], None, deaths=3)
    assert len(resent) == 32 and sum(size for _, size, _ in resent) == 100
    assert {size for _, size, _ in resent} == {3, 4}
    # One item left, lost with its whole worker: it runs alone, not yet blamed.
    _, _, resent, reasons = _crash([1], None, deaths=3)
    assert resent == [(0, 1, 3)] and reasons == ["suspect"]
    # Crashing alone, it fails, the message counting every death it cost (it said
    # 3, where the workers had died 6 times).
    outcomes, callers, resent, _ = _crash([1], None, deaths=3, crashes=3, suspect=True)
    assert resent == [] and "6 time(s)" in str(callers[0].delivered[0])


def test_a_known_culprit_goes_last_alone_and_its_neighbours_are_not_blamed() -> None:
    outcomes, callers, resent, reasons = _crash([3, 5], 4, reported=1)
    # Before it (ran, results lost), after it (never ran), then itself with one crash.
    assert reasons == ["innocent", "not run", "suspect"]
    assert resent == [(102, 3, 0), (1, 3, 0), (101, 1, 1)]
    assert [again.suspect for again in outcomes.again] == [False, False, True]
    assert callers[1].delivered == {}


def test_an_item_that_crashed_its_worker_max_times_fails_alone() -> None:
    outcomes, callers, resent, _ = _crash([1], 0, crashes=2)
    assert resent == []
    error = callers[0].delivered[0]
    assert isinstance(error, WorkerCrashed) and error.index == 0
    assert "3 time(s)" in str(error) and "SIGKILL" in str(error)
    assert outcomes.counters.tasks_failed == 1


# -- the chunk packer ----------------------------------------------------------------


def _packer(target: float = 0.1, workers: int = 2) -> Any:
    """An engine with no rung serving (nothing is sent: chunks are only made)."""
    from asyncpool._engine import Engine
    from asyncpool._events import Counters
    from asyncpool._outcomes import Outcomes

    config = PoolConfig(max_workers=workers, target_chunk_seconds=target)
    ladder = SimpleNamespace(serving=None, settled=lambda rung: None)
    loop = SimpleNamespace(call_soon=lambda fn: None)
    outcomes = Outcomes(config, Counters(), lambda *a, **k: None, kick=lambda: None,
                        settled=lambda rung: None)
    return Engine(config, ladder, outcomes, lambda *a, **k: None, loop)  # type: ignore[arg-type]


def _call(items: list[Any], per_item: float | None, **options: Any) -> Any:
    from asyncpool._call import Call, Mode
    from asyncpool._functions import Shipped
    from asyncpool._source import Source

    timing = Timing()
    timing.per_item = per_item
    return Call(abs, Shipped(0, b"", "abs", True), False, Source(items),
                CallOptions.build(**options), timing, Mode.LIST, lambda: None)


def _contents(chunk: Chunk) -> list[tuple[int, int]]:
    return [(piece.call.id, len(piece.items)) for piece in chunk.pieces]


def test_the_packer_fills_a_chunk_with_target_seconds_of_measured_work() -> None:
    engine = _packer(target=0.1)
    slow, quick = _call(list(range(1000)), 0.004), _call(list(range(1000)), 0.0005)
    engine.add(slow)
    engine.add(quick)
    # 0.1 s of work a chunk: 25 slow items; then as many quick ones as may go before
    # sending them is measured (64), and the rest of the 0.1 s in slow ones.
    made = [_contents(engine._new_chunk(10_000, 2)) for _ in range(3)]
    assert made == [[(slow.id, 25)], [(quick.id, 64), (slow.id, 17)],
                    [(quick.id, 64), (slow.id, 17)]]
    # Calls share one: what a burst of run() calls brings goes out together, in turn
    # and within the guided share (50 items left on 2 lanes: 13 to a chunk first).
    engine = _packer(target=0.1)
    burst = [_call([i], 0.001) for i in range(50)]
    for call in burst:
        engine.add(call)
    chunk = engine._new_chunk(10_000, 2)
    assert _contents(chunk) == [(call.id, 1) for call in burst[:13]]


def test_calls_take_turns_heading_chunks() -> None:
    # Four maps of 2.2 ms items, 9 to a chunk of 20 ms: each heads a chunk in turn.
    # (A call that took the one item the rest of a chunk had room for went to the back
    # of the queue: calls then went in pairs, and the second of each pair got an item
    # a chunk, a map of 20 small items arriving during big ones waiting 20 chunks.)
    engine = _packer(target=0.02)
    calls = [_call(list(range(1000)), 0.0022) for _ in range(4)]
    for call in calls:
        engine.add(call)
    made = [_contents(engine._new_chunk(10_000, 2)) for _ in range(8)]
    assert made == [[(call.id, 9)] for call in calls] * 2


def test_a_call_is_sized_by_its_own_items_once_measured() -> None:
    # One function, items of 50 ms in one call and of 1 ms in another: sized by the
    # function's timing alone, the small call went one item a chunk, and a map of 20
    # such items waited 1.6 s behind three big ones on 2 workers (0.9 s now).
    engine = _packer(target=0.02)
    big = _call(list(range(100)), 0.05)
    small = _call(list(range(1000)), None)
    small.timing = big.timing
    engine.add(small)
    first = engine._new_chunk(10_000, 2)
    assert _contents(first) == [(small.id, 1)]
    engine.outcomes.sent(first)
    engine.outcomes.chunk_done(first, 1, 0.001)  # its one item took 1 ms
    assert small.own_per_item == 0.001 and big.timing.per_item > 0.01
    # Judged halfway (geometrically) between its own items and its function's: its
    # items may yet turn as slow as the others'.
    assert small.per_item == math.sqrt(0.001 * big.timing.per_item)
    want = int(0.02 / small.per_item)
    assert want > 1 and _contents(engine._new_chunk(10_000, 2)) == [(small.id, want)]


def test_the_packer_shrinks_chunks_as_known_input_runs_out() -> None:
    engine = _packer(target=10.0)
    call = _call(list(range(100)), 0.0001)
    engine.add(call)
    sizes = []
    while (chunk := engine._new_chunk(10_000, 2)) is not None:
        sizes.append(chunk.size)
    # Guided: a quarter of what is left each time (two lanes), down to single items.
    assert sizes[:4] == [25, 19, 14, 11] and sizes[-1] == 1 and sum(sizes) == 100


def test_a_chosen_chunk_size_or_dask_options_get_chunks_of_their_own() -> None:
    engine = _packer()
    plain, fixed = _call(list(range(40)), 0.001), _call(list(range(40)), 0.001, chunk_size=7)
    placed = _call(list(range(40)), 0.001, resources={"GPU": 1})
    for call in (plain, fixed, placed):
        engine.add(call)
    made = [_contents(engine._new_chunk(10_000, 2)) for _ in range(3)]
    # Each its own; the others within their guided share (120 items left on 2 lanes:
    # 30, then 83: 21).
    assert made == [[(plain.id, 30)], [(fixed.id, 7)], [(placed.id, 21)]]


def test_a_function_of_unknown_cost_has_one_chunk_per_lane_out_blind() -> None:
    engine = _packer()
    call = _call(list(range(100)), None)
    engine.add(call)
    first, second = engine._new_chunk(10_000, 2), engine._new_chunk(10_000, 2)
    assert (first.size, second.size) == (1, 2)  # doubling from one item
    engine.outcomes.sent(first)
    engine.outcomes.sent(second)
    assert engine._new_chunk(10_000, 2) is None  # both lanes hold one: wait for a result
    engine.outcomes.chunk_done(first, 1, 0.01)  # its cost is now known: 10 ms an item
    assert engine._new_chunk(10_000, 2).size == 10


def test_big_items_make_small_chunks() -> None:
    from asyncpool._sizing import TARGET_CHUNK_BYTES

    engine = _packer(target=10.0)
    call = _call([b"x" * (1 << 20)] * 20, 0.0001)
    engine.add(call)
    chunk = engine._new_chunk(10_000, 2)
    assert chunk.size == TARGET_CHUNK_BYTES // (1 << 20)


# -- backoff and transient errors ----------------------------------------------------


def test_backoff_grows_to_its_ceiling_with_bounded_jitter() -> None:
    delays = backoff_delays(0.1, 2.0, 1.0, 0.1)
    got = [next(delays) for _ in range(8)]
    for value, base in zip(got, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0], strict=True):
        assert base * 0.9 <= value <= base * 1.1
    exact = backoff_delays(0.1, 3.0, 10.0, 0.0)
    assert [round(next(exact), 6) for _ in range(3)] == [0.1, 0.3, 0.9]


def test_is_transient() -> None:
    assert is_transient(RuntimeError("can't start new thread"))
    assert is_transient(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert is_transient(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_transient(OSError(errno.EMFILE, "Too many open files"))
    assert is_transient(RungUnavailable("cluster did not answer"))
    assert not is_transient(RuntimeError("something else"))
    assert not is_transient(OSError(errno.ENOENT, "No such file"))
    assert not is_transient(ValueError("can't start new thread"))


@pytest.mark.parametrize("failures, retries, ok", [(0, 0, True), (1, 0, False),
                                                   (2, 2, True), (3, 2, False)])
def test_an_item_is_retried_task_retries_times_on_transient_errors_only(
        failures: int, retries: int, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("asyncpool._execute.time.sleep", lambda seconds: None)
    tries: list[int] = []

    def flaky(x: int) -> int:
        tries.append(x)
        if len(tries) <= failures:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return x * 2

    retried = [0]
    if ok:
        assert call_item(flaky, 21, False, retries, retried) == 42
    else:
        with pytest.raises(BlockingIOError):
            call_item(flaky, 21, False, retries, retried)
    assert len(tries) == min(failures, retries) + 1 and retried == [min(failures, retries)]
    # Not transient, or not an Exception: never again; the one rule for every rung.
    assert not retry_again(ValueError("x"), 0, 5)
    assert not retry_again(KeyboardInterrupt(), 0, 5)
    assert retry_again(OSError(errno.EAGAIN, "x"), 4, 5)
    assert not retry_again(OSError(errno.EAGAIN, "x"), 5, 5)


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    asyncpool.PoolClosed("closed"),
    WorkerCrashed("crashed", index=3, exitcode=-9),
    SerializationError("bad"),
    DeadlineExceeded("late", [1, MISSING], 2),
    RemoteError("boom", type_name="x.Y", traceback="tb", exitcode=3),
    asyncpool.InitializerFailed("init"),
])
def test_every_public_error_pickles_and_builds_from_a_message(error: Exception) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert back.__dict__ == error.__dict__
    assert isinstance(type(error)("just a message"), AsyncPoolError)


def test_deadline_exceeded_is_a_timeout_error() -> None:
    assert issubclass(DeadlineExceeded, TimeoutError)
    assert DeadlineExceeded("x").partial == []


def test_portable_keeps_what_unpickles_and_describes_the_rest() -> None:
    plain = ValueError("plain")
    assert portable(plain) is plain
    # (Not tasks.NeedsTwo here: importing distributed, as test_dask does, installs
    # tblib's pickling of exceptions in this process, which rebuilds it.)
    held = portable(tasks.HoldsLock("locked"))
    assert isinstance(held, RemoteError)
    assert held.type_name == "tests.tasks.HoldsLock" and "locked" in str(held)
    try:
        raise SystemExit(3)
    except SystemExit as exc:
        gone = portable(exc)
    assert isinstance(gone, RemoteError) and gone.exitcode == 3
    assert "SystemExit" in gone.type_name and "raise SystemExit" in gone.traceback


# -- configuration -------------------------------------------------------------------

async def tasks_async_init() -> None:
    """An async function given as an initializer."""


BAD_VALUES = [
    ("max_workers", 0, ValueError), ("max_workers", -1, ValueError),
    ("max_workers", 1.5, TypeError), ("max_workers", True, TypeError),
    ("chunk_size", 0, ValueError), ("creation_attempts", 0, ValueError),
    ("backoff_initial", -0.1, ValueError), ("backoff_factor", 0.5, ValueError),
    ("backoff_max", -1, ValueError), ("backoff_jitter", 2, ValueError),
    ("promote_after", -1, ValueError), ("max_chunks_in_flight", 0, ValueError),
    ("task_retries", -1, ValueError), ("task_retries", True, TypeError),
    ("target_chunk_seconds", 0, ValueError), ("target_chunk_seconds", math.inf, ValueError),
    ("target_chunk_seconds", math.nan, ValueError), ("rate_limit", 0, ValueError),
    ("rate_limit", math.nan, ValueError), ("start_timeout", math.nan, ValueError),
    ("warm_start", "no", TypeError), ("reuse_workers", "false", TypeError),
    ("max_tasks_per_worker", 0, ValueError), ("max_worker_memory", 1.5, TypeError),
    ("initializer", 3, TypeError), ("initargs", [1], TypeError),
    # An async initializer would never be awaited (each worker warned, and ran on).
    ("initializer", tasks_async_init, TypeError),
    ("rungs", ("process", "gpu"), ValueError), ("rungs", (), ValueError),
    ("rungs", ("inline", "process"), ValueError), ("rungs", ("thread", "thread"), ValueError),
    ("dask_connect_timeout", math.inf, ValueError),
    ("backoff_initial", math.inf, ValueError), ("backoff_max", math.inf, ValueError),
    ("backoff_factor", math.inf, ValueError), ("promote_after", math.inf, ValueError),
    ("promote_max", math.inf, ValueError), ("start_timeout", 10**400, ValueError),
    ("max_workers", 10**30, ValueError), ("target_chunk_seconds", 1e305, ValueError),
    ("dask_address", 8786, TypeError), ("dask_client", math.inf, TypeError),
    ("dask_client", "tcp://127.0.0.1:8786", TypeError),
]


@pytest.mark.parametrize(("name", "value", "kind"), BAD_VALUES)
def test_invalid_setting_names_its_field(name: str, value: object, kind: type) -> None:
    with pytest.raises(kind, match=rf"PoolConfig\.{name}="):
        PoolConfig(**{name: value})  # type: ignore[arg-type]
    with pytest.raises(kind, match=name):
        ResilientPool(**{name: value})  # type: ignore[misc]


def test_infinity_lifts_a_limit() -> None:
    config = PoolConfig(start_timeout=math.inf, rate_limit=math.inf)
    assert config.start_timeout is None and config.rate_limit is None


def test_both_ways_to_configure_and_a_typo_says_what_was_meant() -> None:
    a = ResilientPool(max_workers=2, chunk_size=10)
    b = ResilientPool(config=PoolConfig(max_workers=2, chunk_size=10))
    assert a.config == b.config
    c = ResilientPool(3, config=PoolConfig(chunk_size=10))
    assert c.config.max_workers == 3 and c.config.chunk_size == 10
    with pytest.raises(TypeError, match="did you mean 'max_workers'"):
        ResilientPool(max_workrs=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="did you mean 'on_event'"):
        ResilientPool(on_evnt=print)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="did you mean 'max_workers'"):
        PoolConfig(max_wokers=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="did you mean 'thread'"):
        ResilientPool(rungs=("process", "threads"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rungs=.'process', 3. is invalid"):
        ResilientPool(rungs=("process", 3))  # type: ignore[arg-type]
    # A call's option given to the pool is said so ("did you mean 'start_timeout'?"
    # sent a user to the wrong setting).
    for name in ("timeout", "return_exceptions", "cancel_running"):
        with pytest.raises(TypeError, match=f"{name} is an option of each call"):
            ResilientPool(**{name: 1})  # type: ignore[misc]
    with pytest.raises(TypeError, match="ordered is an option of imap"):
        ResilientPool(ordered=False)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="config= takes a PoolConfig, not a dict"):
        ResilientPool(config={"max_workers": 2})  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.config.max_workers = 5  # type: ignore[misc]
    assert "new" in repr(a)


@pytest.mark.parametrize(("options", "kind", "match"), [
    ({"timeout": -1}, ValueError, "timeout=-1"),
    ({"timeout": math.nan}, ValueError, "timeout=nan"),
    ({"timeout": True}, TypeError, "timeout=True"),
    ({"rate_limit": math.nan}, ValueError, "rate_limit=nan"),
    ({"chunk_size": 0}, ValueError, "chunk_size=0"),
    ({"chunk_size": 2.0}, TypeError, "chunk_size=2.0"),
    ({"cancel_running": "stop"}, ValueError, "cancel_running='stop'"),
    ({"kill_on_timeout": "yes"}, TypeError, "kill_on_timeout='yes'"),
    ({"progress": 3}, TypeError, "progress=3"),
    ({"progress": 0}, TypeError, "progress=0"),
    ({"progress": 1.0}, TypeError, r"progress=1\.0"),
    ({"progress": tasks.async_square}, TypeError, "progress=.*not async"),  # never awaited
    ({"timout": 1}, TypeError, "did you mean 'timeout'"),
    ({"max_workers": 2}, TypeError, "a setting of the pool, not of a call"),
    ({"timeout": 10**400}, ValueError, "timeout=1000"),
    ({"resources": "cpu"}, TypeError, "resources='cpu'"),
    ({"resources": {"GPU": "one"}}, TypeError, "resources="),
    # Never met (nan, inf); past 64 bits, the scheduler dropped the worker it sent to.
    ({"resources": {"GPU": math.nan}}, ValueError, "'GPU' must be a finite amount"),
    ({"resources": {"GPU": math.inf}}, ValueError, "'GPU' must be a finite amount"),
    ({"resources": {"GPU": -1}}, ValueError, "'GPU' must be a finite amount"),
    ({"priority": 2**70}, ValueError, "priority=.* must fit in 64 bits"),
    ({"priority": -2**63 - 1}, ValueError, "priority=.* must fit in 64 bits"),
    ({"workers": 5}, TypeError, "workers=5"),
    ({"allow_other_workers": "no"}, TypeError, "allow_other_workers='no'"),
])
def test_invalid_call_option_is_named(options: dict[str, Any], kind: type, match: str) -> None:
    with pytest.raises(kind, match=match):
        CallOptions.build(**options)


@pytest.mark.parametrize("hook", [5, "log", tasks.async_square])
def test_an_event_hook_that_cannot_be_called_is_refused(hook: object) -> None:
    # Accepted, each event logged an error (invisible without logging set up), or
    # made a coroutine never awaited: no hook ran, and nothing said so.
    with pytest.raises(TypeError, match="on_event=.* is invalid"):
        ResilientPool(on_event=hook)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", [0, 1, "yes", None])
def test_return_exceptions_must_be_a_bool_with_or_without_other_options(flag: object) -> None:
    # return_exceptions=0 alone was taken as False; with a timeout it was refused.
    for options in ({}, {"timeout": 1}):
        with pytest.raises(TypeError, match=f"return_exceptions={flag!r} is invalid"):
            CallOptions.build(flag, **options)  # type: ignore[arg-type]


def test_did_you_mean_names_the_methods_own_keywords_and_no_far_guess() -> None:
    # `imap(..., orderd=False)` said "did you mean 'workers'?"; `retries=` said
    # 'resources'.
    with pytest.raises(TypeError, match="did you mean 'ordered'"):
        CallOptions.build(False, ("ordered",), orderd=False)
    for name in ("orderd", "retries"):
        with pytest.raises(TypeError) as info:
            CallOptions.build(**{name: 1})
        assert "did you mean" not in str(info.value)
        # A keyword meant for the function says how to pass one.
        assert f"functools.partial(fn, {name}=...)" in str(info.value)
    with pytest.raises(TypeError, match="ordered is an option of imap"):
        CallOptions.build(ordered=False)


def test_public_names_are_the_package_s_and_their_type_hints_resolve() -> None:
    # Tracebacks said asyncpool._errors.RemoteError; and a class named as the
    # package's whose annotations name private types fails get_type_hints.
    for name in asyncpool.__all__:
        value = getattr(asyncpool, name)
        if isinstance(value, type):
            typing.get_type_hints(value)
    assert repr(asyncpool.RemoteError) == "<class 'asyncpool.RemoteError'>"
    assert repr(asyncpool.ResilientPool) == "<class 'asyncpool.ResilientPool'>"


def test_the_option_lists_agree() -> None:
    # Each list is written once for mypy (a TypedDict) and once for the runtime (a
    # dataclass): they must not drift apart.
    from asyncpool._config import PoolOptions
    from asyncpool._options import CallKwargs

    for typed, runtime, beside in [(CallKwargs, CallOptions, {"return_exceptions"}),
                                   (PoolOptions, PoolConfig, {"max_workers"})]:
        hints, fields = typing.get_type_hints(typed), typing.get_type_hints(runtime)
        assert set(hints) | beside == {f.name for f in dataclasses.fields(runtime)}
        assert {name: fields[name] for name in hints} == hints  # the same types too
    # The builder's own parameters are not options a caller can pass.
    with pytest.raises(TypeError, match="unknown option '_own'"):
        CallOptions.build(_own=("x",))
    # A statistic is a counter or a figure taken at the moment: one added to the public
    # class alone read 0 for ever.
    from asyncpool._events import Counters, PoolStatistics

    now = {"workers", "chunks_in_flight", "max_chunks_in_flight", "active_calls"}
    counted = {f.name for f in dataclasses.fields(Counters)}
    assert {f.name for f in dataclasses.fields(PoolStatistics)} == counted | now | {"backend"}
    assert not counted & now


def test_call_options_are_built_once_when_none_are_given() -> None:
    assert CallOptions.build() is CallOptions.build()
    assert CallOptions.build(timeout=math.inf).timeout is None


def test_all_matches_exports() -> None:
    # The names are written three times: for type checkers (under TYPE_CHECKING), for
    # loading on first use (_WHERE), and in __all__. They must agree, and each must
    # load from where it says.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(asyncpool))
    checked = {alias.asname or alias.name: node.module for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
               for alias in node.names}
    where = asyncpool._WHERE
    assert set(checked) == set(where) == set(asyncpool.__all__)
    assert {name: f".{module}" for name, module in checked.items()} == where
    for name in asyncpool.__all__:
        value = getattr(asyncpool, name)
        assert value is getattr(importlib.import_module(where[name], "asyncpool"), name)


# -- the wire ------------------------------------------------------------------------


def test_large_bytes_travel_out_of_band_inside_containers_too() -> None:
    # Inside a dict or a list they were pickled in band: 200 MB held the loop for
    # 130-290 ms each way.
    big, medium = b"x" * (1 << 20), bytearray(b"y" * (1 << 20))
    values = [big, ({"blob": big, "n": 1}, [medium, 2]), [1, 2], {"small": b"z"},
              [big] * (_wire.LOOK_INSIDE + 1)]
    parts = _wire.dumps(_wire.wrap_big(values))
    assert len(parts) == 3  # big (once, though it is in the dict too), medium
    back = _wire.loads(parts)
    assert back[:4] == values[:4] and back[4] == values[4]
    assert back[0] is back[1][0]["blob"]  # still one object
    assert type(back[1][1][0]) is bytearray
    small = [1, (2, 3), {"a": [4]}]
    assert _wire.wrap_big(small)[1] is small[1] and _wire.wrap_big(small)[2] is small[2]
    # run() and starmap items are argument tuples: one level more is looked into.
    args = [([{"blob": big}],)]
    assert len(_wire.dumps(_wire.wrap_big(args))) == 1
    assert len(_wire.dumps(_wire.wrap_big(args, 3))) == 2


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_results_read_in_slices_load_as_they_would_at_once(protocol: int) -> None:
    # Loaded off the loop, a results pickle is read in slices (see _salvage._Slices):
    # lines (protocol 0), frames, big bytes in band and out of band all come back.
    values = [{"id": i, "text": "\n" * (i % 3), "blob": b"x" * (i % 700)} for i in range(3000)]
    values += [b"y" * (3 << 20), (1.5, None, "z" * 200_000)]
    buffers: list[pickle.PickleBuffer] = []
    if protocol == 5:
        values.append(pickle.PickleBuffer(bytearray(b"w" * 100_000)))
    data = pickle.dumps(values, protocol, buffer_callback=buffers.append if protocol == 5
                        else None)
    loaded, errors = load_results([data, *(b.raw() for b in buffers)], paced=True)
    assert loaded == pickle.loads(data, buffers=buffers) and not errors
    assert loaded[:3003] == values[:3003]


def test_frames_survive_any_split_and_big_parts_arrive_in_place() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    big = bytes(range(256)) * (_wire.SMALL_FRAME // 128)  # 2 MiB: read into place
    frames = [(_wire.RESULTS, _wire.dumps(["small", 1])),
              (_wire.CHUNK, _wire.dumps(_wire.wrap_big([big, b"tiny"]))),
              (_wire.CANCEL, _wire.dumps([3]))]
    data = b"".join(bytes(memoryview(x).cast("B"))
                    for kind, parts in frames for x in _wire.frame(kind, parts))
    got: list[tuple[int, Any]] = []
    reader = _wire.FrameReader()

    def send() -> None:
        # In uneven slices, as a socket may deliver them.
        at, step = 0, 1
        while at < len(data):
            a.sendall(data[at:at + step])
            at += step
            step = step * 3 + 1

    sender = threading.Thread(target=send)
    sender.start()
    while len(got) < 3:
        select.select([b], [], [], 5)
        assert reader.read(b, lambda kind, parts: got.append((kind, _wire.loads(parts))))
    sender.join()
    assert [kind for kind, _ in got] == [_wire.RESULTS, _wire.CHUNK, _wire.CANCEL]
    assert got[0][1] == ["small", 1] and got[2][1] == [3]
    assert got[1][1][0] == big and type(got[1][1][0]) is bytes and got[1][1][1] == b"tiny"
    a.close()
    assert reader.read(b, lambda kind, parts: None) is False
    b.close()


class Holder:
    def __init__(self, value: object) -> None:
        self.value = value


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


class RefusesState:
    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: object) -> None:
        raise ValueError("no state for me")


def _pickled_with_a_class_gone(build: Any, base: str = "", dumps: Any = pickle.dumps
                               ) -> bytes:
    """The pickle of ``build(Gone)`` made where class Gone (and function gone_fn)
    exists, which then goes."""
    module = ModuleType("gone_after_pickling")
    exec(f"class Gone({base}):\n    def meth(self): pass\n\ndef gone_fn(x): pass\n",
         module.__dict__)
    sys.modules[module.__name__] = module
    try:
        return bytes(dumps(build(module.Gone), 5))
    finally:
        del sys.modules[module.__name__]


def test_results_that_do_not_load_are_pinned_on_their_items() -> None:
    blob = _pickled_with_a_class_gone(
        lambda gone: [0, gone(), {"k": [gone()]}, Holder(gone()), gone, "five"])
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(blob)
    results, errors = load_results([blob])
    assert sorted(errors) == [1, 2, 3, 4]
    assert all(isinstance(e, SerializationError) and "gone_after_pickling.Gone" in str(e)
               for e in errors.values())
    assert [results[0], results[5]] == [0, "five"]
    assert load_results([pickle.dumps([1, Holder(2)], 5)])[1] == {}
    # A subclass of a builtin container that is gone is pinned on its item too (its
    # stand-in had no __setitem__ or append, and the whole stretch ran again).
    for base, make in (("dict", lambda gone: gone(a=1)), ("list", lambda gone: gone([1]))):
        blob = _pickled_with_a_class_gone(lambda gone, make=make: [0, make(gone), "x"], base)
        results, errors = load_results([blob])
        assert sorted(errors) == [1] and [results[0], results[2]] == [0, "x"]
    # So is one held in a slot of an instance of a class written in Python.
    results, errors = load_results([_pickled_with_a_class_gone(
        lambda gone: [0, Slotted(gone()), Slotted(2)])])
    assert sorted(errors) == [1] and results[0] == 0 and results[2].value == 2


@pytest.mark.parametrize("make", [
    lambda gone: gone().meth,  # a bound method: MethodType(a stand-in, a stand-in)
    lambda gone: functools.partial(sys.modules[gone.__module__].gone_fn, 1),
    lambda gone: RefusesState(),  # its __setstate__ raises here
    lambda gone: CalledAtLoad(),  # the call that rebuilds it raises here
])
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_a_result_that_fails_inside_is_pinned_on_its_item(make: Any, dumps: Any) -> None:
    # The failure was not found on its item, and every item of the stretch ran again.
    blob = _pickled_with_a_class_gone(lambda gone: [0, make(gone), "x", make(gone)],
                                      dumps=dumps)
    results, errors = _loaded_where_loading_fails(blob)
    assert sorted(errors) == [1, 3] and [results[0], results[2]] == [0, "x"]


LOADING_FAILS = [False]


def _loaded_where_loading_fails(blob: bytes) -> tuple[list[Any], dict[int, BaseException]]:
    """``load_results`` of ``blob`` while the classes below refuse to load."""
    LOADING_FAILS[0] = True
    try:
        return load_results([blob])
    finally:
        LOADING_FAILS[0] = False


def _load_or_fail(value: object) -> object:
    if LOADING_FAILS[0]:
        raise ValueError("no loading here")
    return value


class FailsToLoad:
    def __reduce__(self) -> tuple[Any, ...]:
        return _load_or_fail, (1,)


class CalledAtLoad:
    def __reduce__(self) -> tuple[Any, ...]:
        return _load_or_fail, (2,)


class RefusesNew:
    def __new__(cls) -> RefusesNew:
        if LOADING_FAILS[0]:
            raise ValueError("no new one here")
        return super().__new__(cls)


class RefusesStateHere:
    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: dict[str, int]) -> None:
        if LOADING_FAILS[0]:
            raise ValueError("no state here")
        self.__dict__.update(state)


@pytest.mark.parametrize("make", [RefusesNew, RefusesStateHere])
def test_one_object_in_two_results_that_fails_to_load_fails_both(make: Any) -> None:
    # The second reference came from the pickle's memo: the half-built object, with
    # none of its state, delivered as a success (or a __new__ that raised ran every
    # item of the stretch again).
    shared = make()
    results, errors = _loaded_where_loading_fails(pickle.dumps([0, shared, "x", shared], 5))
    assert sorted(errors) == [1, 3] and [results[0], results[2]] == [0, "x"]


def test_functions_among_results_beside_one_that_does_not_load_stay_themselves() -> None:
    # The search for failing calls wrapped every function it loaded: a function that
    # was itself a result came back as that wrapper, delivered as a success.
    blob = pickle.dumps([FailsToLoad(), [math.sqrt, 3], functools.partial(math.pow, 2),
                         _load_or_fail, "abc".upper, FailsToLoad()], 5)
    results, errors = _loaded_where_loading_fails(blob)
    assert sorted(errors) == [0, 5] and "_load_or_fail" in str(errors[0])
    assert results[1][0] is math.sqrt and results[2].func is math.pow
    assert results[3] is _load_or_fail and results[4]() == "ABC"


@pytest.mark.parametrize("build", [
    lambda gone: [1, types.SimpleNamespace(held=gone())],  # (its type is written in C)
    # One stand-in found in the first item and hidden in the second (a deque): the
    # second was delivered, with the stand-in inside, as a success.
    lambda gone: (lambda one: [[one], collections.deque([one])])(gone()),
])
def test_results_that_cannot_be_pinned_raise_the_pickles_own_error(build: Any) -> None:
    # A stand-in where the search cannot see it, or a failure with no stand-in: each
    # item must run again alone rather than get a result with a stand-in inside.
    with pytest.raises(Exception) as info:
        load_results([_pickled_with_a_class_gone(build)])
    assert isinstance(info.value, (ModuleNotFoundError, ValueError))


def _cut_while_running() -> tuple[list[int], list[int]]:
    """Runs 80 small items while another thread cuts them short after the item it
    sees running: (the items that ran, the cut it claims exact, if any)."""
    ran: list[int] = []

    def fn(x: int) -> None:
        ran.append(x)
        sum(range(20))

    runs: list[Any] = [(fn, False, 1, list(range(40))), (fn, False, 2, list(range(40, 80)))]
    progress = [-1, -1, 0, 0]
    claimed: list[int] = []

    def cutter() -> None:
        while len(ran) < 80:
            at = progress[1]
            if at >= 0 and cut_runs(runs, at + 1):
                if progress[1] == at:
                    claimed.append(at + 1)
                return

    thread = threading.Thread(target=cutter)
    thread.start()
    execute(runs, 0, lambda *_: (set(), False), progress)
    thread.join()
    return ran, claimed


def test_a_cut_whose_position_held_is_exact() -> None:
    # Another thread cuts a running chunk after the item it sees running; if that
    # position still holds after the cut, exactly the items before the cut ran.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    exact = 0
    try:
        # A claimed cut comes about once in a hundred tries (far fewer on a loaded
        # machine: none in 5,000 once, beside the rest of the suite): try until a few
        # came, for up to 30 s.
        import time

        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            ran, claimed = _cut_while_running()
            if claimed:
                exact += 1
                assert ran == list(range(claimed[0]))
                if exact == 3:
                    break
    finally:
        sys.setswitchinterval(switch)
    assert exact > 0


def test_a_partials_large_bytes_are_not_copied_into_its_pickle() -> None:
    from asyncpool._functions import FunctionBook

    table = b"t" * (8 << 20)
    shipped = FunctionBook().ship(functools.partial(tasks.with_table, table))
    assert len(shipped.blob) < 4096
    assert sum(memoryview(b).nbytes for b in shipped.buffers) == len(table)
    fn = pickle.loads(shipped.blob, buffers=shipped.buffers)
    assert fn((3, "")) == 9 + len(table)
    assert len(shipped.whole()) > len(table) and not shipped.buffers  # for Dask
    # One object passed twice is still one (and travels once): each was wrapped anew.
    rows = [table]
    shipped = FunctionBook().ship(functools.partial(tasks.echo, rows, rows, key=rows))
    assert sum(memoryview(b).nbytes for b in shipped.buffers) == len(table)
    fn = pickle.loads(shipped.blob, buffers=shipped.buffers)
    assert fn.args[0] is fn.args[1] is fn.keywords["key"] and fn.args[0] == rows


def test_a_partials_large_bytearray_leaves_as_it_was_and_stays_its_owners() -> None:
    # It was shipped without a copy and kept exported: workers that loaded the
    # function later saw the owner's later writes, and resizing it raised BufferError
    # until the call's function was gone.
    from asyncpool._functions import FunctionBook

    table = bytearray(8 << 20)
    shipped = FunctionBook().ship(functools.partial(tasks.echo, table))
    table[0] = 7
    table.extend(b"more")
    fn = pickle.loads(shipped.blob, buffers=shipped.buffers)
    assert type(fn.args[0]) is bytearray and fn.args[0][0] == 0
    assert len(fn.args[0]) == 8 << 20


def test_a_partial_without_large_bytes_is_pickled_once_and_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each call's partial was pickled twice (once to look for large bytes), and a
    # subclass of partial would have travelled as a plain one.
    from asyncpool import _functions
    from asyncpool._functions import FunctionBook

    class Tagged(functools.partial):  # type: ignore[type-arg]
        pass

    pickles: list[object] = []
    dumps = _functions.dumps_for_workers
    monkeypatch.setattr(_functions, "dumps_for_workers",
                        lambda *a, **k: pickles.append(a[0]) or dumps(*a, **k))
    FunctionBook().ship(functools.partial(divmod, 7))
    assert len(pickles) == 1
    shipped = FunctionBook().ship(Tagged(tasks.with_table, b"t" * (1 << 20)))
    assert type(pickles[-1]) is Tagged and not shipped.buffers


def _script(source: str, **names: Any) -> dict[str, Any]:
    """The namespace of a main script that ran ``source`` (its functions go by value)."""
    space: dict[str, Any] = {"__name__": "__main__", **names}
    exec(source, space)  # noqa: S102 - test code
    return space


def test_a_main_script_function_is_pickled_again_only_when_what_it_reads_changed() -> None:
    # Each call of a script's function pickled it by cloudpickle on the loop (a burst of
    # 5,000 calls: half the time), and each worker loaded it anew.
    from asyncpool._functions import FunctionBook

    script = _script("def helper(x):\n    return x * SCALE\n"
                     "def work(x, k=2):\n    return math.floor(helper(x)) + LIMIT\n",
                     math=math, SCALE=3, LIMIT=(1, "a"))
    book = FunctionBook()
    first, again = book.ship(script["work"]), book.ship(script["work"])
    assert first.kept and again.kept and again.blob is first.blob
    assert again.id != first.id  # each call's own: it brings the globals as they are
    for name, value in (("SCALE", 4), ("LIMIT", (2, "b")), ("math", functools),
                        ("helper", script["work"])):
        before, script[name] = script[name], value
        changed = book.ship(script["work"])
        assert changed.blob != first.blob and changed.kept, name
        script[name] = before
        assert book.ship(script["work"]).blob == first.blob
    script["work"].__defaults__ = (3,)
    assert book.ship(script["work"]).blob != first.blob
    # What may change in place, or is not plain: pickled each time.
    for source in ("def f(x):\n    return TABLE\n", "def f(x, seen=[]):\n    return x\n",
                   "class C:\n    pass\ndef f(x):\n    return C\n"):
        f = _script(source, TABLE=[1])["f"]
        one, two = book.ship(f), book.ship(f)
        assert not one.kept and one.blob is not two.blob and one.blob == two.blob, source
    wrapped = _script("def f(x):\n    return x\n")["f"]
    wrapped.note = 1
    assert not book.ship(wrapped).kept
    # A big pickle is not held (a lambda holding a request's body, per call).
    body = _script("def f(x):\n    return len(BODY)\n", BODY=b"b" * (1 << 20))["f"]
    assert not book.ship(body).kept and book.ship(body).blob is not book.ship(body).blob


def test_calls_sharing_a_chunk_are_timed_each_on_its_own() -> None:
    # The chunk's time was shared among its calls by their counts of items: a 6 us
    # function packed beside 5 ms items was taken for 470 us an item, and its next
    # small maps went out an item per chunk behind the slow ones.
    from asyncpool._call import by_timing
    from asyncpool._sizing import Timing

    ends: list[tuple[list[float], int]] = []

    def tick(first: int, upto: int, results: list[Any], errors: dict[int, BaseException],
             end: tuple[list[float], int] | None) -> tuple[set[int], bool]:
        if end is not None:
            ends.append(end)
        return set(), False

    execute([(tasks.burn, False, 1, [0.01] * 2), (abs, False, 2, [-1] * 8)], 0, tick)
    (slow, quick), _ = ends[0]
    assert slow >= 0.02 and quick < slow / 2  # (8 calls of abs: microseconds)
    chunk = _chunk(2, 8)
    for piece in chunk.pieces:
        piece.call.timing = Timing()  # type: ignore[attr-defined]
    timed = by_timing(chunk, 10, [slow, quick])
    assert [timed[p.call.timing] for p in chunk.pieces] == [(2, slow), (8, quick)]
    assert by_timing(chunk, 10, 1.0)[chunk.pieces[1].call.timing] == (8, 0.8)


def test_the_last_results_of_a_chunk_travel_with_its_end() -> None:
    # Results go back every `flush` seconds; those of the last item must go with the
    # chunk's end, or a caller holding every result still sees its chunk in flight.
    ticks: list[tuple[int, int, bool]] = []

    def tick(first: int, upto: int, results: list[Any], errors: dict[int, BaseException],
             end: tuple[list[float], int] | None) -> tuple[set[int], bool]:
        ticks.append((first, upto, end is not None))
        return set(), False

    execute([(tasks.burn, False, 1, [0.002] * 4)], 0, tick, flush=0.001)
    assert ticks[-1][2] and ticks[-1][1] == 4 and ticks[-1][0] < 4
    assert all(upto < 4 for _, upto, end in ticks[:-1])


def test_a_script_object_whose_call_comes_from_a_library_keeps_its_globals() -> None:
    # Its class was rebound to the globals of the library's __call__ (contextlib's):
    # its own methods then read another module's names.
    import contextlib

    from asyncpool._share import share_main

    space: dict[str, Any] = {"__name__": "__main__"}
    exec("import contextlib\nSTATE = {'tag': 'own'}\n"
         "class Guard(contextlib.ContextDecorator):\n"
         "    def read(self):\n        return STATE['tag']\n", space)
    guard = space["Guard"]()
    assert share_main(guard, "a test", 1) is guard
    assert guard.read.__func__.__globals__ is not contextlib.__dict__
    assert guard.read() == "own"


def test_every_public_name_has_an_example() -> None:
    import inspect

    import asyncpool
    from asyncpool import ResilientPool, ResultStream

    documented = [(name, getattr(asyncpool, name)) for name in asyncpool.__all__
                  if name != "MISSING"]  # a constant: its docstring is the module's text
    for cls in (ResilientPool, ResultStream):
        documented += [(f"{cls.__name__}.{name}", getattr(cls, name))
                       for name in vars(cls) if not name.startswith("_")]
    lacking = [name for name, obj in documented if "```python" not in (inspect.getdoc(obj) or "")]
    assert not lacking, f"no example in the docstring of {lacking}"


def test_a_worker_says_it_handed_chunks_back_before_it_reads_another() -> None:
    # Said once its reading lock was let go, the chunk's thread could read and run the
    # next chunk first: the parent took that chunk's results for those of one handed
    # back ("results of chunk 51, not of 37"), in 1-2 maps of 15 recycling workers.
    from asyncpool._worker import _Worker

    parent, child = socket.socketpair()
    with parent, child:
        worker = _Worker(child, None, {"task_retries": 0, "max_tasks": None,
                                       "max_memory": None})
        shipping = _wire.dumps(([], []))
        for seq in (1, 2):
            _wire.send_frame(parent, _wire.CHUNK, [
                _wire.CHUNK_HEAD.pack(seq, 0.005, len(shipping)), *shipping,
                *_wire.dumps([])])
        _wire.send_frame(parent, _wire.WITHDRAW, _wire.dumps([1]))
        said: list[tuple[int, bool]] = []
        send = worker.send

        def spy(kind: int, parts: _wire.Parts) -> None:
            said.append((kind, worker.reading.locked()))
            send(kind, parts)

        worker.send = spy  # type: ignore[method-assign]
        assert worker.poll()
        assert said == [(_wire.WITHDRAWN, True)]  # told while nothing more can be read
        assert [_wire.CHUNK_HEAD.unpack(parts[0])[0] for _, parts in worker.inbox] == [2]
        got = _wire.recv_frame(parent)
        assert got is not None and got[0] == _wire.WITHDRAWN and _wire.loads(got[1]) == [1]


@pytest.mark.anyio
@pytest.mark.asyncio_only(reason="the Dask rung's client helpers run on asyncio only")
async def test_a_functions_scatter_failures_are_counted_apart_from_others(
        anyio_backend: str) -> None:
    # The Dask rung gives a function's chunks up after its third failed scatter in a
    # row. One count for every function was reset by another's success: a function
    # whose scatter always failed was resent for as long as other calls ran.
    from asyncpool._rungs._dask_client import Scattered, ScatterFailed

    class Client:
        async def scatter(self, blob: bytes, **options: Any) -> Any:
            if blob == b"bad":
                raise OSError("the worker died as it was sent")
            return SimpleNamespace(release=lambda: None)

    scattered = Scattered(Client(), 5.0)
    good, bad = SimpleNamespace(id=1, blob=b"good"), SimpleNamespace(id=2, blob=b"bad")
    tries = []
    for _ in range(3):
        await scattered.get(good)
        with pytest.raises(ScatterFailed) as failed:
            await scattered.get(bad)
        tries.append(failed.value.tries)
    assert tries == [1, 2, 3]


@pytest.mark.anyio
@pytest.mark.asyncio_only(reason="the Dask rung's client helpers run on asyncio only")
async def test_initializers_left_on_a_scheduler_leave_with_the_next_that_answers(
        anyio_backend: str) -> None:
    # Left by rungs its scheduler did not answer, initializer plugins were asked to
    # leave one after another, 5 s each, with no answer coming; keyed by the address
    # as written, another spelling of it never removed them.
    from asyncpool._rungs import _dask_init

    class Client:
        answers = False
        asked: list[str] = []

        async def unregister_worker_plugin(self, name: str) -> None:
            self.asked.append(name)
            await anyio.sleep(0)
            if not self.answers:
                raise OSError("the scheduler is gone")  # (as CommClosedError is)

    client = Client()
    for name in ("a", "b", "c"):
        await _dask_init.unregister_initializers(client, "sched-1", name, False)
    await _dask_init.unregister_initializers(client, "sched-1", None, True)
    assert client.asked == ["a"]  # the first gets no answer: the rest wait too
    client.answers = True
    await _dask_init.unregister_initializers(client, "sched-2", None, True)
    assert client.asked == ["a"]  # another scheduler (a restarted one) has none
    await _dask_init.unregister_initializers(client, "sched-1", "d", True)
    assert client.asked == ["a", "a", "b", "c", "d"]
    assert "sched-1" not in _dask_init._LEFT
    # Two closing at once: the second found the first had removed the entry.
    client.answers = False
    await _dask_init.unregister_initializers(client, "sched-3", "e", False)
    client.answers = True

    async def close() -> None:
        await _dask_init.unregister_initializers(client, "sched-3", None, True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(close)
        tg.start_soon(close)
    assert "sched-3" not in _dask_init._LEFT


def test_a_cut_charges_the_function_found_slow_and_no_other() -> None:
    # A cheap function sharing a chunk with a stale-timed one took the blame for the
    # stale one's slowness: its cost rose 6.5 times.
    from asyncpool._rebalance import overlong

    config = PoolConfig(max_workers=2, target_chunk_seconds=0.02)
    cheap, stale = _call(list(range(10)), 0.0001), _call(list(range(20)), 0.0001)
    chunk = Chunk([Piece(cheap, 0, list(range(10))), Piece(stale, 0, list(range(20)))])
    chunk.reported = 11  # the cheap items and one stale one came back; the next runs
    taken = overlong(chunk, 2.0, [], config)
    assert taken == [chunk]
    assert cheap.timing.per_item == 0.0001
    assert stale.timing.per_item is not None and stale.timing.per_item > 0.1
    # The slow items reported just before another function's: the next item, not yet
    # run, was charged for them (a quick function costed at 0.3 s an item).
    stale, cheap = _call(list(range(2)), 0.0001), _call(list(range(197)), 0.0001)
    chunk = Chunk([Piece(stale, 0, [0, 1]), Piece(cheap, 0, list(range(197)))])
    chunk.reported = 2
    assert overlong(chunk, 0.6, [], config, pace=0.3) == [chunk]
    assert cheap.timing.per_item == 0.0001
    assert stale.timing.per_item is not None and stale.timing.per_item > 0.1


def test_taken_back_chunks_go_again_where_their_items_first_stood() -> None:
    # Taken back together, a running chunk's rest and the chunks behind it went in the
    # reverse order; ordered by call, a small map's items cut from the head of a chunk
    # went behind the items of two bigger maps sent after them (it finished 2 s late).
    from asyncpool._resends import Resends

    big_a, big_b, small = (_call(list(range(100)), 0.01) for _ in range(3))
    first = Chunk([Piece(small, 0, list(range(50))), Piece(big_a, 64, list(range(35)))])
    later_a = Chunk([Piece(big_a, 0, list(range(64)))])
    later_b = Chunk([Piece(big_b, 0, list(range(64)))])
    rest_of_first = Chunk([Piece(small, 5, list(range(45)))])
    rest_of_first.place = (first.born, 5)
    resends = Resends()
    for chunk in (later_b, later_a, rest_of_first):  # taken back in any order
        resends.moved(chunk)
    assert list(resends) == [rest_of_first, later_a, later_b]
    crashed = Chunk([Piece(big_b, 64, [1])])
    resends.first(crashed)  # it was running: it goes first
    sent = [resends.next(100) for _ in range(2)]
    assert [(c.pieces[0].call, c.pieces[0].start) for c in sent if c] == [(big_b, 64),
                                                                          (small, 5)]


def test_calls_take_turns_among_items_taken_back() -> None:
    # Items of one big map taken back in many parts went out before any part of the
    # calls behind them.
    from asyncpool._resends import Resends

    big, other, third = (_call(list(range(100)), 0.01) for _ in range(3))
    resends = Resends()
    for start in range(0, 40, 10):
        resends.moved(Chunk([Piece(big, start, list(range(10)))]))
    resends.moved(Chunk([Piece(other, 0, list(range(10)))]))
    resends.moved(Chunk([Piece(third, 0, list(range(10)))]))
    order = []
    while (chunk := resends.next(100)) is not None:
        order.append((chunk.pieces[0].call, chunk.pieces[0].start))
    assert order == [(big, 0), (other, 0), (third, 0), (big, 10), (big, 20), (big, 30)]


def test_items_taken_back_keep_the_chunk_size_their_caller_chose() -> None:
    # Taken back from a worker slow to report (a loaded machine), a call's chunk of
    # 100 went out again a target's worth at a time: 96 chunks of one item.
    from asyncpool._resends import Resends

    chosen, auto = _call(list(range(200)), 0.03, chunk_size=100), _call(list(range(200)), 0.03)
    resends = Resends()
    resends.moved(Chunk([Piece(chosen, 4, list(range(96)))]))
    resends.moved(Chunk([Piece(auto, 4, list(range(96)))]))

    def size_chosen(call: Any) -> int | None:
        return call.options.chunk_size

    sizes = []
    while (chunk := resends.next(1000, 0.02, size_chosen)) is not None:
        sizes.append((chunk.pieces[0].call is chosen, chunk.size))
    assert sizes[0] == (True, 96) and {size for _, size in sizes[1:]} == {1}


def test_crash_resends_go_first_and_suspects_take_their_turn() -> None:
    # A chunk taken back later, from an older chunk, went before a crash resend (and
    # could go after a suspect): one queue ordered by place held all three kinds.
    from asyncpool._resends import Resends

    old, new = (_call(list(range(100)), 0.01) for _ in range(2))
    older = Chunk([Piece(old, 0, list(range(10)))])
    crashed, suspect = Chunk([Piece(new, 0, [1])]), Chunk([Piece(new, 1, [2])])
    resends = Resends()
    resends.last(suspect)
    resends.first(crashed)
    resends.moved(older)  # stood before both
    sent = [resends.next(100) for _ in range(3)]
    assert [(c.pieces[0].call, c.pieces[0].start) for c in sent if c] == [
        (new, 0), (old, 0), (new, 1)]


def test_a_call_sharing_a_chunk_taken_back_gets_its_turn() -> None:
    # A small call's items behind a big call's in a chunk taken back waited for the big
    # call's turn; now the call with fewer items left goes first.
    from asyncpool._resends import Resends

    big, small = _call(list(range(100)), 0.01), _call(list(range(10)), 0.01)
    resends = Resends()
    for start in range(0, 30, 10):
        resends.moved(Chunk([Piece(big, start, list(range(10)))]))
    resends.moved(Chunk([Piece(big, 30, list(range(5))), Piece(small, 0, list(range(5)))]))
    order = []
    while (chunk := resends.next(100)) is not None:
        order.append([(p.call, p.start) for p in chunk.pieces])
    assert order[:2] == [[(big, 30), (small, 0)], [(big, 0)]], order



def test_what_results_weigh_is_charged_only_to_their_own_function() -> None:
    # A report's bytes were spread over every piece it covered: six 5 MB results of
    # one function shared slices with a tiny one's, whose results then weighed 400 KB.
    from asyncpool._events import Counters
    from asyncpool._outcomes import Outcomes

    outcomes = Outcomes(PoolConfig(), Counters(), lambda *a, **k: None,
                        kick=lambda: None, settled=lambda rung: None)
    big, tiny = _call([0, 1], 0.01), _call([0, 1], 0.01)
    mixed = Chunk([Piece(big, 0, [0, 1]), Piece(tiny, 0, [0, 1])])
    outcomes.sent(mixed)
    outcomes.chunk_progress(mixed, 0, 4, [b"x", b"x", 1, 1], {}, nbytes=10 << 20)
    assert big.timing.result_bytes is None and tiny.timing.result_bytes is None
    alone = Chunk([Piece(big, 0, [0, 1])])
    outcomes.sent(alone)
    outcomes.chunk_progress(alone, 0, 2, [b"x", b"x"], {}, nbytes=10 << 20)
    assert big.timing.result_bytes == 5 << 20 and tiny.timing.result_bytes is None


def test_a_suspect_is_not_starved_by_chunks_taken_back_meanwhile() -> None:
    # Sent only once nothing taken back waited, a crashed item's retry waited 6 s
    # while cuts of two big maps kept coming.
    from asyncpool._resends import Resends

    big, other, small = (_call(list(range(1000)), 0.01) for _ in range(3))
    resends = Resends()
    resends.last(Chunk([Piece(small, 0, [0])], crashes=1, suspect=True))
    sent = []
    for start in range(0, 100, 10):  # cuts keep coming
        resends.moved(Chunk([Piece(big, start, list(range(10)))]))
        resends.moved(Chunk([Piece(other, start, list(range(10)))]))
        chunk = resends.next(100)
        assert chunk is not None
        sent.append(chunk.pieces[0].call)
    assert small in sent[:3], sent



def test_a_cluster_worker_keeps_the_latest_namespaces_and_those_pinned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A Dask worker keeps the script globals of the latest 16 pools, and beside them
    # those of pools whose initializer ran there, until their plugin goes. With 16
    # pinned, a pool without one lost its own at once (its functions read None).
    import threading

    from asyncpool import _share

    monkeypatch.setattr(_share, "_spaces", {})
    monkeypatch.setattr(_share, "_pinned", {})
    space: dict[str, Any] = {"__name__": "__main__"}
    exec("def read(_):\n    return STATE\n", space)
    space["STATE"] = "set"

    def state(name: str) -> object:
        return _share._spaces[name][0]["STATE"]

    for n in range(_share.SPACES + 1):
        _share.pin(f"pinned {n}", 1)
        _share.share_main(space["read"], f"pinned {n}")
        _share._spaces[f"pinned {n}"][0]["STATE"] = f"initialised {n}"
    _share.share_main(space["read"], "plain")
    assert state("plain") == "set"
    for n in range(3 * _share.SPACES):
        _share.share_main(space["read"], f"pool {n}")
    assert "plain" not in _share._spaces and f"pool {3 * _share.SPACES - 1}" in _share._spaces
    assert len(_share._spaces) == 2 * _share.SPACES + 1
    assert [state(f"pinned {n}") for n in range(_share.SPACES + 1)] == [
        f"initialised {n}" for n in range(_share.SPACES + 1)]
    assert _share.pin("pinned 0", -1) and "pinned 0" not in _share._spaces
    for n in range(100):  # a pinned one goes only when let go (64 were kept)
        _share.pin(f"more {n}", 1)
        _share.share_main(space["read"], f"more {n}")
    assert state("pinned 1") == "initialised 1" and "more 99" in _share._spaces
    # Worker threads load functions at once: none fails, none loses its namespace.
    errors: list[BaseException] = []

    def load(thread: int) -> None:
        try:
            for n in range(2000):  # 12 namespaces in all: none is too old to keep
                fn = _share.share_main(space["read"], f"thread {thread} {n % 3}")
                assert fn.__globals__ is _share._spaces[f"thread {thread} {n % 3}"][0]
        except BaseException as exc:
            errors.append(exc)

    monkeypatch.setattr(_share, "_spaces", {})
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(0.005)
    assert not errors, errors[:3]


def test_a_cluster_worker_follows_globals_and_keeps_a_busy_pools_namespace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A global set back to an earlier value pickles as before: the loaded function was
    # reused as bound then, and read the later value. A pool's namespace went first
    # while it was busy (only loads counted as use), and its new functions read None.
    import cloudpickle

    from asyncpool import _share

    monkeypatch.setattr(_share, "_spaces", {})
    monkeypatch.setattr(_share, "_pinned", {})
    script: dict[str, Any] = {"__name__": "__main__", "CFG": 0, "MEMO": {}}
    exec("def read(_):\n    return CFG\n"
         "def fill(_):\n    MEMO['state'] = 'filled'\n"
         "def recall(_):\n    return MEMO.get('state')\n", script)
    versions = itertools.count(1)

    def run(pool: str, name: str, cfg: int = 0, version: int = 0) -> object:
        script["CFG"] = cfg
        blob = cloudpickle.dumps(script[name])
        return _share.cluster_function(pool, blob, version or next(versions),
                                       cloudpickle.loads)(0)

    assert [run("pool", "read", cfg) for cfg in (1, 2, 1, 2, 1)] == [1, 2, 1, 2, 1]
    run("busy", "fill")
    busy = next(versions)
    for n in range(3 * _share.SPACES):
        run(f"pool {n}", "read")
        assert run("busy", "recall", version=busy) == "filled"  # one call's chunks
    assert run("busy", "recall") == "filled"
    # A namespace that went takes the functions bound to it along.
    assert "pool 0" not in _share._spaces
    assert all(len(space[2]) <= 2 for space in _share._spaces.values())


def test_a_cluster_worker_loads_outside_its_lock_and_keeps_what_functions_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Loading (unpickling) ran under the lock the worker's own loop takes: one slow
    # load held every other task and a pool's opening. A function under lru_cache lost
    # its cache with each call's new pickle. Loaded functions were bounded by bytes
    # only (40,000 partials of 481 bytes were kept).
    import cloudpickle

    from asyncpool import _share

    monkeypatch.setattr(_share, "_spaces", {})
    monkeypatch.setattr(_share, "_pinned", {})
    script: dict[str, Any] = {"__name__": "__main__", "RUNS": []}
    exec("import functools\n"
         "@functools.lru_cache(None)\n"
         "def expensive(x):\n    RUNS.append(x)\n    return x * 2\n"
         "def plain(x):\n    return x\n", script)
    versions = itertools.count(1)
    expensive = _share.dumps_for_workers(script["expensive"])
    for _ in range(5):
        assert _share.cluster_function("pool", expensive, next(versions),
                                       cloudpickle.loads)(3) == 6
    assert _share._spaces["pool"][0]["RUNS"] == [3]
    plain = cloudpickle.dumps(script["plain"])
    loading, loaded = threading.Event(), threading.Event()

    def slow(blob: bytes) -> Any:
        loading.set()
        loaded.wait(10)
        return cloudpickle.loads(blob)

    thread = threading.Thread(target=_share.cluster_function,
                              args=("pool", plain, next(versions), slow))
    thread.start()
    done = threading.Event()

    def meanwhile() -> None:  # what is loaded runs, and a pool's plugin pins its own
        assert _share.cluster_function("pool", expensive, 1, cloudpickle.loads)(3) == 6
        _share.pin("another", 1)
        done.set()

    other = threading.Thread(target=meanwhile)
    try:
        assert loading.wait(10)
        other.start()
        assert done.wait(5), "held by another thread's load"
    finally:
        loaded.set()
        thread.join()
        other.join()
    for n in range(3 * _share.LOADED):
        blob = cloudpickle.dumps(functools.partial(script["plain"], n))
        assert _share.cluster_function("pool", blob, next(versions), cloudpickle.loads)() == n
    assert len(_share._spaces["pool"][2]) <= _share.LOADED


def test_a_cluster_workers_threads_loading_one_pickle_share_what_it_caches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two threads loading the same pickle at once each kept a function of their own,
    # with a cache of its own: the cached function ran twice.
    from asyncpool import _share

    monkeypatch.setattr(_share, "_spaces", {})
    script: dict[str, Any] = {"__name__": "__main__", "RUNS": []}
    exec("import functools\n"
         "@functools.lru_cache(None)\n"
         "def expensive(x):\n    RUNS.append(x)\n    return x * 2\n", script)
    blob = _share.dumps_for_workers(script["expensive"])
    both = threading.Barrier(2)

    def load(data: bytes) -> Any:
        both.wait(10)  # each loads before either has bound what it loaded
        return pickle.loads(data)

    got: list[Any] = []
    threads = [threading.Thread(target=lambda v=v: got.append(
        _share.cluster_function("pool", blob, v, load))) for v in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [fn(5) for fn in got] == [10, 10]
    assert _share._spaces["pool"][0]["RUNS"] == [5]


@pytest.mark.anyio
async def test_an_input_closed_while_its_feeder_waits_for_the_rate_limit_holds_it_not(
        anyio_backend: str) -> None:
    # Closed (its call failed) while its feeder waited for a start for an item whose
    # start had gone back, the input took that start when it came, and held every
    # other call under the limit until its caller came back.
    from asyncpool._source import RateLimit, Source

    limit = RateLimit(1000)
    source = Source(iter(range(10)), [limit])
    other = object()
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.feed, lambda: 1, lambda: None)
        await wait_until(lambda: source.buffered == 1)  # let through, held
        source.idle()  # its caller fell behind: the start goes back
        limit.hold(other)  # another call holds the limit meanwhile
        assert not source.available()  # ... and its feeder asks again, and waits
        # (The feeder makes the lock as it first waits: this test may look before.)
        await wait_until(lambda: limit._turn is not None and limit._turn.locked())
        source.close()
        limit.let_go(other)  # the start comes: nothing of the closed input takes it
        await wait_until(lambda: not limit._turn.locked())  # (its feeder went on)
        assert limit._holders == set()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("session", [False, True], ids=["process", "its-group"])
def test_a_workers_signals_never_reach_a_process_that_took_its_pid(session: bool) -> None:
    # The fork server reaps a worker before the pool hears of it: a kill by number in
    # between reached whatever took the pid (a rare CI failure: signals to reaped pids).
    import os
    import subprocess

    from asyncpool._rungs._death import Reach

    last_pid = "/proc/sys/kernel/ns_last_pid"
    if not os.access(last_pid, os.W_OK):
        pytest.skip("reusing a pid on purpose needs root (ns_last_pid)")
    gone = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reach = Reach(gone.pid)
    gone.kill()
    gone.wait()  # reaped: its pid (and group id) are free
    for _ in range(50):
        with open(last_pid, "w") as file:
            file.write(str(gone.pid - 1))
        taker = subprocess.Popen(["sleep", "60"], start_new_session=session)
        if taker.pid == gone.pid:
            break
        taker.kill()
        taker.wait()
    else:
        pytest.skip("the pid went to another process each time")
    try:
        os.kill(taker.pid, 0)  # the number reaches the newcomer
        reach.kill()
        with pytest.raises(subprocess.TimeoutExpired):
            taker.wait(timeout=0.5)
    finally:
        reach.close()
        taker.kill()
        taker.wait()


def test_a_workers_watcher_wakes_for_a_cancellation_not_for_chunks_sent_ahead() -> None:
    # Woken by every chunk sent ahead (one per call, for a service), the watcher took
    # the interpreter lock from the running item, and the parent lost its CPU in each
    # send: 0.6-0.8 ms a request under load, 13 system calls an item against 8.
    import os

    from asyncpool._worker import _Worker

    parent, child = socket.socketpair()
    wake_r, wake_w = os.pipe()
    with parent, child:
        try:
            worker = _Worker(child, None, {"task_retries": 0, "max_tasks": None,
                                           "max_memory": None}, wake_r)
            shipping = _wire.dumps(([], []))
            _wire.send_frame(parent, _wire.CHUNK, [
                _wire.CHUNK_HEAD.pack(1, 0.005, len(shipping)), *shipping, *_wire.dumps([])])
            assert not worker.wait_for_parent(0.2)
            assert worker.poll() and len(worker.inbox) == 1  # read between items
            _wire.send_frame(parent, _wire.CANCEL, _wire.dumps([7]))
            os.write(wake_w, b"!")
            assert worker.wait_for_parent(5)
            assert worker.poll() and 7 in worker.cancelled
            assert not worker.wait_for_parent(0.05)  # its wake-up was read with it
            # The parent's end closed (it is gone): the socket says the rest.
            os.close(wake_w)
            wake_w = -1
            assert worker.wait_for_parent(5) and worker.poll()
            assert worker.wake == -1
            parent.close()
            assert worker.wait_for_parent(5) and worker.poll() and worker.closed
        finally:
            for fd in (wake_r, wake_w):
                if fd >= 0:
                    os.close(fd)


async def test_the_parent_wakes_a_workers_watcher_only_for_what_cannot_wait(
        anyio_backend: str) -> None:
    import os

    from asyncpool._forkserver import Spawned
    from asyncpool._loop import current_loop
    from asyncpool._rungs._proc import Events, Proc

    ours, theirs = socket.socketpair()
    status, status_theirs = socket.socketpair()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    with ours, theirs, status, status_theirs:
        try:
            proc = Proc(Spawned(ours, status, [0] * 4, None, wake_w),  # type: ignore[arg-type]
                        Events(), current_loop())
            woken = []
            for kind, parts in [(_wire.CHUNK, [b"chunk"]), (_wire.CANCEL, _wire.dumps([1])),
                                (_wire.CHUNK, [b"chunk"]), (_wire.WITHDRAW, _wire.dumps([2]))]:
                proc.send(kind, parts)
                assert _wire.recv_frame(theirs) is not None
                try:
                    woken.append(len(os.read(wake_r, 64)))
                except BlockingIOError:
                    woken.append(0)
            assert woken == [0, 1, 0, 1]
        finally:
            os.close(wake_r)
            os.close(wake_w)


def test_a_container_of_large_bytes_that_holds_itself_still_does() -> None:
    # Its copy was made after its elements: where it held itself, it held a chain of
    # copies (depth long), and came back without itself (plain pickle keeps it).
    blobs = [b"x" * (1 << 20) for _ in range(100)]
    for holder in ([blobs[0]], list(blobs), {"a": blobs[0]}, dict(enumerate(blobs))):
        if isinstance(holder, dict):
            holder["me"] = holder
        else:
            holder.append(holder)
        parts = _wire.dumps(_wire.wrap_big([holder]))
        assert len(parts) > 1  # (out of band)
        back = pickle.loads(parts[0], buffers=parts[1:])[0]
        assert (back["me"] if isinstance(back, dict) else back[-1]) is back


def test_chunks_of_two_initializers_never_share_a_cluster_workers_process() -> None:
    # Two pools' initializers set one global of an importable module on a Dask worker:
    # a chunk of one that ran after the other's initializer had run read its state.
    from asyncpool import _turns

    state: dict[str, str | None] = {"tag": None}
    wrong: list[tuple[str, object, object]] = []
    applied: list[str] = []

    def chunks(tag: str) -> None:
        def apply() -> None:
            applied.append(tag)
            state["tag"] = tag

        for _ in range(15):
            assert _turns.enter(tag, apply)
            try:
                before = state["tag"]
                time.sleep(0.001)
                if (before, state["tag"]) != (tag, tag):
                    wrong.append((tag, before, state["tag"]))
            finally:
                _turns.leave()

    threads = [threading.Thread(target=chunks, args=(tag,)) for tag in "ttuuv"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)  # none waited for good
    assert not wrong, wrong[:5]
    assert set(applied) == {"t", "u", "v"}
    # One that raises holds nothing; nor one whose pool left as it ran (given up on: the
    # others go on meanwhile).
    with pytest.raises(ZeroDivisionError):
        _turns.enter("w", lambda: 1 / 0)  # type: ignore[func-returns-value]
    release = threading.Event()
    left: list[bool] = []
    slow = threading.Thread(target=lambda: left.append(_turns.enter("x", release.wait)))
    slow.start()
    time.sleep(0.05)
    assert not _turns.enter("t", lambda: None, timeout=0)  # x's initializer runs
    _turns.abandon("x")
    assert _turns.enter("t", lambda: None, timeout=0) and _turns._current == "t"
    _turns.leave()
    release.set()
    slow.join(timeout=10)
    # It ran to its end after all, over t's state maybe: t's next chunk runs t's again.
    assert left == [False] and _turns._current is None
    again: list[str] = []
    assert _turns.enter("t", lambda: again.append("t")) and again == ["t"]
    _turns.leave()
