"""The ladder: backoff, falling back, climbing back, events. Exact faults come from a
fake rung standing in through the rung registry; the real exhaustion of threads and
processes is in test_pids_cgroup.py."""

from __future__ import annotations

import logging

import anyio
import pytest

from asyncpool import InitializerFailed, PoolEvent, PoolUnavailable, ResilientPool
from asyncpool._rungs.base import RungState

from . import tasks
from .fakes import Script, fake_rungs
from .helpers import ThreadStarts, run_script, wait_until

pytestmark = pytest.mark.anyio
FAST = {"backoff_initial": 0.001, "backoff_max": 0.01, "promote_after": 0.01,
        "promote_max": 0.05}


async def test_failed_starts_back_off_then_serve(monkeypatch: pytest.MonkeyPatch,
                                                 anyio_backend: str) -> None:
    script = Script(failing_starts=2)
    with fake_rungs(monkeypatch, process=script):
        async with ResilientPool(max_workers=2, **FAST) as pool:
            assert pool.backend == "process" and script.starts == 3
            assert await pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
            stats = pool.statistics()
            assert stats.creation_attempts == 3 and stats.creation_failures == 2
            assert stats.fallbacks == 0


async def test_a_fault_in_sending_fails_the_calls_it_touched(
        monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # Whatever goes wrong while a chunk is sent, its callers hear of it: they never
    # wait for items that went nowhere.
    script = Script(submit_error=RuntimeError("the send broke"))
    with fake_rungs(monkeypatch, process=script):
        async with ResilientPool(max_workers=2, **FAST) as pool:
            with anyio.fail_after(10), pytest.raises(RuntimeError, match="the send broke"):
                await pool.map(tasks.square, range(10))
            script.submit_error = None
            assert await pool.run(tasks.square, 3) == 9


async def test_a_send_that_fails_after_the_rung_took_its_chunk_keeps_the_books(
        monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # The rung took the chunk, then its send raised: the chunk is the engine's to
    # settle like any other (it was missing from the chunks in flight, which a close
    # waits for, while it held the rung's slot).
    script = Script(submit_error=RuntimeError("the send broke"), submit_error_late=True,
                    holding=True)
    with fake_rungs(monkeypatch, process=script):
        async with ResilientPool(max_workers=2, **FAST) as pool:
            with anyio.fail_after(10), pytest.raises(RuntimeError, match="the send broke"):
                await pool.run(tasks.square, 3)
            assert pool.statistics().chunks_in_flight == 1
            script.submit_error = None
            script.release()
            await wait_until(lambda: pool.statistics().chunks_in_flight == 0)
            assert await pool.map(tasks.square, range(10)) == [i * i for i in range(10)]
            assert pool.statistics().chunks_in_flight == 0


async def test_falls_back_and_climbs_back_with_events(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      anyio_backend: str) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncpool")
    events: list[PoolEvent] = []

    def hook(event: PoolEvent) -> None:
        events.append(event)
        raise RuntimeError("a broken hook must not break the pool")

    process, thread = Script(failing_starts=4), Script(failing_starts=2)
    with fake_rungs(monkeypatch, process=process, thread=thread):
        async with ResilientPool(max_workers=2, creation_attempts=2, on_event=hook,
                                 **FAST) as pool:
            # process: 2 failures, thread: 2 failures, so inline serves.
            assert pool.backend == "inline"
            assert await pool.map(tasks.square, range(20)) == [i * i for i in range(20)]
            # The promoter tries the higher rungs again and climbs when one starts.
            await wait_until(lambda: pool.backend == "process")
            assert await pool.map(tasks.square, range(50)) == [i * i for i in range(50)]
            stats = pool.statistics()
            assert stats.fallbacks == 2 and stats.promotions >= 1
    kinds = {e.kind for e in events}
    assert {"creation_failed", "fallback", "promotion"} <= kinds, kinds
    records = {(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records}
    assert ("WARNING", "fallback") in records and ("INFO", "promotion") in records
    assert any("on_event hook raised" in r.getMessage() for r in caplog.records)


async def test_a_failed_climb_is_one_event(monkeypatch: pytest.MonkeyPatch,
                                           anyio_backend: str) -> None:
    # Climbing back to a rung whose start failed for good said so twice.
    events: list[PoolEvent] = []
    process = Script(failing_starts=2)
    with fake_rungs(monkeypatch, process=process, thread=Script()):
        async with ResilientPool(max_workers=2, creation_attempts=2, on_event=events.append,
                                 **FAST) as pool:
            assert pool.backend == "thread"
            error = process.start_error = ValueError("not a machine's shortage")
            await wait_until(lambda: process.starts >= 4)
    said = [e for e in events
            if e.kind == "creation_failed" and e.details.get("error") is error]
    assert len(said) == process.starts - 2, [e.message for e in said]


async def test_a_non_transient_start_error_is_raised(monkeypatch: pytest.MonkeyPatch,
                                                     anyio_backend: str) -> None:
    with fake_rungs(monkeypatch, process=Script(start_error=InitializerFailed("no"))):
        with pytest.raises(InitializerFailed):
            async with ResilientPool(max_workers=2):
                pass


async def test_promotion_loses_and_duplicates_nothing(monkeypatch: pytest.MonkeyPatch,
                                                      anyio_backend: str) -> None:
    # Work in flight while the pool climbs comes back exactly once each.
    process = Script(failing_starts=1)
    with fake_rungs(monkeypatch, process=process):
        async with ResilientPool(max_workers=2, creation_attempts=1, chunk_size=5,
                                 rungs=("process", "inline"), **FAST) as pool:
            assert pool.backend == "inline"
            seen = [y async for y in pool.imap(tasks.burn, [0.0005] * 400, ordered=False)]
            assert len(seen) == 400
            await wait_until(lambda: pool.backend == "process")
            assert await pool.map(tasks.square, range(3000)) == [i * i for i in range(3000)]


async def test_a_rung_that_stops_serving_is_replaced(monkeypatch: pytest.MonkeyPatch,
                                                     anyio_backend: str) -> None:
    process = Script(holding=True)
    with fake_rungs(monkeypatch, process=process):
        async with ResilientPool(max_workers=2, chunk_size=10, rungs=("process", "inline"),
                                 **FAST) as pool:
            outcome: list[list[int]] = []

            async def mapper() -> None:
                outcome.append(await pool.map(tasks.square, range(100)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(mapper)
                await wait_until(lambda: bool(process.rungs[0].held))
                rung = process.rungs[0]
                # The rung breaks (as a lost cluster does): what it held goes elsewhere.
                # (Not held again: the pool may climb back to a new process rung before
                # the inline one is done, and a loaded machine hung there for good.)
                process.holding = False
                rung.crash()
                rung.kill(list(rung.held))
                rung.listener.rung_changed()
            assert outcome == [[i * i for i in range(100)]]


async def test_a_rungs_life_only_goes_forward(monkeypatch: pytest.MonkeyPatch,
                                             anyio_backend: str) -> None:
    # A rung that crashed says why in the fallback; a closed one stays closed (a late
    # fault once made a closed rung "crashed" again).
    process = Script()
    events: list[PoolEvent] = []
    with fake_rungs(monkeypatch, process=process):
        async with ResilientPool(max_workers=2, rungs=("process", "inline"),
                                 on_event=events.append, **FAST) as pool:
            await pool.run(tasks.square, 3)
            first = process.rungs[0]
            first.crash(RuntimeError("the cluster went away"))
            first.listener.rung_changed()
            assert await pool.run(tasks.square, 4) == 16
            falls = [e.message for e in events if e.kind == "fallback"]
            assert falls == ["the process rung stopped serving (the cluster went away); "
                             "falling back to the inline rung"], falls
            await wait_until(lambda: first.state is RungState.CLOSED)
            first.crash(RuntimeError("too late"))
            assert first.state is RungState.CLOSED
            assert str(first.failure) == "the cluster went away"


async def test_no_thread_at_all_still_serves_on_processes(thread_starts: ThreadStarts,
                                                          anyio_backend: str) -> None:
    # Worker processes are forked by the fork server and read by the loop: the
    # process rung starts no thread, so a machine out of threads does not stop it.
    thread_starts.blocked = True
    async with ResilientPool(max_workers=2) as pool:
        assert pool.backend == "process"
        assert await pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
    assert thread_starts.count == 0


async def test_no_thread_runs_inline_and_climbs_back_to_threads(
        thread_starts: ThreadStarts, anyio_backend: str) -> None:
    thread_starts.blocked = True
    async with ResilientPool(max_workers=2, rungs=("thread", "inline"), creation_attempts=2,
                             **FAST) as pool:
        assert pool.backend == "inline"
        assert await pool.map(tasks.square, range(20)) == [i * i for i in range(20)]
        thread_starts.blocked = False
        await wait_until(lambda: pool.backend == "thread")
        names = set(await pool.map(tasks.thread_name, range(50), chunk_size=1))
        assert all(name.startswith("asyncpool-thread-") for name in names)


async def test_a_rung_the_platform_cannot_run_is_skipped_for_good(
        monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    from asyncpool._retry import RungUnsupported

    process = Script(start_error=RungUnsupported("no fork on this platform"))
    events: list[PoolEvent] = []
    with fake_rungs(monkeypatch, process=process):
        async with ResilientPool(max_workers=2, rungs=("process", "thread"),
                                 on_event=events.append, **FAST) as pool:
            assert pool.backend == "thread"
            # Said as it is (it said "could not start after 3 attempt(s)", after one).
            assert [e.message for e in events if e.kind == "fallback"] == [
                "the process rung cannot run here; falling back to the thread rung"]
            # Not a wait for something to happen: a window in which the promoter (every
            # 10-50 ms here) would have tried the process rung again, had it been allowed.
            await anyio.sleep(0.2)
            assert process.starts == 1 and pool.backend == "thread"
            assert pool.statistics().fallbacks == 1


async def test_no_rung_is_started_for_calls_that_ended(monkeypatch: pytest.MonkeyPatch,
                                                       anyio_backend: str) -> None:
    # A call that failed because no rung could start stayed queued, and the ladder
    # went on starting rungs for it, one after another, with nobody waiting.
    process = Script()
    with fake_rungs(monkeypatch, process=process):
        async with ResilientPool(max_workers=2, rungs=("process",), creation_attempts=2,
                                 **FAST) as pool:
            assert await pool.map(tasks.square, range(3)) == [0, 1, 4]
            process.failing_starts = 10**9
            rung = process.rungs[0]
            rung.crash()  # as a lost cluster does
            rung.listener.rung_changed()
            with pytest.raises(PoolUnavailable) as raised:
                await pool.map(tasks.square, range(3), timeout=5)
            assert isinstance(raised.value.__cause__, BlockingIOError)
            starts = process.starts
            # Not a wait for something to happen: a window in which the ladder (backing
            # off 1-10 ms here) would have started rungs again, had it been asked.
            await anyio.sleep(0.2)
            assert process.starts == starts


async def test_warm_start_rides_out_a_thread_shortage(thread_starts: ThreadStarts,
                                                      anyio_backend: str) -> None:
    # Warm start opened threads once, without the ladder's retries or fallback: a
    # machine out of threads failed the open instead of serving on processes.
    thread_starts.blocked = True
    async with ResilientPool(max_workers=2, warm_start=True, **FAST) as pool:
        assert pool.backend == "process"
        assert await pool.map(tasks.square, range(10)) == [i * i for i in range(10)]
        assert pool.statistics().creation_failures >= 1



@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_thread_rung_whose_threads_all_hang_on_stopped_items_steps_down(
        backend: str) -> None:
    # Its only thread ran a timed-out call's item and no thread could start in its
    # place: the rung kept serving, and took chunks no thread would run until that
    # item ended (for good, for a hung one).
    proc = run_script("_threads_all_stuck.py", backend, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[0,", "1,", "4]", "inline"], proc.stdout
