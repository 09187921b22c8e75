"""Worker processes: initialised once, recycled, kept under a memory ceiling, and a
cancelled call's waiting chunks never started."""

from __future__ import annotations

import collections
import contextlib
import logging
import functools
import gc
import itertools
import os
import threading
import signal
import socket
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from asyncpool import (DeadlineExceeded, InitializerFailed, PoolEvent, ResilientPool,
                       SerializationError, WorkerCrashed)

from . import tasks
from .helpers import alive, idle, run_code, wait_until

pytestmark = pytest.mark.anyio


async def test_initializer_runs_once_in_each_worker_and_each_replacement(
        tmp_path: Path, anyio_backend: str) -> None:
    async with ResilientPool(max_workers=2, initializer=tasks.remember,
                             initargs=("hello",)) as pool:
        seen = await pool.map(tasks.recall, range(200), chunk_size=1)
        assert {(tag, runs) for tag, runs, _ in seen} == {("hello", 1)}
        assert len({pid for *_, pid in seen}) == 2
        marker = str(tmp_path / "killed")
        await pool.map(tasks.kill_self_once, [(i, marker) for i in range(20)])
        seen = await pool.map(tasks.recall, range(200), chunk_size=1)
        assert {(tag, runs) for tag, runs, _ in seen} == {("hello", 1)}
        assert pool.statistics().worker_crashes == 1


@pytest.mark.parametrize("reuse_workers", [False, True])
async def test_workers_start_where_the_pool_opened_with_its_environment(
        reuse_workers: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        anyio_backend: str) -> None:
    # Workers forked from a fork server started by an earlier pool saw that pool's
    # directory and environment, the replacements of recycled workers included.
    async with ResilientPool(max_workers=1, reuse_workers=reuse_workers) as pool:
        assert await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_SETTING") == (
            os.getcwd(), None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASYNCPOOL_TEST_SETTING", "set since")
    async with ResilientPool(max_workers=1, max_tasks_per_worker=1,
                             reuse_workers=reuse_workers) as pool:
        for _ in range(2):  # the first worker, then its replacement
            assert await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_SETTING") == (
                str(tmp_path), "set since")
    monkeypatch.delenv("ASYNCPOOL_TEST_SETTING")
    async with ResilientPool(max_workers=1, reuse_workers=reuse_workers) as pool:
        assert await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_SETTING") == (
            str(tmp_path), None)


ODD_ENVIRONMENT = """
import ctypes, os, sys
if sys.argv[1:] == ["started"]:
    import asyncio
    from asyncpool import ResilientPool
    from tests import tasks

    async def main():
        async with ResilientPool(max_workers=1, rungs=("process",)) as pool:
            print(await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_SETTING"))
            print(await pool.run(tasks.local_zone))
    asyncio.run(main())
    sys.exit()
# Started by a program that put an entry with no name in the environment.
env = [f"{k}={v}".encode() for k, v in os.environ.items()]
env += [b"=odd", b"ASYNCPOOL_TEST_SETTING=kept", b"TZ=Asia/Tokyo"]
args = [sys.executable.encode(), b"-c", sys.argv[1].encode(), b"started"]
libc = ctypes.CDLL(None, use_errno=True)
libc.execve(args[0], (ctypes.c_char_p * 5)(*args, None),
            (ctypes.c_char_p * (len(env) + 1))(*env, None))
sys.exit(f"execve failed: {ctypes.get_errno()}")
"""


