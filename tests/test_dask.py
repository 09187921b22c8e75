"""The dask rung on a real LocalCluster (2 worker processes on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncpool import (DeadlineExceeded, InitializerFailed, ResilientPool, SerializationError,
                       WorkerCrashed)

from . import tasks
from .helpers import free_port, run_code, wait_for, wait_until

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
import dask  # noqa: E402  (installed with distributed)

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.asyncio_only]


@pytest.fixture
async def cluster() -> AsyncIterator[Any]:
    async with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None,
                                        asynchronous=True) as c:
        yield c
        # A worker a test killed may be restarting under its nanny: closing the cluster
        # then trips distributed itself ("can only join a started process").
        async with distributed.Client(c, asynchronous=True, set_as_default=False) as client:
            with contextlib.suppress(Exception):
                await client.wait_for_workers(2, timeout=30)


async def test_map_on_the_cluster(cluster: Any, tmp_path: Path) -> None:
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        assert pool.backend == "dask"
        assert await pool.map(tasks.square, range(5000)) == [i * i for i in range(5000)]
        assert await pool.run(tasks.add, 2, 5) == 7
        got = [y async for y in pool.imap(tasks.square, (i for i in range(300)), ordered=False)]
        assert sorted(got) == [i * i for i in range(300)]
        # A worker killed mid-map: Dask recomputes, nothing is lost.
        marker = str(tmp_path / "killed")
        items = [(i, marker) for i in range(400)]
        assert await pool.map(tasks.kill_self_once, items, chunk_size=10) == [
            i * i for i in range(400)]
        assert Path(marker).exists()
        assert pool.backend == "dask"
        # Big results (out of band on the local wire) and buffers as writable as they left.
        assert await pool.run(tasks.make_bytes, 1 << 20) == b"x" * (1 << 20)
        assert await pool.map(tasks.make_bytearray, [10, 100_000]) == [
            bytearray(b"x" * 10), bytearray(b"x" * 100_000)]
        grids = await pool.map(tasks.make_grid, [(100_000, True), (100_000, False)])
        assert [g.writable for g in grids] == [True, False]
        # The pool's client is its own: the application's default client is untouched.
        with pytest.raises(ValueError):
            distributed.default_client()


async def test_a_slow_imap_consumer_holds_a_bounded_window_on_the_cluster(
        cluster: Any) -> None:
    # The results' bytes were never counted on the Dask rung: a paused stream of 5 MB
    # results held 200 to 600 MB (the local rungs about 40), chunks sent on and on.
    size = 4 << 20
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        assert pool.backend == "dask"
        async with pool.imap(tasks.make_bytes, [size] * 120) as results:
            assert len(await results.__anext__()) == size
            # Paused: what it finishes levels off at the window (32 MB, 8 results,
            # and what was out when that was known), far from every item.
            settled, last = time.monotonic(), -1
            while time.monotonic() - settled < 1.5:
                done = pool.statistics().tasks_completed
                if done != last:
                    settled, last = time.monotonic(), done
                await anyio.sleep(0.1)
            assert last <= 40, last
            got = 1 + sum([len(y) == size async for y in results])
        assert got == 120


async def test_two_main_scripts_on_one_cluster_keep_their_globals_apart(
        cluster: Any) -> None:
    # Both define TABLE and helper: a Dask worker kept one namespace for every main
    # script it ever served, and the second program ran the first one's helper.
    script = str(Path(__file__).with_name("_main_cluster.py"))
    for offsets in ([1000], [2000, 3000]):  # one after the other, then side by side
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, script, cluster.scheduler_address, str(offset),
            stdout=asyncio.subprocess.PIPE) for offset in offsets]
        outputs = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
        assert [out.strip() for out, _ in outputs] == [b"0"] * len(offsets)
        assert [p.returncode for p in procs] == [0] * len(offsets)


async def test_each_pool_has_its_own_globals_of_the_main_script(cluster: Any) -> None:
    # One namespace per client process: pool A's tasks saw pool B's initializer's value,
    # and a later pool with no initializer saw the last one's.
    script = str(Path(__file__).with_name("_main_initializers.py"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, cluster.scheduler_address, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    assert json.loads(out) == {"A": ["A"], "B": ["B"], "none": [None]}


async def test_an_argument_the_cluster_cannot_unpickle_fails_alone(cluster: Any) -> None:
    # Dask unpickled the chunk's items itself, and one that failed made every item of
    # the call a FunctionUnavailable, even with return_exceptions.
    items: list[object] = list(range(200))
    items[50] = tasks.Unloadable()
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        results = await pool.map(tasks.echo, items, return_exceptions=True)
        assert isinstance(results[50], SerializationError) and "item 50" in str(results[50])
        assert [r for i, r in enumerate(results) if i != 50] == [
            i for i in range(200) if i != 50]
        assert pool.backend == "dask"


async def test_a_result_the_cluster_cannot_send_back_is_its_items_error(
        cluster: Any) -> None:
    # On the cluster it came back as the note that stands for it, delivered as the
    # item's result, with no error at all.
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        results = await pool.map(tasks.lock_at_five, range(10), return_exceptions=True)
        assert isinstance(results[5], SerializationError) and "lock" in str(results[5])
        assert [r for i, r in enumerate(results) if i != 5] == [
            i for i in range(10) if i != 5]
        with pytest.raises(SerializationError, match="item 0: .*lock"):
            await pool.run(tasks.lock_at_five, 5)
        assert pool.backend == "dask"


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
async def test_a_stopped_calls_items_not_started_do_not_run_on_the_cluster(
        stop: str, cluster: Any, tmp_path: Path) -> None:
    # Dask cannot stop a task that runs, and each task runs a chunk: its items that had
    # not started ran on for seconds after the call was gone (476 of 2,000 in a trial).
    items = [(str(tmp_path), i, 0.02) for i in range(400)]
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        with anyio.move_on_after(0.5) if stop == "cancel" else contextlib.nullcontext():
            with contextlib.suppress(DeadlineExceeded):
                await pool.map(tasks.note_then_nap, items, chunk_size=200,
                               **({"timeout": 0.5} if stop == "deadline" else {}))
        stopped = len(list(tmp_path.iterdir()))
        await anyio.sleep(1.0)  # not a wait: a window in which they would have run
        assert len(list(tmp_path.iterdir())) - stopped <= 6
        assert await pool.map(tasks.square, range(10)) == [i * i for i in range(10)]


def _clients(dask_scheduler: Any = None) -> int:
    return len(dask_scheduler.clients)


async def test_a_pool_dropped_unclosed_closes_its_client(cluster: Any) -> None:
    # Its workers were killed, but its client stayed connected, and warned at exit
    # ("coroutine 'Client._close' was never awaited").
    async with distributed.Client(cluster, asynchronous=True,
                                  set_as_default=False) as client:
        before = await client.run_on_scheduler(_clients)

        async def open_and_drop() -> None:
            pool = ResilientPool(max_workers=2, dask_address=cluster.scheduler_address)
            await pool.__aenter__()
            assert await pool.map(tasks.square, range(3)) == [0, 1, 4]
            assert await client.run_on_scheduler(_clients) == before + 1

        await open_and_drop()
        gc.collect()

        async def closed() -> bool:
            return bool(await client.run_on_scheduler(_clients) == before)
        await wait_for(closed)


async def test_the_only_worker_dying_is_a_crash_not_a_lost_scheduler(tmp_path: Path) -> None:
    # The cluster's one worker dies with everything it held (the function's pickle too)
    # and its nanny starts another: the call goes on there, on the cluster.
    async with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None,
                                        asynchronous=True) as one:
        async with ResilientPool(max_workers=1, dask_address=one.scheduler_address,
                                 promote_after=60) as pool:
            marker = str(tmp_path / "killed")
            items = [(i, marker) for i in range(200)]
            assert await pool.map(tasks.kill_self_once, items, chunk_size=10) == [
                i * i for i in range(200)]
            assert Path(marker).exists()
            assert pool.backend == "dask" and pool.statistics().fallbacks == 0
            assert await pool.run(tasks.add, 1, 2) == 3
            # A function big enough to be scattered once: it dies with the worker
            # that held it, and is scattered again.
            table = b"t" * (2 << 20)
            fn = functools.partial(tasks.with_table, table)
            marker = str(tmp_path / "killed-again")
            items = [(i, marker) for i in range(100)]
            assert await pool.map(fn, items, chunk_size=10) == [
                i * i + len(table) for i in range(100)]
            assert Path(marker).exists()
            assert pool.backend == "dask" and pool.statistics().fallbacks == 0


async def test_existing_client_and_poison_item(cluster: Any) -> None:
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        async with distributed.Client(cluster, asynchronous=True) as client:
            # One item at a time: with allowed-failures=0 Dask reports KilledWorker for
            # every task queued on a dying worker, so a neighbour of the poison would be
            # blamed too; alone, only the poison item is.
            async with ResilientPool(max_workers=2, dask_client=client,
                                     max_chunks_in_flight=1) as pool:
                items = [(i, 5) for i in range(8)]
                results = await pool.map(tasks.exit_on, items, chunk_size=1,
                                         return_exceptions=True)
                assert isinstance(results[5], WorkerCrashed) and "item 5" in str(results[5])
                assert [r for i, r in enumerate(results) if i != 5] == [0, 1, 2, 3, 4, 6, 7]
            assert client.status == "running"  # not ours to close


async def test_unreachable_scheduler_falls_back_within_timeout() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with ResilientPool(max_workers=2, dask_address=address,
                             dask_connect_timeout=2.0, promote_after=60) as pool:
        took = time.monotonic() - started
        assert pool.backend == "process"
        assert await pool.map(tasks.square, range(100)) == [i * i for i in range(100)]
        stats = pool.statistics()
        assert stats.fallbacks == 1 and stats.creation_failures == 1
    # The connect timeout bounds the cost; 10x margin for a loaded machine.
    assert took < 20, took
    # Refused at once, it does not wait for the timeout (the client retries until it).
    started = time.monotonic()
    async with ResilientPool(max_workers=2, dask_address=address,
                             dask_connect_timeout=60.0, promote_after=60) as pool:
        assert pool.backend == "process"
    assert time.monotonic() - started < 30


async def test_climbs_back_to_the_cluster() -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    async with ResilientPool(max_workers=2, dask_address=address, dask_connect_timeout=1.0,
                             promote_after=0.2, promote_max=1.0) as pool:
        assert pool.backend == "process"
        async with distributed.LocalCluster(n_workers=1, processes=True, host="127.0.0.1",
                                            scheduler_port=port, dashboard_address=None,
                                            asynchronous=True):
            await wait_until(lambda: pool.backend == "dask", 60)
            assert await pool.map(tasks.square, range(50)) == [i * i for i in range(50)]


async def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch,
                                      ) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"\[dask\]"):
        async with ResilientPool(max_workers=1, dask_address="tcp://127.0.0.1:1"):
            pass


async def test_a_failed_initializer_marks_only_its_own_worker(tmp_path: Path) -> None:
    # Workers that share a process (threads of one LocalCluster) shared the mark of a
    # joined worker whose initializer failed: tasks on the healthy worker failed too.
    refuse = tmp_path / "refuse"
    async with distributed.LocalCluster(n_workers=1, threads_per_worker=1,
                                        processes=False, dashboard_address=None,
                                        worker_dashboard_address=None,
                                        asynchronous=True) as cluster:
        async with ResilientPool(max_workers=1, dask_address=cluster.scheduler_address,
                                 initializer=tasks.remember_unless,
                                 initargs=("dask", str(refuse))) as pool:
            assert pool.backend == "dask"
            [healthy] = cluster.scheduler.workers
            refuse.touch()
            cluster.scale(2)
            await cluster
            await wait_until(lambda: len(cluster.scheduler.workers) == 2, timeout=30)
            [joined] = set(cluster.scheduler.workers) - {healthy}
            good = await pool.map(tasks.recall, range(6), chunk_size=1, workers=[healthy],
                                  allow_other_workers=False)
            assert {tag for tag, _, _ in good} == {"dask"}
            bad = await pool.map(tasks.recall, range(6), chunk_size=1, workers=[joined],
                                 allow_other_workers=False, return_exceptions=True)
            assert all(isinstance(r, InitializerFailed) for r in bad), bad


async def test_calls_waiting_for_workers_no_one_has_hold_back_no_other_call(
        cluster: Any) -> None:
    # Their chunks, never answered, filled the rung's room (two per worker thread), and
    # one of a function held back its every later call (a chunk out unmeasured): a
    # plain call on an idle cluster waited out its deadline.
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        assert pool.backend == "dask"
        other = functools.partial(tasks.fail_on, bad=-1)
        ran = []

        async def waits(fn: Any, placed: dict[str, Any]) -> None:
            ran.append(await pool.map(fn, range(10), **placed))

        async with anyio.create_task_group() as tg:
            for fn in (tasks.square, tasks.square, other, other):
                for placed in ({"resources": {"GPU": 1}}, {"workers": ["tcp://10.9.9.9:1"]}):
                    tg.start_soon(waits, fn, placed)
            await wait_until(lambda: pool.statistics().chunks_in_flight >= 8, timeout=20)
            with anyio.fail_after(20):
                assert await pool.run(tasks.square, 7) == 49
                assert await pool.map(tasks.square, range(300)) == [i * i for i in range(300)]
                assert await pool.run(other, 2) == 2
            assert pool.backend == "dask" and not ran
            tg.cancel_scope.cancel()


async def test_an_initializer_on_the_cluster_leaves_cloudpickle_as_it_was(
        cluster: Any) -> None:
    # Its sweep of gone pools' plugins was registered to go by value, for good: from
    # then on, every main-script function this process shipped was pickled anew on
    # each call (and another library's pickles changed).
    import cloudpickle

    from asyncpool._functions import FunctionBook

    before = set(cloudpickle.list_registry_pickle_by_value())
    async with ResilientPool(max_workers=1, dask_address=cluster.scheduler_address,
                             initializer=tasks.remember, initargs=("on the cluster",)) as pool:
        assert pool.backend == "dask"
        assert (await pool.run(tasks.recall))[0] == "on the cluster"
    assert set(cloudpickle.list_registry_pickle_by_value()) == before
    space: dict[str, Any] = {"__name__": "__main__"}
    exec("def work(x):\n    return x\n", space)  # noqa: S102 - a script's function
    assert FunctionBook().ship(space["work"]).kept


async def test_a_call_of_higher_priority_goes_first_on_the_cluster(cluster: Any) -> None:
    # Passed to Dask only, it did nothing: the pool keeps a few chunks on the cluster,
    # and the rest of both calls waited in the pool, served in turn.
    async with ResilientPool(max_workers=2, dask_address=cluster.scheduler_address) as pool:
        assert pool.backend == "dask"
        await pool.map(tasks.nap, [0.01] * 10)
        finished: list[str] = []

        async def call(name: str, priority: int) -> None:
            await pool.map(tasks.nap, [0.02] * 150, priority=priority)
            finished.append(name)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "low", -100)
                await wait_until(lambda: pool.statistics().tasks_completed > 20, timeout=20)
                tg.start_soon(call, "high", 100)
        assert finished == ["high", "low"]


_LEFT_OPEN = """
import asyncio, sys
from asyncpool import ResilientPool
from tests import tasks

