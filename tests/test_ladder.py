"""The ladder under failed thread starts aimed at exact lines (the real fault, a pids
limit, is in test_pids_cgroup.py)."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator

import anyio
import pytest
from loky.process_executor import BrokenProcessPool

from asyncpool import ResilientPool
from asyncpool._retry import is_transient

from . import tasks

_original_start = threading.Thread.start


class ThreadStarts:
    """Makes chosen calls of Thread.start fail as an exhausted machine does."""

    def __init__(self) -> None:
        self.count = 0
        self.fail_numbers: set[int] = set()
        self.blocked = False

    def __call__(self, thread: threading.Thread) -> None:
        self.count += 1
        if self.blocked or self.count in self.fail_numbers:
            raise RuntimeError("can't start new thread")
        _original_start(thread)


@pytest.fixture
def thread_starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadStarts]:
    starts = ThreadStarts()
    monkeypatch.setattr(threading.Thread, "start", lambda self: starts(self))
    yield starts


def test_is_transient() -> None:
    assert is_transient(RuntimeError("can't start new thread"))
    assert is_transient(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"))
    assert is_transient(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_transient(BrokenProcessPool("x"), starting=True)
    assert not is_transient(BrokenProcessPool("x"))
    assert not is_transient(RuntimeError("something else"))
    assert not is_transient(OSError(errno.ENOENT, "No such file"))
    assert not is_transient(ValueError("can't start new thread"))


@pytest.mark.asyncio
@pytest.mark.parametrize("nth", [1, 2, 3])
async def test_nth_thread_start_fails_then_process_rung(
    thread_starts: ThreadStarts, nth: int, no_leaks: None
) -> None:
    # 1: the helper thread that builds the executor; 2: loky's manager thread (started
    # inside the warm-up submit); 3: the call queue's feeder thread (started by the
    # manager). Each failure must be retried and leave no worker behind.
    thread_starts.fail_numbers = {nth}
    async with ResilientPool(max_workers=2, backoff_initial=0.01) as pool:
        assert pool.backend == "process"
        assert await pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
        stats = pool.statistics()
        assert stats.creation_failures == 1 and stats.creation_attempts == 2
        assert stats.fallbacks == 0


@pytest.mark.asyncio
async def test_no_thread_at_all_runs_inline_and_climbs_back(
    thread_starts: ThreadStarts, caplog: pytest.LogCaptureFixture
) -> None:
    thread_starts.blocked = True
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    caplog.set_level(logging.INFO, logger="asyncpool")
    async with ResilientPool(max_workers=2, backoff_initial=0.01, creation_attempts=2,
                             promote_after=0.05) as pool:
        assert pool.backend == "inline"
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            results = await pool.map(tasks.burn, [0.003] * 20)
            tg.cancel_scope.cancel()
        assert results == [0.003] * 20
        # Other tasks ran while items ran inline.
        assert ticks >= 5
        stats = pool.statistics()
        # 2 rungs x 2 attempts, plus any tries of the promoter already made.
        assert stats.fallbacks == 2 and stats.creation_failures >= 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("process rung" in r.getMessage() for r in warnings)
        assert any("thread rung" in r.getMessage() for r in warnings)

        thread_starts.blocked = False
        with anyio.fail_after(30):
            while pool.backend != "process":
                await anyio.sleep(0.02)
        assert pool.statistics().promotions >= 1
        assert await pool.map(tasks.square, range(50)) == [i * i for i in range(50)]
        assert any(r.levelno == logging.INFO and "promoted" in r.getMessage()
                   for r in caplog.records)


@pytest.mark.asyncio
async def test_thread_rung_when_processes_cannot_start(no_leaks: None) -> None:
    async with ResilientPool(max_workers=2, rungs=("thread", "inline")) as pool:
        assert pool.backend == "thread"
        names = set(await pool.map(tasks.thread_name, range(50), chunk_size=1))
        assert all(name.startswith("asyncpool-thread-") for name in names)


@pytest.mark.asyncio
async def test_promotion_loses_and_duplicates_nothing(thread_starts: ThreadStarts) -> None:
    # Work in flight while the pool climbs from inline to process comes back once each.
    thread_starts.blocked = True
    async with ResilientPool(max_workers=2, backoff_initial=0.01, creation_attempts=1,
                             promote_after=0.01, chunk_size=5) as pool:
        assert pool.backend == "inline"
        thread_starts.blocked = False
        seen = [y async for y in pool.imap(tasks.burn, [0.002] * 400, ordered=False)]
        assert len(seen) == 400
        ordered = await pool.map(tasks.square, range(3000))
        assert ordered == [i * i for i in range(3000)]


@pytest.mark.asyncio
async def test_transient_error_at_submit_sends_the_chunk_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A real EAGAIN at submit cannot be aimed at one chunk; this hits that exact line.
    from asyncpool._backends import ProcessRung

    original = ProcessRung.submit
    calls = {"n": 0}

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Refuse the 3rd and 5th submits, when earlier chunks are running on the
        # executor that is being given up.
        calls["n"] += 1
        if calls["n"] in (3, 5):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ProcessRung, "submit", submit)
    async with ResilientPool(max_workers=2, backoff_initial=0.01) as pool:
        results = await pool.map(tasks.burn, [0.002] * 300, chunk_size=10)
        assert results == [0.002] * 300
        stats = pool.statistics()
        assert stats.resubmitted_chunks == 2 and stats.tasks_completed == 300
        # The refusing executor was drained, not killed: nothing on it crashed.
        assert stats.worker_crashes == 0
        assert pool.backend == "process"