def test_workers_take_what_they_can_of_an_odd_environment() -> None:
    # An entry with no name stopped every worker as it started (the pool could not
    # open); TZ was in the workers' environment but local times were the fork
    # server's zone.
    done = run_code(ODD_ENVIRONMENT, ODD_ENVIRONMENT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("'kept')") and lines[1] == "JST", done.stdout


def test_a_forked_child_that_unwinds_its_loop_leaves_the_parents_pool_alone() -> None:
    # The child's copy of the loop read the parent's worker sockets, and removed their
    # watches from the epoll instance they share: the parent's map waited for good.
    # (asyncio: a child leaving its copy of a trio run removes the parent's watches in
    # trio itself.)
    import subprocess
    import sys

    script = str(Path(__file__).with_name("_fork_unwinds.py"))
    done = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "mapped 200 9\n", (done.stdout,
                                                                      done.stderr)


def test_workers_see_the_command_line_and_interpreter_options_of_their_pool() -> None:
    # Forked from the fork server, a worker had its command line ("-c" and a
    # descriptor) and none of the interpreter's options: an initializer that parsed
    # sys.argv failed ("unrecognized arguments: 7"), asserts ran under -O, and -W
    # filters were lost; the stdlib's spawned workers see all three.
    import json
    import subprocess
    import sys

    script = str(Path(__file__).with_name("_command_line.py"))
    done = subprocess.run([sys.executable, "-O", "-W", "error::DeprecationWarning", script,
                           "--config", "prod.toml"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    here = seen.pop("here")
    assert here == {"config": "prod.toml", "argv": ["--config", "prod.toml"], "optimize": 1,
                    "warnoptions": ["error::DeprecationWarning"], "asserts": False,
                    "warning": True}
    assert seen == {"process": here, "thread": here, "inline": here}


async def test_a_parked_worker_is_not_taken_in_a_directory_made_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # The parking key held the directory's path: a worker parked in one removed and
    # made again under the same name worked in the removed one (its files gone).
    place = tmp_path / "place"
    place.mkdir()
    monkeypatch.chdir(place)
    try:
        async with ResilientPool(max_workers=1, reuse_workers=True) as pool:
            await pool.run(tasks.square, 2)
        place.rmdir()
        place.mkdir()
        monkeypatch.chdir(place)
        async with ResilientPool(max_workers=1, reuse_workers=True) as pool:
            assert (await pool.run(tasks.where_am_i, "HOME"))[0] == str(place)
    finally:
        await ResilientPool.close_idle_workers()


async def test_a_parked_worker_is_taken_only_with_the_same_environment(
        monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # Parked workers are keyed by the environment they started with: one started with
    # another value would serve a pool opened after the change with the old one.
    monkeypatch.setenv("ASYNCPOOL_TEST_SETTING", "1")
    try:
        async with ResilientPool(max_workers=1, reuse_workers=True) as pool:
            await pool.run(tasks.square, 2)
        monkeypatch.setenv("ASYNCPOOL_TEST_SETTING", "2")
        async with ResilientPool(max_workers=1, reuse_workers=True) as pool:
            assert (await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_SETTING"))[1] == "2"
    finally:
        await ResilientPool.close_idle_workers()


async def test_workers_parked_under_settings_not_seen_again_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # A pool opened per job in a directory of its own parked its workers each time
    # (keyed by the directory), and none was ever stopped.
    bound = 2 * (os.cpu_count() or 1)
    pids: list[int] = []
    try:
        for job in range(bound + 2):
            place = tmp_path / f"job{job}"
            place.mkdir()
            monkeypatch.chdir(place)
            async with ResilientPool(max_workers=2, reuse_workers=True) as pool:
                pids += await pool.map(tasks.pid_of, range(2), chunk_size=1)
        await wait_until(lambda: sum(map(alive, set(pids))) <= bound)
        assert {p for p in pids[-2:]} <= {p for p in pids if alive(p)}  # the last parked
    finally:
        assert await ResilientPool.close_idle_workers() <= bound
    await wait_until(lambda: not any(map(alive, pids)))


async def test_a_removed_directory_starts_no_worker_in_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    # Workers of a pool opened in a removed directory worked in an earlier pool's
    # (the fork server's), reading and writing files there.
    gone = tmp_path / "gone"
    gone.mkdir()
    async with ResilientPool(max_workers=1) as pool:
        await pool.run(tasks.square, 1)  # a fork server runs, in another directory
    monkeypatch.chdir(gone)
    gone.rmdir()
    events: list[PoolEvent] = []
    async with ResilientPool(max_workers=1, creation_attempts=1, promote_after=60,
                             on_event=events.append) as pool:
        assert pool.backend == "thread"
        assert "the current directory was removed" in events[0].message


LONG_VARIABLE = """
import asyncio, os, sys
from asyncpool import ResilientPool
from tests import tasks

async def main():
    # Set as the program runs: one too long for exec and one just too long (with its
    # name, "=" and NUL); or many, each short enough, too long together.
    if sys.argv[1] == "one":
        os.environ["ASYNCPOOL_TEST_LONG"] = "x" * (200 << 10)
        os.environ["ASYNCPOOL_TEST_EDGE"] = "x" * ((1 << 17) - len("ASYNCPOOL_TEST_EDGE") - 1)
        names = ["ASYNCPOOL_TEST_LONG", "ASYNCPOOL_TEST_EDGE"]
    else:
        many = min(6 << 20, os.sysconf("SC_ARG_MAX")) // (100 << 10) + 2
        for n in range(many):
            os.environ[f"ASYNCPOOL_TEST_MANY_{n}"] = "x" * (100 << 10)
        names = ["ASYNCPOOL_TEST_MANY_0", f"ASYNCPOOL_TEST_MANY_{many - 1}"]
    async with ResilientPool(max_workers=1, creation_attempts=1) as pool:
        seen = [len((await pool.run(tasks.where_am_i, name))[1] or "") for name in names]
        print(pool.backend, seen == [len(os.environ[name]) for name in names])

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["one", "many"])
def test_a_variable_too_long_for_exec_starts_workers_all_the_same(how: str) -> None:
    # One variable over 128 KiB (or many, together over what exec takes) made starting
    # the fork server fail (E2BIG), and opening the pool raised it.
    proc = run_code(LONG_VARIABLE, how)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["process", "True"], (proc.stdout, proc.stderr)


LONG_PATH = """
import asyncio, sys
from asyncpool import ResilientPool
from tests import tasks
if sys.argv[1] == "one":
    sys.path.append("/nowhere/" + "x" * 140_000)
elif sys.argv[1] == "odd":  # not paths: imports skip them
    sys.path[:0] = [None, 3]
else:
    sys.path.extend(f"/nowhere/{n}/" + "x" * 110_000 for n in range(24))
mark = sys.path[-1]

async def main():
    async with ResilientPool(max_workers=1, creation_attempts=1) as pool:
        print(pool.backend, await pool.run(tasks.on_path, mark))

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["one", "many", "odd"])
def test_an_import_path_too_long_for_exec_starts_workers_all_the_same(how: str) -> None:
    # The fork server had the import path on its command line: an entry over 128 KiB,
    # or 2.6 MB of them, were more than exec takes (E2BIG): the pool served on threads.
    # An entry that is no path (None) failed the open.
    proc = run_code(LONG_PATH, how)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["process", "True"], (proc.stdout, proc.stderr)


INHERITED = """
import asyncio
from asyncpool import ResilientPool
from tests import tasks

async def main():
    async with ResilientPool(max_workers=1, creation_attempts=1, start_timeout=5) as pool:
        print(pool.backend, await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_59999"))

asyncio.run(main())
"""


def test_thousands_of_inherited_variables_start_workers_all_the_same() -> None:
    # The fork server was given at most 256 KiB of them; each worker then set the rest
    # again one by one, in time growing with the square of their number (60,000: more
    # than 5 s, and the pool fell back to threads).
    many = {f"ASYNCPOOL_TEST_{n}": "v" for n in range(60_000)}
    proc = run_code(INHERITED, env=many)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "process", (proc.stdout, proc.stderr)
    assert proc.stdout.split()[-1] == "'v')", proc.stdout


SMALL_STACK = """
import asyncio, resource
from asyncpool import ResilientPool
from tests import tasks

async def main():
    async with ResilientPool(max_workers=1, creation_attempts=1) as pool:
        print(pool.backend, await pool.run(tasks.where_am_i, "ASYNCPOOL_TEST_2999"))

resource.setrlimit(resource.RLIMIT_STACK, (160 << 10, resource.RLIM_INFINITY))
asyncio.run(main())
"""


def test_a_small_stack_and_many_variables_start_workers_all_the_same() -> None:
    # Under a stack of less than 512 KiB, exec takes 128 KiB of variables all the same:
    # given that much, the fork server had no stack left and crashed (the pool fell
    # back to threads). It is given a quarter of the stack.
    many = {f"ASYNCPOOL_TEST_{n}": "v" * 20 for n in range(3000)}
    proc = run_code(SMALL_STACK, env=many)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "process", (proc.stdout, proc.stderr)
    assert proc.stdout.split()[-1] == "'vvvvvvvvvvvvvvvvvvvv')", proc.stdout


NO_INTERPRETER = """
import asyncio, sys
from asyncpool import ResilientPool
from tests import tasks

sys.executable = sys.argv[1]  # gone: the fork server cannot start

async def main():
    events = []
    async with ResilientPool(max_workers=1, creation_attempts=1, promote_after=60,
                             on_event=events.append) as pool:
        print(pool.backend, await pool.run(tasks.square, 3))
    print(any("the fork server could not start" in e.message for e in events))

asyncio.run(main())
"""


def test_a_fork_server_that_cannot_start_makes_the_pool_step_down(tmp_path: Path) -> None:
    # An error other than a shortage (E2BIG, an interpreter gone) was raised by the
    # pool's open.
    proc = run_code(NO_INTERPRETER, str(tmp_path / "python"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["thread", "9", "True"], (proc.stdout, proc.stderr)


REMOVED_WHILE_SERVING = """
import asyncio, os, sys, tempfile
from asyncpool import ResilientPool
from tests import tasks

async def main():
    place = tempfile.mkdtemp()
    os.chdir(place)
    events = []
    async with ResilientPool(max_workers=2, max_tasks_per_worker=2, promote_after=0.2,
                             on_event=events.append) as pool:
        await pool.map(tasks.square, range(4), chunk_size=1)
        os.chdir(sys.argv[1])
        os.rmdir(place)
        assert await pool.map(tasks.square, range(20), chunk_size=1) == [
            i * i for i in range(20)]
        await asyncio.sleep(1)  # it tries to climb back meanwhile
    print(pool.statistics().backend, [e.message for e in events if e.kind == "fallback"])

asyncio.run(main())
"""


def test_workers_replaced_in_a_removed_directory_fail_without_a_traceback(
        tmp_path: Path) -> None:
    # Each replacement for a recycled worker started in the removed directory and
    # died printing a traceback to the application's standard error, several a second.
    proc = run_code(REMOVED_WHILE_SERVING, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "thread" in proc.stdout and "workers start in was removed" in proc.stdout, (
        proc.stdout)


@pytest.mark.parametrize("rungs", [("process",), ("thread",), ("inline",)])
async def test_a_failing_initializer_fails_the_open_at_once(rungs: tuple[str, ...],
                                                            anyio_backend: str) -> None:
    started = time.monotonic()
    with pytest.raises(InitializerFailed) as info:
        async with ResilientPool(max_workers=2, rungs=rungs,  # type: ignore[arg-type]
                                 initializer=tasks.refuse_to_start):
            pass
    assert isinstance(info.value.__cause__, LookupError)
    assert "refuses" in str(info.value)
    assert time.monotonic() - started < 5  # no respawn loop


@pytest.mark.parametrize("rungs", [("process",), ("thread",)])
async def test_an_initializer_that_hangs_fails_the_open_at_start_timeout(
        rungs: tuple[str, ...], anyio_backend: str, request: pytest.FixtureRequest) -> None:
    if rungs == ("process",):
        request.getfixturevalue("no_leaks")  # its workers are killed (threads cannot be)
    started = time.monotonic()
    with pytest.raises(InitializerFailed, match="did not return within"):
        async with ResilientPool(max_workers=2, rungs=rungs,  # type: ignore[arg-type]
                                 initializer=tasks.hang_forever, start_timeout=1.0):
            pass
    assert time.monotonic() - started < 10  # no retry, no fall back


@pytest.mark.parametrize("hang", [True, False])
async def test_replacements_whose_initializer_fails_end_the_call(
        hang: bool, tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # Workers recycled after 5 tasks are replaced by ones whose initializer hangs (or
    # raises): the replacements killed at start_timeout still counted as workers on
    # their way, so the pool tried forever and the call never returned.
    with anyio.fail_after(30):
        async with ResilientPool(max_workers=2, rungs=("process",), max_tasks_per_worker=5,
                                 initializer=tasks.start_then_fail,
                                 initargs=(str(tmp_path), 2, hang),
                                 start_timeout=1.0, creation_attempts=1) as pool:
            # What the initializer raised, not a start that timed out.
            with pytest.raises(InitializerFailed, match="did not return within" if hang
                               else "a replacement's initializer fails"):
                await pool.map(tasks.square, range(40), chunk_size=1)


async def test_replacements_whose_initializer_hangs_are_waited_for_once(
        tmp_path: Path, anyio_backend: str) -> None:
    # Each of creation_attempts tries waited start_timeout for it, and the rung was
    # then started again, waiting once more: with the default 60 s, calls learned of
    # the hang after 4 minutes, where opening the pool learns of it after one.
    async with ResilientPool(max_workers=2, rungs=("process",), max_tasks_per_worker=5,
                             initializer=tasks.start_then_fail,
                             initargs=(str(tmp_path), 2, True), start_timeout=2.0) as pool:
        started = time.monotonic()
        with pytest.raises(InitializerFailed, match="did not return within"):
            await pool.map(tasks.square, range(40), chunk_size=1, timeout=30)
        assert time.monotonic() - started < 2 * 2.0 + 1.0  # 8.5 s before


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "hangs"])
async def test_an_initializer_failing_in_replacements_never_runs_in_this_process(
        hang: bool, tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # The process rung gave up and the ladder stepped down to threads, which ran the
    # initializer here: one that crashed its workers (a segfault) killed the service.
    # One that hung in replacements was taken for workers slow to start, and ran here.
    why = "did not return within" if hang else "a replacement's initializer"
    with anyio.fail_after(60):
        async with ResilientPool(max_workers=2, max_tasks_per_worker=5,
                                 initializer=tasks.start_then_fail,
                                 initargs=(str(tmp_path), 2, hang), start_timeout=1.0,
                                 creation_attempts=1, promote_after=30) as pool:
            with pytest.raises(InitializerFailed, match=why):
                await pool.map(tasks.square, range(40), chunk_size=1)
            # Until the rung may be tried again, calls fail at once with its error, each
            # its own: one object raised to every caller grew a traceback of all their
            # frames (7,000 lines after 500 calls), holding their locals.
            seen = []
            for _ in range(50):
                with pytest.raises(InitializerFailed, match=why) as info:
                    await pool.run(tasks.square, 3)
                seen.append(info.value)
                assert len(traceback.extract_tb(info.value.__traceback__)) < 20
            assert len({id(error) for error in seen}) == 50
            assert isinstance(seen[-1].__cause__, None.__class__ if hang else LookupError)
            assert not (tmp_path / str(os.getpid())).exists()
            assert pool.statistics().fallbacks == 0 and pool.backend is None


async def test_a_worker_that_dies_while_another_starts_is_replaced_at_once(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # The supervisor waited for every replacement under way to start before it forked
    # the next: behind one slow initializer, a pool whose workers all died served
    # nothing for as long (and recycling started one worker at a time).
    async with ResilientPool(max_workers=2, initializer=tasks.slow_at_start,
                             initargs=(str(tmp_path), 3, 30.0)) as pool:
        first, second = sorted(set(await pool.map(tasks.nap_then_pid, [0.05] * 10,
                                                   chunk_size=1)))
        os.kill(first, signal.SIGKILL)  # its replacement, the third start, takes 30 s
        await wait_until(lambda: len(os.listdir(tmp_path)) == 3)
        os.kill(second, signal.SIGKILL)  # its replacement starts at once
        with anyio.fail_after(10):
            served_by = await pool.run(tasks.pid_of)
        assert served_by not in (first, second) and len(os.listdir(tmp_path)) == 4


async def test_an_initializer_raising_fails_the_open_while_another_hangs(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # The open waited for the hanging one until start_timeout, then said only that.
    started = time.monotonic()
    with pytest.raises(InitializerFailed, match="the first start fails"):
        async with ResilientPool(max_workers=2, rungs=("process",), start_timeout=30,
                                 initializer=tasks.raise_first_hang_next,
                                 initargs=(str(tmp_path),)):
            pass
    assert time.monotonic() - started < 10  # start_timeout (30 s) would show


async def test_the_last_worker_dying_after_failed_replacements_breaks_the_rung(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # Out of attempts while a worker served, then that worker died: the supervisor
    # waited for good (nothing forked, nothing starting), and so did every call.
    async with ResilientPool(max_workers=2, rungs=("process",), backoff_initial=0.3,
                             initializer=tasks.start_then_fail,
                             initargs=(str(tmp_path), 2, False)) as pool:
        first, second = sorted(set(await pool.map(tasks.nap_then_pid, [0.2] * 4,
                                                   chunk_size=1)))
        os.kill(second, signal.SIGKILL)  # its replacements fail
        await wait_until(lambda: len(os.listdir(tmp_path)) >= 2 + 3, timeout=20)
        os.kill(first, signal.SIGKILL)  # in the backoff after the third
        with anyio.fail_after(20), pytest.raises(InitializerFailed):
            await pool.map(tasks.square, range(4))


async def test_a_slow_replacement_is_awaited_while_the_others_fail(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # Replacements failing at once spent creation_attempts while the first one still
    # ran its (slow, working) initializer: the rung gave up and killed it.
    async with ResilientPool(max_workers=2, initializer=tasks.slow_then_failing,
                             initargs=(str(tmp_path), 1.0), rungs=("process",)) as pool:
        pids = set(await pool.map(tasks.nap_then_pid, [0.2] * 4, chunk_size=1))
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(20):
            assert await pool.map(tasks.square, range(10)) == [i * i for i in range(10)]
        assert pool.backend == "process"


async def test_awaiting_the_last_start_is_idle(tmp_path: Path, anyio_backend: str,
                                               no_leaks: None) -> None:
    # Out of attempts, the supervisor awaited the last slow start with a timeout of its
    # backoff, long past: it spun, a whole core, until that start ended.
    async with ResilientPool(max_workers=2, rungs=("process",), creation_attempts=2,
                             backoff_initial=0.05, initializer=tasks.slow_then_failing,
                             initargs=(str(tmp_path), 3.0)) as pool:
        pids = set(await pool.map(tasks.nap_then_pid, [0.2] * 4, chunk_size=1))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: len(os.listdir(tmp_path)) >= 5)  # the third start naps
        spent = time.process_time()
        await anyio.sleep(1.0)  # a window to measure, not a wait for something
        assert time.process_time() - spent < 0.5  # a spinning loop takes the whole second
        assert await pool.map(tasks.square, range(4)) == [0, 1, 4, 9]


async def test_a_worker_killed_as_the_pool_opens_is_replaced(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # Killed from outside in its initializer (the OOM killer, say) while the other
    # worker started: the open failed with InitializerFailed.
    killed: list[int] = []

    async def kill_one() -> None:
        await wait_until(lambda: len(os.listdir(tmp_path)) == 2)
        killed.append(int(min(os.listdir(tmp_path))))
        os.kill(killed[0], signal.SIGKILL)

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_one)
        async with ResilientPool(max_workers=2, initializer=tasks.note_and_nap,
                                 initargs=(str(tmp_path), 1.0)) as pool:
            pids = set(await pool.map(tasks.nap_then_pid, [0.01] * 10, chunk_size=1))
            assert killed and killed[0] not in pids
            await wait_until(lambda: pool.statistics().workers == 2)  # replaced


async def test_a_replacement_killed_in_its_initializer_is_replaced(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # Killed from outside (OOM killer, operator) while initialising: a crash to
    # replace, as any other, time after time while a worker lives. It was taken for a
    # failing initializer, and the pool fell back to threads although the initializer
    # had worked and a worker was alive.
    with anyio.fail_after(30):
        async with ResilientPool(max_workers=2, initializer=tasks.hang_at_start,
                                 initargs=(str(tmp_path), 2), backoff_initial=0.05) as pool:
            victim = next(iter(set(await pool.map(tasks.pid_of, range(20), chunk_size=1))))
            os.kill(victim, 9)
            for start in range(2, 2 + pool.config.creation_attempts):
                await wait_until(lambda n=start: len(os.listdir(tmp_path)) == n + 1)
                os.kill(int(next(tmp_path.glob(f"{start}-*")).name.split("-")[1]), 9)
            pids = await pool.map(tasks.nap_then_pid, [0.01] * 40, chunk_size=1)
            assert os.getpid() not in pids
            assert pool.backend == "process" and pool.statistics().fallbacks == 0
            await wait_until(lambda: len(os.listdir(tmp_path)) == 6)  # and replaced


async def test_a_live_worker_serves_while_replacements_initializer_raises(
        tmp_path: Path, anyio_backend: str, no_leaks: None) -> None:
    # A replacement's initializer that raised could give the process rung up at once
    # (1 run in 14, by the order its error and its exit were heard), beside a live
    # worker: the pool fell to threads, where it raised too, and calls failed.
    with anyio.fail_after(30):
        async with ResilientPool(max_workers=2, initializer=tasks.start_then_fail,
                                 initargs=(str(tmp_path), 2, False),
                                 backoff_initial=0.05) as pool:
            victim = next(iter(set(await pool.map(tasks.pid_of, range(20), chunk_size=1))))
            os.kill(victim, 9)
            tries = 2 + pool.config.creation_attempts
            await wait_until(lambda: len(os.listdir(tmp_path)) >= tries)
            pids = await pool.map(tasks.nap_then_pid, [0.01] * 20, chunk_size=1)
            assert os.getpid() not in pids and victim not in pids
            assert pool.backend == "process" and pool.statistics().fallbacks == 0


@pytest.mark.parametrize("rungs", [("process",), ("thread",), ("inline",)])
async def test_an_initializer_that_returns_a_coroutine_fails_the_open(
        rungs: tuple[str, ...], anyio_backend: str) -> None:
    # An async initializer behind a wrapper was accepted: workers warned "coroutine was
    # never awaited" and ran every task uninitialised.
    cached = functools.lru_cache(tasks.remember_later)  # pickles on no rung but these
    for initializer in (tasks.remember_later, *([cached] if rungs != ("process",) else [])):
        with pytest.raises(InitializerFailed, match="returned coroutine") as info:
            async with ResilientPool(max_workers=1, rungs=rungs,  # type: ignore[arg-type]
                                     initializer=initializer, initargs=("later",)):
                pass
        assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("initializer, initargs, match", [
    (tasks.exit_with, (1,), "raised on the event loop: SystemExit"),
    (tasks.nap, (0.3,), "did not return within start_timeout=0.1"),
    # These escaped as themselves: a CancelledError of its own ended asyncio.run.
    (tasks.raise_base, (2,), "raised on the event loop: KeyboardInterrupt"),
    (tasks.raise_base, (3,), "raised on the event loop: GeneratorExit"),
    (tasks.raise_base, (4,), "raised on the event loop: CancelledError"),
])
async def test_the_inline_initializer_fails_the_open_as_the_others_do(
        initializer: Any, initargs: tuple[Any, ...], match: str, anyio_backend: str) -> None:
    # A SystemExit from it escaped as itself, and one slower than start_timeout opened
    # the pool anyway.
    with pytest.raises(InitializerFailed, match=match):
        async with ResilientPool(rungs=("inline",), initializer=initializer,
                                 initargs=initargs, start_timeout=0.1):
            pass


async def test_an_initializer_that_exits_in_a_worker_says_it_did(
        anyio_backend: str) -> None:
    # Its SystemExit was told as "the task raised SystemExit(3)".
    with pytest.raises(InitializerFailed, match=r"the initializer raised SystemExit\(3\)"):
        async with ResilientPool(max_workers=1, rungs=("process",),
                                 initializer=tasks.exit_with, initargs=(1,)):
            pass


@pytest.mark.parametrize("rungs", [("thread",), ("inline",)])
async def test_initializer_on_threads_and_inline(rungs: tuple[str, ...],
                                                 anyio_backend: str) -> None:
    calls: list[int] = []
    async with ResilientPool(max_workers=2, rungs=rungs,  # type: ignore[arg-type]
                             initializer=lambda: calls.append(1)):
        pass
    assert len(calls) == (2 if rungs == ("thread",) else 1)


async def test_workers_are_recycled_after_max_tasks(caplog: pytest.LogCaptureFixture,
                                                   anyio_backend: str) -> None:
    caplog.set_level(logging.WARNING, logger="asyncpool")
    async with ResilientPool(max_workers=2, max_tasks_per_worker=100) as pool:
        # 30, not a divisor of 100: a worker's last chunk holds what it has left.
        pids = await pool.map(tasks.pid_of, range(1000), chunk_size=30)
        assert len(pids) == 1000 and len(set(pids)) >= 8
        assert all(pids.count(pid) <= 100 for pid in set(pids))
        assert pool.statistics().workers_recycled >= 8
        # Nothing ran again: a worker takes no chunk past its limit, and what waited
        # behind a leaving worker's last chunk had not started.
        stats = pool.statistics()
        assert stats.worker_crashes == 0 and stats.resubmitted_chunks == 0, stats
    # A worker leaving as told, or closed, is no fault (its end-of-file was taken for
    # one and said so at WARNING). Nor do a worker's results come for a chunk behind
    # one it handed back and had not yet said so (a race: rare here, see
    # test_units.test_a_worker_says_it_handed_chunks_back_before_it_reads_another).
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "connection" in m or "crash" in m
                or "head of its queue" in m], said


async def test_a_recycled_worker_s_replacement_is_ready_before_it_leaves(
        tmp_path: Path, anyio_backend: str) -> None:
    # The replacement was forked when the leaving worker took its last chunk: with an
    # initializer slower than that chunk, a call waited for the initializer at every
    # recycling (3 calls of 300 ms in 160 of 10 ms). It starts early enough now.
    # (A worker lives about 1 s, three times its start: its replacement is ready
    # some 0.3 s before it leaves. Load may stretch one start past that margin: what
    # is asserted is that each replacement began its start early, at least its start
    # time before its predecessor left, and that most were ready in time.)
    ready = tmp_path / "ready"
    async with ResilientPool(max_workers=1, max_tasks_per_worker=100,
                             initializer=tasks.note_ready,
                             initargs=(str(ready), 0.3)) as pool:
        ends = [await pool.run(tasks.nap_until, 0.01) for _ in range(250)]
    notes = [line.split() for line in ready.read_text().splitlines()]
    began = {int(pid): float(at) for pid, at, _ in notes}
    became_ready = {int(pid): float(at) for pid, _, at in notes}
    last_item = {pid: at for pid, at in ends}  # the last end of each worker's items
    order = list(dict.fromkeys(pid for pid, _ in ends))
    assert len(order) >= 3
    # Each ran its whole quota (one idle a moment between two calls was retired as
    # soon as its replacement was ready, after some 20 of its 50 items).
    counts = collections.Counter(pid for pid, _ in ends)
    assert [counts[pid] for pid in order[:2]] == [100, 100]
    pairs = list(itertools.pairwise(order))
    for leaving, successor in pairs:
        assert began[successor] < last_item[leaving] - 0.3, (leaving, successor)
    assert sum(became_ready[s] < last_item[leaving] for leaving, s in pairs) * 2 > len(pairs)


async def test_a_worker_and_its_replacement_never_run_at_once(
        tmp_path: Path, anyio_backend: str) -> None:
    # The replacement of a worker at max_tasks_per_worker took items while the leaving
    # worker still ran its last chunk: max_workers=1 ran two items at once.
    lock = str(tmp_path / "lock")
    async with ResilientPool(max_workers=1, max_tasks_per_worker=10) as pool:
        seen = [*await pool.map(tasks.alone, [lock] * 40, chunk_size=3),
                *await pool.map(tasks.alone, [lock] * 40)]
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(lambda: _append(seen, pool.run(tasks.alone, lock)))
    assert "overlap" not in seen and len(set(seen)) >= 12


async def _append(into: list[Any], result: Any) -> None:
    into.append(await result)


async def test_workers_stay_under_the_memory_ceiling(anyio_backend: str) -> None:
    ceiling = 200 << 20
    async with ResilientPool(max_workers=2, max_worker_memory=ceiling) as pool:
        seen = await pool.map(tasks.leak, [40] * 30, chunk_size=5)
        assert len(seen) == 30 and len({pid for pid, _ in seen}) >= 4
        # A worker passes the ceiling by at most one item's 40 MiB, then leaves (the
        # target: never above about 300 MiB).
        assert max(rss for _, rss in seen) < ceiling + (50 << 20)
        assert max(await pool.map(tasks.rss, range(20))) < ceiling
        # Nothing ran again: what waited behind a leaving worker's chunk had not started.
        stats = pool.statistics()
        assert stats.worker_crashes == 0 and stats.resubmitted_chunks == 0, stats


async def test_a_ceiling_below_what_the_initializer_holds_is_said_once(
        caplog: pytest.LogCaptureFixture, anyio_backend: str) -> None:
    # Every worker was replaced after its first chunk, silently (2,000 tiny items took
    # 25 s instead of 0.02).
    caplog.set_level(logging.WARNING, logger="asyncpool")
    async with ResilientPool(max_workers=2, max_worker_memory=60 << 20,
                             initializer=tasks.leak, initargs=(80,)) as pool:
        assert await pool.map(tasks.square, range(40), chunk_size=5) == [
            i * i for i in range(40)]
        assert pool.statistics().workers_recycled >= 2
    said = [r.getMessage() for r in caplog.records if "max_worker_memory" in r.getMessage()]
    assert len(said) == 1 and "once initialised" in said[0], said


@pytest.mark.parametrize("rung", ["process", "thread", "inline"])
@pytest.mark.parametrize("how", ["returns", "raises", "map_raises", "imap_raises",
                                 "times_out", "cancelled"])
async def test_a_calls_argument_leaves_with_it_without_the_cyclic_gc(
        how: str, rung: str, anyio_backend: str) -> None:
    # A failed call's error held the call (and its arguments) in a cycle through its
    # traceback until the cyclic GC ran: 40 failing calls of 12 MB grew a parent 300 MB.
    async def call(pool: ResilientPool) -> weakref.ref[tasks.Payload]:
        argument = tasks.Payload()
        with contextlib.suppress(ValueError, DeadlineExceeded):
            if how in ("returns", "raises"):
                fn = tasks.echo if how == "returns" else tasks.reject
                await pool.run(fn, argument)
            elif how == "map_raises":
                await pool.map(tasks.reject, [argument])
            elif how == "imap_raises":
                async for _ in pool.imap(tasks.reject, [argument]):
                    pass
            elif how == "times_out":
                await pool.run(tasks.slow_echo, argument, timeout=0.005)
            else:
                with anyio.move_on_after(0.005):
                    await pool.run(tasks.slow_echo, argument)
        return weakref.ref(argument)

    async with ResilientPool(max_workers=1, rungs=(rung,)) as pool:  # type: ignore[arg-type]
        await pool.run(tasks.square, 2)
        gc.collect()
        gc.disable()
        try:
            gone = await call(pool)
            await idle(pool)
            # A thread lets its chunk go a moment after it reported the end.
            await wait_until(lambda: gone() is None, 2)
        finally:
            gc.enable()


async def test_a_cancelled_calls_waiting_chunks_never_start(tmp_path: Path,
                                                            anyio_backend: str) -> None:
    log = tmp_path / "started"
    async with ResilientPool(max_workers=2, chunk_size=1) as pool:
        await pool.map(tasks.square, range(4))  # workers up
        items = [(i, str(log), 30.0) for i in range(8)]
        with anyio.move_on_after(0.5):
            await pool.map(tasks.note_start, items)  # 2 run, 2 wait in the workers
        started = time.monotonic()
        await pool.aclose()
        # Closing waits for nothing of a cancelled call: its running items (30 s) are
        # killed.
        assert time.monotonic() - started < 10
    assert sorted(int(x) for x in log.read_text().split()) == [0, 1]


async def test_closing_after_a_cancel_waits_for_none_of_its_items(
        tmp_path: Path, anyio_backend: str) -> None:
    async with ResilientPool(max_workers=2, chunk_size=1) as pool:
        await pool.map(tasks.square, range(4))
        with anyio.move_on_after(1.0):
            await pool.map(tasks.nap, [30.0] * 8)
        started = time.monotonic()
    assert time.monotonic() - started < 10  # the running naps (30 s) are killed


async def test_concurrent_runs_share_chunks(anyio_backend: str) -> None:
    async with ResilientPool(max_workers=2) as pool:
        await pool.run(tasks.square, 1)  # measured once: items of square are tiny
        before = pool.statistics().chunks_submitted
        results: list[int] = [0] * 2000

        async def one(i: int) -> None:
            results[i] = await pool.run(tasks.square, i)

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(one, i)
        assert results == [i * i for i in range(2000)]
        # A burst of calls costs a few round trips, not one per call.
        assert pool.statistics().chunks_submitted - before < 1_000  # 220 before, 8,000 broken


async def test_calls_complete_in_the_order_their_work_completes(anyio_backend: str) -> None:
    async with ResilientPool(max_workers=2) as pool:
        await pool.map(tasks.burn, [0.005] * 10)  # measured: 5 ms items
        done: list[float] = []
        started = time.monotonic()

        async def one() -> None:
            await pool.run(tasks.burn, 0.005)
            done.append(time.monotonic() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
    # 40 x 5 ms on 2 workers is ~100 ms: the first call is back long before the last.
    assert done[0] < done[-1] / 2, (done[0], done[-1])


async def test_a_call_arriving_behind_a_long_map_waits_for_few_of_its_items(
        tmp_path: Path, anyio_backend: str) -> None:
    # A fresh map of 100 ms items: before its first result, chunks went out blind (2,
    # 4, 8... items), and busy workers were given two more chunks each. A call that
    # came 0.3 s later waited behind 30 of the map's items.
    log = tmp_path / "starts"
    log.write_text("")
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(4))  # workers up

        async def long_map() -> None:
            await pool.map(tasks.note_start, [(i, str(log), 0.1) for i in range(40)])

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_map)
            await wait_until(lambda: len(log.read_text().split()) >= 3, 10)
            ahead = len(log.read_text().split())
            await pool.run(tasks.note_start, (-1, str(log), 0.0))
            order = [int(x) for x in log.read_text().split()]
            tg.cancel_scope.cancel()
    # What ran after the call arrived and before it: at most what each worker held.
    assert order.index(-1) - ahead <= 4, order


def _note_resubmits(into: list[object], event: Any) -> None:
    """An event hook: notes chunks sent again (moved off a stalled worker, say)."""
    if event.kind == "resubmit":
        into.append(event)


async def test_a_calls_own_chunk_size_holds_for_items_slow_to_send(
        anyio_backend: str) -> None:
    # Sending caps chunks to a few ms of pickling on the loop, but not a size the caller
    # chose: with one item in fifty slow to pickle, chunks of 100 went out as 26 to 45
    # chunks per 1,000 items.
    moved: list[object] = []
    hook = functools.partial(_note_resubmits, moved)

    async with ResilientPool(max_workers=2, rungs=("process",), on_event=hook) as pool:
        items = [tasks.SlowToPickle(i, 0.002 if i % 50 == 0 else 0.0) for i in range(1000)]
        for _ in range(2):
            before = pool.statistics().chunks_submitted
            moved.clear()  # (each round's own: a take-back in the first failed the second)
            assert await pool.map(tasks.echo, items, chunk_size=100) == list(range(1000))
            # 10, or 11 or 12 on a loaded machine, where one send that really held the
            # loop past HELD_SECONDS (a preempted loop) splits its chunk in two.
            assert pool.statistics().chunks_submitted - before - len(moved) <= 12


async def test_a_calls_own_chunk_size_gives_way_where_sending_it_would_hold_the_loop(
        anyio_backend: str) -> None:
    # Chunks of 100 items that each take 1 ms to pickle held the loop 0.1 s each: once
    # that is known (two chunks), they go out a few ms at a time (at most 20 items).
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        items = [tasks.SlowToPickle(i, 0.001) for i in range(600)]
        before = pool.statistics().chunks_submitted
        assert await pool.map(tasks.echo, items, chunk_size=100) == list(range(600))
        assert pool.statistics().chunks_submitted - before >= 2 + 400 // 20


async def test_a_calls_own_chunk_size_holds_for_slow_items(anyio_backend: str) -> None:
    # Once its items were known to take 10 ms, a call's chunk_size=100 gave way to
    # chunks of the call's window (a few times the slots, by time): 48 items or fewer.
    moved: list[object] = []
    hook = functools.partial(_note_resubmits, moved)

    async with ResilientPool(max_workers=2, rungs=("process",), on_event=hook) as pool:
        await pool.map(tasks.burn, [0.01] * 20)
        before = pool.statistics().chunks_submitted
        assert await pool.map(tasks.burn, [0.01] * 200, chunk_size=100) == [0.01] * 200
        # Two, and one more for each time a worker stalled (a loaded machine) and an
        # idle one took the rest of its chunk.
        assert pool.statistics().chunks_submitted - before - len(moved) <= 2, moved


@pytest.mark.parametrize("rung", ["process", "thread"])
async def test_calls_packed_behind_a_long_item_go_to_an_idle_worker(
        rung: str, tmp_path: Path, anyio_backend: str) -> None:
    # One caller's long item and thirty short ones of other callers, brought in one
    # loop turn, shared chunks: the short ones behind the long one waited for it
    # while the other worker sat idle (a 0.5 s deadline failed a quarter of them).
    # Threads did so after the process rung no longer did.
    log = tmp_path / "starts"
    async with ResilientPool(max_workers=2, rungs=(rung,)) as pool:  # type: ignore[arg-type]
        await pool.map(tasks.note_start, [(-1, str(log), 0.001)] * 40)  # 1 ms items
        log.write_text("")
        order: list[int] = []

        async def one(x: int, seconds: float) -> None:
            await pool.run(tasks.note_start, (x, str(log), seconds))
            order.append(x)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0, 1.5)
            for x in range(1, 31):
                tg.start_soon(one, x, 0.001)
        assert order[-1] == 0, order  # every short call came back before the long one
        assert sorted(int(x) for x in log.read_text().split()) == list(range(31))
        assert pool.statistics().worker_crashes == 0
        if rung == "thread":
            # Nor are the calls cut off kept as held there (they were, for good).
            await idle(pool)
            assert not pool._engine.ladder.serving._holding  # type: ignore[union-attr]


@pytest.mark.parametrize("rung", ["process", "thread"])
async def test_items_behind_a_long_first_item_of_their_chunk_go_to_an_idle_worker(
        rung: str, tmp_path: Path, anyio_backend: str) -> None:
    # On threads, one chunk's short items waited for its long first item while the
    # other thread, idle since before the chunk came, slept on the empty queue.
    log = tmp_path / "starts"
    async with ResilientPool(max_workers=2, rungs=(rung,)) as pool:  # type: ignore[arg-type]
        await pool.map(tasks.square, range(4))
        got: list[int] = []
        async with pool.imap(tasks.note_start, [(x, str(log), 1.0 if x == 0 else 0.001)
                                                for x in range(20)],
                             chunk_size=20, ordered=False) as results:
            async for value in results:
                got.append(value)
        assert got[-1] == 0 and sorted(got) == list(range(20)), got
        assert sorted(int(x) for x in log.read_text().split()) == list(range(20))  # once


async def test_a_thread_running_a_live_calls_item_is_not_given_up_for_a_stopped_call(
        tmp_path: Path, anyio_backend: str) -> None:
    # Calls in one chunk: those behind timed out, killing on timeout. The thread was
    # given up although it ran the first call's item, which then ran twice.
    log = tmp_path / "starts"
    async with ResilientPool(max_workers=1, rungs=("thread",)) as pool:
        # Known quick: the two calls share a chunk.
        await pool.map(tasks.note_start, [(-1, str(log), 0.0)] * 20)
        log.write_text("")
        outcomes: dict[int, object] = {}

        async def one(x: int, seconds: float, timeout: float | None) -> None:
            try:
                outcomes[x] = await pool.run(tasks.note_start, (x, str(log), seconds),
                                             timeout=timeout, kill_on_timeout=True)
            except DeadlineExceeded as exc:
                outcomes[x] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0, 0.5, None)
            for x in range(1, 10):  # (trio may start some first)
                tg.start_soon(one, x, 0.3, 0.1)
        assert outcomes.pop(0) == 0
        assert all(isinstance(outcome, DeadlineExceeded) for outcome in outcomes.values())
        assert [int(x) for x in log.read_text().split()].count(0) == 1


async def test_a_worker_killed_from_outside_is_replaced(anyio_backend: str) -> None:
    # Killed while idle (the OOM killer), it went unreported: a service watching
    # worker_crashes never saw it.
    events: list[PoolEvent] = []
    async with ResilientPool(max_workers=2, on_event=events.append) as pool:
        pids = set(await pool.map(tasks.pid_of, range(20), chunk_size=1))
        victim = next(iter(pids))
        os.kill(victim, 9)  # idle between chunks: nothing of ours is lost or blamed
        await wait_until(lambda: pool.statistics().worker_crashes == 1)
        fresh = set(await pool.map(tasks.nap_then_pid, [0.05] * 20, chunk_size=1))
        assert len(fresh) == 2 and victim not in fresh
        assert [e.message for e in events if e.kind == "worker_crash"] == [
            f"worker {victim} died between items (exit code -9, SIGKILL); "
            "replacing it"]
        stats = pool.statistics()
        assert stats.worker_crashes == 1 and stats.tasks_failed == 0
        await idle(pool)


async def test_workers_gone_with_their_fork_server_are_no_crashes(
        anyio_backend: str) -> None:
    # Killed from outside, the fork server takes its idle workers with it: they were
    # reported as two crashes of workers that died between items. (Items sent at
    # once may start before the kernel kills the workers: those, as with any outside
    # kill, count as their crash and go again.)
    from asyncpool._forkserver import ForkServer

    events: list[PoolEvent] = []
    async with ResilientPool(max_workers=2, on_event=events.append) as pool:
        pids = set(await pool.map(tasks.pid_of, range(20), chunk_size=1))
        server = ForkServer._current
        assert server is not None
        os.kill(server.process.pid, signal.SIGKILL)
        await wait_until(lambda: not any(alive(pid) for pid in pids))
        fresh = set(await pool.map(tasks.nap_then_pid, [0.05] * 20, chunk_size=1))
        assert fresh and not fresh & pids  # served by new workers of a new fork server
    assert [e.message for e in events if e.kind == "worker_crash"] == []


async def test_an_item_that_kills_the_fork_server_is_a_poison_item(
        anyio_backend: str) -> None:
    # Its deaths blamed no item: it was sent again and again, for good (50 runs in 8 s,
    # no crash counted), and a map without a deadline never returned.
    async with ResilientPool(max_workers=2, max_crashes_per_item=2) as pool:
        with anyio.fail_after(60):
            got = await pool.map(tasks.kill_fork_server_on, [(i, 5) for i in range(12)],
                                 chunk_size=3, return_exceptions=True)
        assert isinstance(got[5], WorkerCrashed)
        assert got[:5] + got[6:] == [i * i for i in range(12) if i != 5]
        assert await pool.map(tasks.square, range(4)) == [0, 1, 4, 9]


@pytest.mark.parametrize(("workers", "count", "poison", "crashes"),
                         [(2, 4, 3, 2), (3, 6, 1, 2), (3, 6, 1, 1)])
async def test_an_item_that_kills_the_fork_server_takes_no_neighbour(
        workers: int, count: int, poison: int, crashes: int, anyio_backend: str) -> None:
    # Every item running when the fork server died counted a crash: running beside the
    # poison item when it died again, an innocent one failed with it (with
    # max_crashes_per_item=1, at the second death, before it could run alone).
    items = [(i, poison, 0.5) for i in range(count)]
    async with ResilientPool(max_workers=workers, max_crashes_per_item=crashes) as pool:
        with anyio.fail_after(60):
            got = await pool.map(tasks.kill_fork_server_on, items, chunk_size=1,
                                 return_exceptions=True)
    assert isinstance(got[poison], WorkerCrashed)
    assert got[:poison] + got[poison + 1:] == [i * i for i in range(count) if i != poison]


async def test_a_stopped_calls_item_run_alone_holds_no_other_call(
        anyio_backend: str) -> None:
    # After the fork server died, a timed-out call's long item ran alone again and
    # nothing else went out while it ran: another call waited for it (for good, had
    # it hung).
    async with ResilientPool(max_workers=2) as pool:
        outcome: list[BaseException] = []

        async def long() -> None:
            try:
                await pool.run(tasks.nap, 30.0, timeout=1.0)
            except DeadlineExceeded as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            await wait_until(lambda: pool.statistics().chunks_in_flight == 1)
            with anyio.fail_after(10):  # the long item runs 30 s
                with pytest.raises(WorkerCrashed):
                    await pool.run(tasks.kill_fork_server_on, (1, 1))
                await wait_until(lambda: bool(outcome))
                assert await pool.map(tasks.square, range(10)) == [i * i for i in range(10)]


STOPPED_AT_EXIT = """
import asyncio, threading
from asyncpool import ResilientPool
from tests import tasks

ready = threading.Event()

def hook(event):
    if event.kind == "worker_crash":
        print(event.message, flush=True)

async def serve():
    async with ResilientPool(max_workers=2, on_event=hook) as pool:
        await pool.map(tasks.square, range(10))
        ready.set()
        await asyncio.sleep(3600)

threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
ready.wait(30)
import atexit, time
atexit.register(time.sleep, 0.5)  # runs after the pool's own exit hook
print("exiting", flush=True)
"""


def test_workers_stopped_at_exit_are_no_crashes() -> None:
    # A pool served from a daemon thread (a web server's): at exit, the workers the
    # exit hook stopped were reported as crashes by the loop, still running.
    proc = run_code(STOPPED_AT_EXIT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["exiting", ""], proc.stdout


FIRST_CALL = """
import asyncio, sys, threading
importers = {}
class Witness:
    def find_spec(self, name, path=None, target=None):
        if name in ("anyio._backends._asyncio", "cloudpickle"):
            importers[name] = threading.current_thread().name
sys.meta_path.insert(0, Witness())
from asyncpool import ResilientPool
def triple(x):  # of __main__: sent by value, with cloudpickle
    return 3 * x
async def main():
    async with ResilientPool(max_workers=1) as pool:
        assert await pool.run(triple, 1) == 3
asyncio.run(main())
print(sorted(importers.items()))
"""


def test_the_first_call_does_not_import_on_the_loop() -> None:
    # anyio's backend takes 20-30 ms to import, cloudpickle 10-20: a thread imports
    # them while the workers start, so a cold pool's first call does not wait for it.
    proc = run_code(FIRST_CALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([("anyio._backends._asyncio", "asyncpool-import"),
                                       ("cloudpickle", "asyncpool-import")])


SCRIPT_FUNCTIONS = """
import functools, math, pickle, subprocess, sys
from asyncpool._share import dumps_for_workers
K = 3
def fact(n): return 1 if n < 2 else n * fact(n - 1)
def outer():
    y = 2
    def inner(x): return x * y + math.floor(K / 2)
    def rec(n): return 0 if n == 0 else 1 + rec(n - 1)
    return inner, rec
def kw(x, *, scale=10): return x * scale
kw.note = "kept"
def plus(x, y=7, z=(1, 2)): return x + y + sum(z)
blob = dumps_for_workers([fact, *outer(), functools.partial(kw, scale=2), kw, plus])
LOAD = ("import pickle, sys; "
        "fact, inner, rec, half, kw, plus = pickle.loads(sys.stdin.buffer.read()); "
        "print(fact(5), inner(4), rec(6), half(5), kw(1), plus(1), kw.note, "
        "'cloudpickle' in sys.modules)")
print(subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = sys.argv[1:]; "
                      + LOAD, *sys.path], input=blob, capture_output=True).stdout.decode())
"""


def test_a_worker_loads_a_script_s_functions_without_cloudpickle() -> None:
    # Importing cloudpickle to rebuild a function of the main script was 15-20 ms of a
    # new worker's first call: the pool's pickler names light stand-ins instead.
    proc = run_code(SCRIPT_FUNCTIONS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["120", "9", "6", "10", "10", "11", "kept", "False"], (
        proc.stdout, proc.stderr)


NO_SEQPACKET = """
import asyncio, socket
pair = socket.socketpair
def without_seqpacket(family=socket.AF_UNIX, kind=socket.SOCK_STREAM, proto=0):
    if kind == socket.SOCK_SEQPACKET:
        raise OSError(93, "Protocol not supported")
    return pair(family, kind, proto)
socket.socketpair = without_seqpacket
from asyncpool import ResilientPool
async def main():
    async with ResilientPool(max_workers=2) as pool:
        print(pool.backend, await pool.run(abs, -3))
asyncio.run(main())
"""


def test_a_system_without_seqpacket_sockets_serves_on_threads() -> None:
    # As macOS has none (this system has: the socket call is replaced): opening the
    # pool raised OSError instead of stepping down to the thread rung.
    proc = run_code(NO_SEQPACKET)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["thread", "3"]


async def test_a_chunk_taken_back_still_brings_its_function(anyio_backend: str) -> None:
    # The chunk that carried the function to the first worker waited behind a long
    # item and went to the other worker: the first worker's next chunk of the same
    # function came without it, and the worker died of a KeyError.
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(10))
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, tasks.nap, 1.0)
            await wait_until(lambda: pool.statistics().chunks_in_flight == 1)
            assert await pool.map(tasks.add_one_each, [(i, 1) for i in range(40)]) == [
                i + 1 for i in range(40)]
        assert await pool.map(tasks.add_one_each, [(i, 1) for i in range(400)]) == [
            i + 1 for i in range(400)]
        assert pool.statistics().worker_crashes == 0


async def test_killing_a_cancelled_calls_item_runs_no_finished_item_again(
        tmp_path: Path, anyio_backend: str) -> None:
    # Another caller's short items and a doomed call's long one share a chunk. The
    # worker was killed for the long one before it had sent what finished just before
    # it (results go back every few ms): those items ran a second time.
    starts = tmp_path / "starts"
    async with ResilientPool(max_workers=1, max_chunks_in_flight=1,
                             rungs=("process",)) as pool:
        await pool.map(tasks.note_start, [(-1, str(tmp_path / "warm"), 0.0003)] * 50)
        for _ in range(3):
            starts.write_text("")
            results: list[object] = []
            doomed = anyio.CancelScope()

            async def innocent(results: list[object] = results) -> None:
                # Of unknown length: its items and the doomed one go in one chunk.
                items = ((x, str(starts), 0.0003) for x in range(20))
                results.extend(await pool.map(tasks.note_start, items))

            async def stopped(doomed: anyio.CancelScope = doomed) -> None:
                with doomed:
                    await pool.run(tasks.note_start, (99, str(starts), 5.0),
                                   cancel_running="kill")

            async with anyio.create_task_group() as tg:
                for start in (functools.partial(pool.run, tasks.nap, 0.3), innocent,
                              stopped):  # the first holds the only slot meanwhile
                    calls = pool.statistics().active_calls
                    tg.start_soon(start)
                    await wait_until(lambda c=calls: pool.statistics().active_calls > c)
                await wait_until(lambda: "99" in starts.read_text().split())
                doomed.cancel()
            assert results == list(range(20))
            assert sorted(int(x) for x in starts.read_text().split()) == [*range(20), 99]


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_call_stopped_with_kill_does_not_kill_another_callers_item(
        tmp_path: Path, how: str, anyio_backend: str) -> None:
    # Calls made while the only slot is busy share the next chunk: A's item waits
    # behind B's long one. Stopping A with kill killed the worker while it ran B's
    # item, and B's ran again.
    starts = tmp_path / "starts"
    async with ResilientPool(max_workers=1, max_chunks_in_flight=1,
                             rungs=("process",)) as pool:
        # Its items look instant, so the calls waiting for the slot go as one chunk.
        await pool.map(tasks.note_start, [(0, str(tmp_path / "warm"), 0.0)] * 50)
        results: dict[int, object] = {}
        stop_a = anyio.CancelScope()

        async def call(x: int, seconds: float, **options: Any) -> None:
            results[x] = await pool.run(tasks.note_start, (x, str(starts), seconds),
                                        **options)

        async def call_a() -> None:
            with stop_a:
                try:
                    await call(2, 0.0, timeout=1.8, kill_on_timeout=True,
                               cancel_running="kill")
                except TimeoutError:
                    results[2] = "timed out"

        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, tasks.nap, 1.0)  # holds the only slot
            for x, start in enumerate([call, call_a, *[call] * 17], 1):
                calls = pool.statistics().active_calls
                if start is call_a:
                    tg.start_soon(call_a)
                else:
                    tg.start_soon(call, x, 1.5 if x == 1 else 0.0)
                await wait_until(lambda c=calls: pool.statistics().active_calls > c)
            if how == "cancel":
                await wait_until(lambda: starts.exists() and "1" in starts.read_text())
                # A moment into B's long item (which the kill must spare), as the
                # timeout case stops A well into it too.
                await anyio.sleep(0.1)
                stop_a.cancel()
    assert results.pop(2, "cancelled") == ("timed out" if how == "timeout" else "cancelled")
    assert results == {x: x for x in [1, *range(3, 20)]}
    ran = [int(line) for line in starts.read_text().split()]
    assert ran.count(1) == 1 and 2 not in ran, ran


async def test_arguments_that_do_not_load_do_not_count_against_max_tasks(
        anyio_backend: str) -> None:
    # The parent counted the items against the worker's max_tasks_per_worker, the
    # worker did not: written off but never retiring, idle workers piled up (68
    # after 100 rounds on 2 workers).
    async with ResilientPool(max_workers=2, max_tasks_per_worker=3,
                             rungs=("process",)) as pool:
        for _ in range(20):
            with pytest.raises(SerializationError):
                await pool.run(tasks.echo, tasks.Unloadable())
            assert await pool.run(tasks.square, 3) == 9
        await idle(pool)
        # (A worker near its limit stays beside its ready replacement until it has
        # been idle a second.)
        await wait_until(lambda: pool.statistics().workers <= 2, 10)


async def test_parked_workers_serve_a_pool_with_a_longer_sys_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str) -> None:
    async with ResilientPool(max_workers=2, reuse_workers=True) as pool:
        await pool.map(tasks.square, range(4))
    try:
        (tmp_path / "later_module.py").write_text("def triple(x):\n    return 3 * x\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import later_module  # type: ignore[import-not-found]

        async with ResilientPool(max_workers=2, reuse_workers=True) as pool:
            assert await pool.map(later_module.triple, range(4)) == [0, 3, 6, 9]
    finally:
        await ResilientPool.close_idle_workers()


async def test_warm_start_with_an_initializer_failing_in_processes_stays_on_threads(
        anyio_backend: str) -> None:
    events: list[PoolEvent] = []
    async with ResilientPool(max_workers=2, warm_start=True, on_event=events.append,
                             initializer=tasks.fail_outside,
                             initargs=(os.getpid(),)) as pool:
        await wait_until(lambda: pool.statistics().fallbacks == 1)
        assert await pool.map(tasks.square, range(10)) == [x * x for x in range(10)]
        assert pool.backend == "thread"
        assert pool.statistics().creation_failures == 1
    fallback = [e for e in events if e.kind == "fallback"]
    assert len(fallback) == 1 and "fails in worker processes" in fallback[0].message


async def test_initargs_that_do_not_pickle_say_so(anyio_backend: str) -> None:
    with pytest.raises(SerializationError, match="initargs cannot be pickled"):
        async with ResilientPool(max_workers=1, initializer=tasks.remember,
                                 initargs=(threading.Lock(),)):
            pass


async def test_workers_dying_together_as_they_start_are_one_failed_try(
        tmp_path: Path, anyio_backend: str) -> None:
    # Every worker killed, then every one that starts for the next 0.6 s killed in its
    # initializer: three tries with backoff between them ride it out. Each death of
    # the round counted as a try of its own: three siblings spent every attempt at
    # once and the rung gave up in 0.2 s, with no backoff at all.
    async with ResilientPool(max_workers=3, rungs=("process",), creation_attempts=3,
                             backoff_initial=0.2, backoff_factor=2.0, backoff_jitter=0.0,
                             initializer=tasks.dies_while_told,
                             initargs=(str(tmp_path),)) as pool:
        pids = set(await pool.map(tasks.pid_of, range(30), chunk_size=1))
        (tmp_path / "until").write_text(str(time.time() + 0.6))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(20):
            assert await pool.map(tasks.square, range(6)) == [i * i for i in range(6)]
        assert pool.statistics().fallbacks == 0


def test_a_fork_that_fails_at_once_with_no_backoff_never_holds_the_loop() -> None:
    # With backoff_initial=0, a fork that failed at once (no descriptor left for its
    # socket) was tried again in a loop that never awaited: the event loop froze.
    code = """
import asyncio, os, resource, signal, time
from asyncpool import ResilientPool
from tests import tasks
from tests.helpers import Heartbeat

async def main():
    async with ResilientPool(rungs=("process",), max_workers=2, backoff_initial=0.0,
                             backoff_max=0.0) as pool:
        pids = set(await pool.map(tasks.pid_of, range(20), chunk_size=1))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        async with Heartbeat().running() as beat:
            os.kill(min(pids), signal.SIGKILL)
            await asyncio.sleep(1.0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert await pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
        print("lag", beat.worst)

asyncio.run(main())
"""
    proc = run_code(code, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 0.5, proc.stdout


def test_a_process_rung_short_of_descriptors_is_tried_again_later() -> None:
    # No descriptor left for the fork server's socket (EMFILE) was taken for "this
    # system has no such sockets": the process rung was never tried again.
    code = """
import asyncio, os, resource
from asyncpool import ResilientPool
from tests import tasks

resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

async def main():
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        os.close(held.pop())  # one for the loop's own needs
    async with ResilientPool(max_workers=1, creation_attempts=2, backoff_initial=0.01,
                             promote_after=0.2, promote_max=0.5) as pool:
        opened_on = pool.backend
        for fd in held:
            os.close(fd)
        for _ in range(200):
            if pool.backend == "process":
                break
            await asyncio.sleep(0.05)
        assert await pool.map(tasks.square, range(4)) == [0, 1, 4, 9]
        print(opened_on, pool.backend)

asyncio.run(main())
"""
    proc = run_code(code, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["thread", "process"], proc.stdout


@pytest.mark.parametrize("before", ["a cheap call", "quick items"])
async def test_chunks_sized_on_a_cost_far_too_low_are_taken_back(
        before: str, anyio_backend: str) -> None:
    # Chunks sized on what the function cost before (one cheap call of it; the call's
    # own first items) hold far more work than they should once its items are seen to
    # be slow: the rest is taken back and goes out again sized on what is now known.
    # A request behind them waited for 60 of a map's 30 ms items (1.9 s).
    async with ResilientPool(max_workers=2) as pool:
        if before == "a cheap call":
            await pool.run(tasks.nap, 0.0)
            items = [0.03] * 200
        else:
            items = [0.001] * 30 + [0.03] * 200
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.map, tasks.nap, items)
            await wait_until(lambda: pool.statistics().tasks_completed >= len(items) - 195)
            before_request = pool.statistics().tasks_completed
            assert await pool.run(tasks.nap, 0.0) == 0.0
            ran_meanwhile = pool.statistics().tasks_completed - before_request
            tg.cancel_scope.cancel()
    assert ran_meanwhile < 40, ran_meanwhile  # 4 to 15 here; 71 to 141 before


async def test_a_small_map_taken_back_with_big_ones_keeps_its_turn(
        anyio_backend: str) -> None:
    # Three maps of a function timed as cheap: their first chunks, too big, were taken
    # back. The small map's items, cut from the head of a chunk, went again behind
    # every item of the two big maps: it finished with them (2 s), not first (0.3 s).
    done: dict[str, int] = {}
    async with ResilientPool(max_workers=2) as pool:
        for _ in range(20):
            await pool.run(tasks.nap, 0.0)

        async def one(name: str, items: list[float]) -> None:
            assert await pool.map(tasks.nap, items) == items
            done[name] = pool.statistics().tasks_completed - 20

        async with anyio.create_task_group() as tg:
            for name, count, seconds in [("a", 200, 0.01), ("b", 200, 0.01),
                                         ("c", 50, 0.005)]:
                tg.start_soon(one, name, [0.0] * 3 + [seconds] * (count - 3))
    # Taking turns, the 50 small items are done by about the 150th item of all 450.
    assert done["c"] < 300, done


async def test_a_map_arriving_after_a_take_back_waits_for_no_long_part(
        anyio_backend: str) -> None:
    # What was taken back went out again in a few parts of 100 ms or more each (at
    # most two per worker): a small map arriving meanwhile waited behind them while
    # 125 items of the big maps ran; now each part goes out a target's worth at a time.
    # Timed on single naps, the cost may come out anywhere from 0.01 to 0.7 ms: chunks
    # of 125 items, far over the take-back line, or of 37 items (160 ms), each under
    # it but six queued on two workers, which were not taken back (the small map
    # waited behind them: 96 to 232 items ran meanwhile).
    ran_meanwhile: list[int] = []
    async with ResilientPool(max_workers=2) as pool:
        for _ in range(20):
            await pool.run(tasks.nap, 0.0)

        async def small() -> None:
            await wait_until(lambda: pool.statistics().tasks_completed >= 20 + 60)
            before = pool.statistics().tasks_completed
            assert await pool.map(tasks.nap, [0.004] * 10) == [0.004] * 10
            ran_meanwhile.append(pool.statistics().tasks_completed - before - 10)

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(pool.map, tasks.nap, [0.004] * 250)
            tg.start_soon(small)
    assert ran_meanwhile[0] < 80, ran_meanwhile


@pytest.mark.parametrize("where", ["first", "every 50,000"])
async def test_one_slow_item_among_quick_ones_is_no_chunk_sized_too_low(
        where: str, anyio_backend: str) -> None:
    # One item's report said the rest of its chunk would take far too long: the chunk
    # was taken back, and its 8,000 quick items went out again one per chunk (a map
    # five to nine times slower, the loop held up to 0.9 s).
    items = [0.0] * 200_000
    for at in ([0] if where == "first" else range(0, 200_000, 50_000)):
        items[at] = -0.2
    async with ResilientPool(max_workers=2) as pool:
        await pool.map(tasks.slow_if_negative, [0.0] * 50_000)  # timed as quick
        before = pool.statistics().chunks_submitted
        assert await pool.map(tasks.slow_if_negative, items) == items
        assert pool.statistics().chunks_submitted - before < 1_000


async def test_one_outside_kill_of_the_fork_server_holds_no_other_call(
        tmp_path: Path, anyio_backend: str) -> None:
    # Every item running when the fork server died ran again alone, one after another,
    # and nothing else went out meanwhile: after one kill from outside (no item to
    # blame), a small call waited for both long items, rerun in turn.
    from asyncpool._forkserver import ForkServer

    started = tmp_path / "started"
    finished: list[str] = []
    async with ResilientPool(max_workers=3) as pool:  # one free for the small call

        async def long() -> None:
            await pool.run(tasks.note_start, (1, str(started), 2.0))
            finished.append("long")

        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            tg.start_soon(long)
            await wait_until(lambda: started.exists() and len(started.read_text().split()) == 2)
            server = ForkServer.current()
            assert server is not None
            os.kill(server.process.pid, signal.SIGKILL)
            await wait_until(lambda: len(started.read_text().split()) >= 3)  # one reruns
            assert await pool.run(tasks.square, 3) == 9
            finished.append("small")
        assert finished == ["small", "long", "long"]
        assert pool.statistics().tasks_failed == 0


async def test_poison_items_that_kill_the_fork_server_run_a_bounded_number_of_times(
        tmp_path: Path, anyio_backend: str) -> None:
    # A suspect of a fork server's death that was lost while queued on a worker lost
    # its marks and started over: with several poison items and callers, one ran up
    # to 36 times (three runs are its due: marked, blamed, alone).
    poison = frozenset({5, 17})

    async def caller(pool: ResilientPool, number: int) -> list[object]:
        items = [(str(tmp_path), number, x, poison) for x in range(30)]
        return await pool.map(tasks.noted_poison, items, return_exceptions=True)

    async with ResilientPool(max_workers=3, max_crashes_per_item=1) as pool:
        with anyio.fail_after(120):
            results: list[list[object]] = [[], [], []]

            async def run(number: int) -> None:
                results[number] = await caller(pool, number)

            async with anyio.create_task_group() as tg:
                for number in range(3):
                    tg.start_soon(run, number)
    runs = {path.name: len(path.read_text().split()) for path in tmp_path.iterdir()}
    for number, got in enumerate(results):
        for x, value in enumerate(got):
            if x in poison:
                assert isinstance(value, WorkerCrashed), (number, x, value)
                assert runs[f"{number}-{x}"] <= 3, runs
            else:
                assert value == (number, x), (number, x, value)


async def test_a_fork_server_behind_on_its_requests_is_not_a_shortage(
        anyio_backend: str) -> None:
    # Its control socket holds a few hundred requests (here a few): asking for more
    # workers at once than it holds was taken for a machine out of processes, the pool
    # opening with some and starting the rest with backoff.
    from asyncpool._forkserver import ForkServer

    async with ResilientPool(max_workers=1) as warm:  # the fork server is up
        await warm.run(tasks.square, 1)
    server = ForkServer.current()
    assert server is not None
    server.control.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the least
    events: list[PoolEvent] = []
    async with ResilientPool(max_workers=24, on_event=events.append) as pool:
        assert pool.statistics().workers == 24, [e.message for e in events]
        assert not [e for e in events if e.kind in ("rung_warning", "creation_failed")]
        assert len(set(await pool.map(tasks.pid_of, range(200)))) > 1


async def test_a_call_does_not_wait_behind_a_big_argument_still_being_sent(
        anyio_backend: str) -> None:
    # A request that arrived while another caller's 150 MB argument was being written
    # to a worker queued behind it there (the other worker busy a few ms): it waited
    # for the whole transfer. Here that worker is stopped: the transfer never ends.
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(20))
        rung = pool._engine.ladder.serving  # type: ignore[attr-defined]
        receiver = rung.procs[0]  # the first of two idle workers takes the next chunk
        os.kill(receiver.pid, signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, tasks.size_of, b"x" * (64 << 20))
                await wait_until(lambda: receiver.outbox)
                tg.start_soon(pool.run, tasks.nap, 0.3)  # the other worker: busy a while
                await wait_until(lambda: pool.statistics().chunks_in_flight == 2)
                with anyio.fail_after(20):  # (never, behind the stopped transfer)
                    assert await pool.run(tasks.pid_of) != receiver.pid
        finally:
            # (It may be gone: a stopped worker that holds a chunk it has not started
            # is killed, and its chunks sent to another.)
            with contextlib.suppress(ProcessLookupError):
                os.kill(receiver.pid, signal.SIGCONT)


async def test_a_graceful_close_lets_a_stopped_idle_worker_leave_by_itself(
        anyio_backend: str) -> None:
    # An idle worker someone stopped (SIGSTOP: job control, a debugger let go) reads no
    # end-of-file: a graceful close waited 5 s for it, then killed it.
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(20))
        procs = list(pool._engine.ladder.serving.procs)  # type: ignore[attr-defined]
        os.kill(procs[0].pid, signal.SIGSTOP)
        await wait_until(lambda: psutil.Process(procs[0].pid).status()
                         == psutil.STATUS_STOPPED)
    assert [p._exit_status for p in procs] == [0, 0]  # each left, none was killed


async def test_a_worker_stopped_while_it_loads_a_chunk_hands_it_to_another(
        anyio_backend: str) -> None:
    # Stopped (SIGSTOP) as it unpickled the chunk's argument, before any item began: the
    # chunk counted as taken up, and the call waited out its deadline.
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(20))
        receiver = pool._engine.ladder.serving.procs[0].pid  # type: ignore[attr-defined]
        try:
            async with anyio.create_task_group() as group:
                got: list[int] = []

                async def call() -> None:
                    got.append(await pool.run(tasks.pid_of, tasks.SlowToLoad(1.0),
                                              timeout=30))

                group.start_soon(call)
                await anyio.sleep(0.3)  # (it loads for a second)
                os.kill(receiver, signal.SIGSTOP)
            assert got and got[0] != receiver
            await wait_until(lambda: not alive(receiver))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(receiver, signal.SIGCONT)


async def test_a_graceful_close_continues_a_worker_stopped_in_a_live_calls_item(
        anyio_backend: str) -> None:
    # A graceful close waits for the items of live calls: one whose worker someone had
    # stopped (SIGSTOP) mid-item never ended, and the close waited for good.
    pool = ResilientPool(max_workers=1, rungs=("process",))
    await pool.__aenter__()
    worker = pool._engine.ladder.serving.procs[0].pid  # type: ignore[attr-defined]
    got: list[float] = []
    try:
        async with anyio.create_task_group() as group:
            async def mapped() -> None:
                got.append(await pool.run(tasks.nap, 0.3))

            group.start_soon(mapped)
            await wait_until(lambda: pool.statistics().chunks_in_flight > 0)
            await anyio.sleep(0.1)
            os.kill(worker, signal.SIGSTOP)
            await wait_until(lambda: psutil.Process(worker).status() == psutil.STATUS_STOPPED)
            with anyio.fail_after(20):
                await pool.aclose()
        assert got == [0.3]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        await pool.aclose(kill=True)


@pytest.mark.parametrize("kill_on_timeout", [False, True])
async def test_a_request_sent_to_a_stopped_idle_worker_goes_to_another(
        kill_on_timeout: bool, anyio_backend: str) -> None:
    # An idle worker someone stopped (SIGSTOP) took the next request, which waited out
    # its deadline (with kill_on_timeout too: its item had not started); the worker was
    # never replaced, and the pool went on with one.
    async with ResilientPool(max_workers=2, rungs=("process",)) as pool:
        await pool.map(tasks.square, range(20))
        stopped = pool._engine.ladder.serving.procs[0].pid  # type: ignore[attr-defined]
        os.kill(stopped, signal.SIGSTOP)  # (the first of two idle workers takes the next)
        try:
            await wait_until(lambda: psutil.Process(stopped).status() == psutil.STATUS_STOPPED)
            assert await pool.run(tasks.pid_of, timeout=20,
                                  kill_on_timeout=kill_on_timeout) != stopped
            await wait_until(lambda: pool.statistics().workers == 2 and not alive(stopped))
            pids = await pool.map(tasks.pid_after, [0.05] * 20, chunk_size=1)
            assert len(set(pids)) == 2 and stopped not in pids
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