async def main():
    pool = ResilientPool(max_workers=1, dask_address=sys.argv[1])
    await pool.__aenter__()
    assert pool.backend == "dask"
    print(await pool.run(tasks.square, 3))
    if sys.argv[2] == "running":
        asyncio.ensure_future(pool.map(tasks.nap, [0.2] * 20))
        await asyncio.sleep(0.3)

asyncio.run(main())
"""


@pytest.mark.parametrize("left", ["idle", "running"])
async def test_a_program_ending_with_a_pool_open_on_the_cluster_exits_clean(
        cluster: Any, left: str) -> None:
    # Its client's close was left to the garbage collector: "coroutine 'Client._close'
    # was never awaited". (With a map running, distributed may still log a cancel it
    # could not send as asyncio.run ends its tasks.)
    with anyio.fail_after(60):
        out = await anyio.to_thread.run_sync(functools.partial(
            run_code, _LEFT_OPEN, cluster.scheduler_address, left))
    assert out.returncode == 0 and out.stdout.split() == ["9"], out.stderr
    assert "never awaited" not in out.stderr, out.stderr
    if left == "idle":
        assert " ERROR " not in out.stderr, out.stderr


def test_the_dask_rung_needs_asyncio() -> None:
    import anyio

    async def main() -> None:
        async with ResilientPool(max_workers=1, dask_address="tcp://127.0.0.1:1"):
            pass

    with pytest.raises(NotImplementedError, match="asyncio only"):
        anyio.run(main, backend="trio")


async def test_calls_cancelled_as_their_task_is_sent_leave_no_slot_taken(cluster: Any) -> None:
    # A call cancelled one loop turn after it was made cancelled its chunk's relay
    # before that ran: the slot stayed taken, and after a few the pool served nothing.
    async with distributed.Client(cluster, asynchronous=True) as client, ResilientPool(
            max_workers=2, dask_client=client) as pool:
        assert pool.backend == "dask"
        for turns in [1, 1, 2, 1, 1, 1, 0, 1]:
            call = asyncio.ensure_future(pool.run(tasks.nap, 0.2))
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await wait_until(lambda: pool.statistics().chunks_in_flight == 0)
        assert await asyncio.wait_for(pool.run(tasks.square, 3), 15) == 9


async def test_kill_on_timeout_on_the_cluster_says_the_task_runs_on(
        cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Dask cannot stop a running task: the pool said nothing, as if it had.
    async with distributed.Client(cluster, asynchronous=True) as client, ResilientPool(
            max_workers=2, dask_client=client) as pool:
        with pytest.raises(TimeoutError):
            await pool.run(tasks.nap, 2.0, timeout=0.5, kill_on_timeout=True)
        assert any("cannot stop running tasks" in r.getMessage() for r in caplog.records)
        await wait_until(lambda: pool.statistics().chunks_in_flight == 0)


async def test_results_of_many_small_objects_load_off_the_loop_on_the_cluster(
        cluster: Any) -> None:
    # A chunk's results came back from the cluster as one pickle, loaded on the loop
    # (as on the local rungs before): 1.5 million small dicts held it about 0.32 s.
    import pickle

    from .helpers import Heartbeat

    data = pickle.dumps(tasks.many_records(1_500_000), 5)
    on_loop = Heartbeat()
    heartbeat = Heartbeat()
    gc.collect()
    # The collector's own pauses are not the pool's: a full collection over the 1.5
    # million dicts, in whatever callback it fell, held the loop 0.25 s (1 run in 4).
    gc.disable()
    try:
        async with on_loop.running():
            await anyio.sleep(0.02)
            pickle.loads(data)
        del data
        async with ResilientPool(max_workers=1, dask_address=cluster.scheduler_address) as pool:
            assert await pool.run(tasks.square, 3) == 9 and pool.backend == "dask"
            async with heartbeat.running():
                records = await pool.run(tasks.many_records, 1_500_000)
            assert len(records) == 1_500_000 and records[-1] == {"id": 1_499_999,
                                                                  "name": "1499999"}
            del records
    finally:
        gc.enable()
    assert heartbeat.worst < on_loop.worst / 2, (heartbeat.worst, on_loop.worst)
