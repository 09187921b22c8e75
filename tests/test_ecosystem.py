"""Rate limits, progress, events and logs, trio and uvloop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from asyncpool import DeadlineExceeded, PoolEvent, ResilientPool

from . import tasks
from .test_ladder import ThreadStarts, thread_starts  # noqa: F401  (fixture)


def _stamp(_: object) -> float:
    return time.monotonic()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["pool", "call"])
async def test_rate_limit(where: str) -> None:
    rate = 20
    pool_opts = {"rate_limit": rate} if where == "pool" else {}
    call_opts = {"rate_limit": rate} if where == "call" else {}
    async with ResilientPool(max_workers=2, rungs=("thread",), **pool_opts) as pool:
        stamps = sorted(await pool.map(_stamp, range(30), **call_opts))
    # Outcome, not duration: no one-second window saw more than rate + 1 starts.
    for i, first in enumerate(stamps):
        in_window = sum(1 for s in stamps[i:] if s - first < 1.0)
        assert in_window <= rate + 1, (i, in_window)


@pytest.mark.asyncio
async def test_progress_callback_reports_every_item() -> None:
    calls: list[tuple[int, int | None]] = []
    async with ResilientPool(max_workers=2) as pool:
        await pool.map(tasks.square, range(500), progress=lambda d, t: calls.append((d, t)))
        assert calls[-1] == (500, 500)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
        calls.clear()
        async for _ in pool.imap(tasks.square, (i for i in range(300)),
                                 progress=lambda d, t: calls.append((d, t))):
            pass
        assert calls[-1] == (300, None)


@pytest.mark.asyncio
async def test_progress_bar_and_missing_tqdm(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    async with ResilientPool(max_workers=1, rungs=("inline",)) as pool:
        assert await pool.map(tasks.square, range(10), progress=True) == [
            i * i for i in range(10)]
        assert "10/10" in capsys.readouterr().err
        # Simulate an install without the extra: importing tqdm fails.
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
        with pytest.raises(ImportError, match=r"asyncpool\[progress\]"):
            await pool.map(tasks.square, range(3), progress=True)


@pytest.mark.asyncio
async def test_events_and_logs(thread_starts: ThreadStarts, tmp_path: Path,  # noqa: F811
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncpool")
    events: list[PoolEvent] = []

    def hook(event: PoolEvent) -> None:
        events.append(event)
        raise RuntimeError("a broken hook must not break the pool")

    thread_starts.blocked = True
    async with ResilientPool(max_workers=2, on_event=hook, backoff_initial=0.01,
                             creation_attempts=1, promote_after=0.05) as pool:
        thread_starts.blocked = False
        with anyio.fail_after(30):
            while pool.backend != "process":
                await anyio.sleep(0.02)
        marker = str(tmp_path / "killed")
        assert await pool.map(tasks.kill_self_once, [(i, marker) for i in range(40)]) == [
            i * i for i in range(40)]
        flaky = [(i, str(tmp_path / f"f{i}")) for i in range(2)]
        assert await pool.map(tasks.flaky_thread_start, flaky) == [0, 1]
        with pytest.raises(DeadlineExceeded):
            await pool.map(tasks.nap, [0.5] * 4, timeout=0.1, kill_on_timeout=True)
    kinds = {e.kind for e in events}
    assert {"creation_failed", "fallback", "promotion", "worker_crash", "resubmit",
            "task_retry", "deadline"} <= kinds, kinds
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].kind = "x"  # type: ignore[misc]
    records = {(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records}
    assert ("WARNING", "fallback") in records and ("INFO", "promotion") in records
    assert ("WARNING", "worker_crash") in records
    assert any("on_event hook raised" in r.getMessage() for r in caplog.records)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_same_code_on_asyncio_and_trio(anyio_backend: str, tmp_path: Path) -> None:
    async with ResilientPool(max_workers=2) as pool:
        assert await pool.run(tasks.add, 1, 2) == 3
        assert await pool.map(tasks.square, range(1000)) == [i * i for i in range(1000)]
        got = [y async for y in pool.imap(tasks.square, range(100), ordered=False)]
        assert sorted(got) == [i * i for i in range(100)]
        marker = str(tmp_path / "killed")
        assert await pool.map(tasks.kill_self_once, [(i, marker) for i in range(30)]) == [
            i * i for i in range(30)]
        with pytest.raises(DeadlineExceeded):
            await pool.map(tasks.nap, [2.0] * 2, timeout=0.2, kill_on_timeout=True)
        with anyio.move_on_after(0.2):
            await pool.map(tasks.nap, [2.0] * 2, cancel_running="kill")
        assert await pool.run(tasks.square, 5) == 25
    if anyio_backend == "trio":
        with pytest.raises(NotImplementedError, match="asyncio only"):
            async with ResilientPool(max_workers=1, rate_limit=5):
                pass


def test_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[int]:
        async with ResilientPool(max_workers=2) as pool:
            return await pool.map(tasks.square, range(2000))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [i * i for i in range(2000)]
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncpool-thread")]
