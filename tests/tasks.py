"""Functions the tests send to workers (importable by worker processes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import io
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def fail_if_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"item {x} is odd")
    return x


def burn(seconds: float) -> float:
    """Spin the CPU for `seconds` (no sleep, so it really occupies a core)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def note_ready(path: str, seconds: float) -> None:
    """An initializer that takes ``seconds``, then notes when its worker began and
    when it was ready."""
    began = time.monotonic()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {began} {time.monotonic()}\n")


def slow_if_negative(x: float) -> float:
    """Quick, but sleep ``-x`` seconds for a negative ``x``."""
    if x < 0:
        time.sleep(-x)
    return x


def nap_until(seconds: float) -> tuple[int, float]:
    """Sleep; this worker's pid and when it finished (clocks agree across processes)."""
    time.sleep(seconds)
    return os.getpid(), time.monotonic()


def alone(path: str) -> int | str:
    """Whether no other process ran this meanwhile: each holds a lock on ``path``."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "overlap"
        time.sleep(0.02)
    return os.getpid()


def kill_self_once(args: tuple[int, str]) -> int:
    """SIGKILL this worker the first time item 0 runs; the retry succeeds."""
    x, marker = args
    if x == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def kill_fork_server_on(args: tuple[int, int] | tuple[int, int, float]) -> int:
    """A poison item that kills the fork server (this worker's parent), and with it
    every worker (after 50 ms, while the others sleep their seconds, if given)."""
    x, poison, *seconds = args
    if x == poison:
        if seconds:
            time.sleep(0.05)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
    time.sleep(seconds[0] if seconds else 0)
    return x * x


def exit_on(args: tuple[int, int]) -> int:
    """A poison item: os._exit every time it runs."""
    x, poison = args
    if x == poison:
        os._exit(7)
    return x


def segfault_on(args: tuple[int, int]) -> int:
    x, poison = args
    if x == poison:
        import faulthandler

        faulthandler._sigsegv()
    return x


def pid_of(_: object = None) -> int:
    return os.getpid()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def local_zone(_: object = None) -> str:
    """The name of the local time zone here."""
    return time.strftime("%Z", time.localtime(0))


def where_am_i(name: str) -> tuple[str, str | None]:
    """The worker's directory and its environment's ``name``."""
    return os.getcwd(), os.environ.get(name)


def thread_name(_: object = None) -> str:
    return threading.current_thread().name


class Unpicklable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("Unpicklable refuses to be pickled")


def _boom() -> None:
    raise ValueError("Unloadable refuses to be unpickled")


class Unloadable:
    """Pickles fine, fails when unpickled."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_boom, ())


class ExitsWhenPickled:
    """Its pickling calls sys.exit (code of the caller's, run on the pool's loop)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise SystemExit("pickled")


def ints(n: int) -> list[int]:
    return list(range(n))


def exit_on_two(x: int) -> int:
    return exit_on((x, 2))


def return_unpicklable(x: int) -> object:
    return Unpicklable() if x == 2 else x


def return_unloadable(x: int) -> object:
    return Unloadable() if x == 2 else x


def counted_unloadable(args: tuple[int, str, str]) -> object:
    """Notes each run in ``log``; item 2 returns Unloadable(), item 4 an instance of
    a class that only this worker can import (from a module it writes in ``folder``),
    item 6 what does not pickle, item 7 an instance with slots."""
    x, log, folder = args
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == 2:
        return {"nested": [Unloadable()]}
    if x == 4:
        name = f"worker_only_{os.getpid()}"
        Path(folder, f"{name}.py").write_text("class Local:\n    pass\n")
        sys.path.insert(0, folder)
        try:
            module = __import__(name)
        finally:
            sys.path.remove(folder)
        return module.Local()
    if x == 6:
        return Unpicklable()
    if x == 7:
        return Slotted(7)
    return x


class Slotted:
    """An instance with slots (the search for what did not load looks into them)."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slotted) and other.value == self.value


def flaky_thread_start(args: tuple[int, str]) -> int:
    """Fails like an exhausted machine the first time, then succeeds."""
    x, marker = args
    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("can't start new thread")
    return x


def always_exhausted(path: str) -> None:
    """Notes each try in the file ``path``, and fails like an exhausted machine."""
    with open(path, "a") as f:
        f.write("try\n")
    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


def slow_echo(x: object) -> object:
    time.sleep(0.02)
    return x


class Tagged(functools.partial):  # type: ignore[type-arg]
    """A partial with a call of its own."""

    def __call__(self, *args: object, **kwargs: object) -> tuple[str, object]:
        return "tagged", super().__call__(*args, **kwargs)


def fork_and_fall_back(x: int) -> int:
    """Forks a child that raises instead of calling os._exit (a failed exec, say):
    the child comes back into the worker's code."""
    pid = os.fork()
    if pid == 0:
        raise FileNotFoundError("the child's exec failed")
    os.waitpid(pid, 0)
    return x


def fork_and_exit(code: int) -> int:
    """Forks a child that ends with sys.exit(code), which comes back into the worker's
    code as SystemExit; returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        sys.exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


class Payload:
    """An argument a test can hold a weak reference to."""


def reject(_: object) -> int:
    raise ValueError("rejected")


class RefusesWithRuntimeError:
    """Its pickling fails with a RuntimeError, which must not be taken for exhaustion."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("RefusesWithRuntimeError cannot be pickled")


class NeedsTwo(Exception):
    """Its __init__ takes two arguments, so it pickles but does not unpickle."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(f"code {code} at {where}")
        self.code, self.where = code, where


class HoldsLock(Exception):
    """Holds a lock, which does not pickle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_needs_two(x: int) -> int:
    if x == 3:
        raise NeedsTwo(7, "here")
    return x


#: What raise_base(x) raises for x = 1, 2...: none of them is an Exception the caller's
#: own code would catch as such, or one that a loop, a coroutine or an async for
#: takes for its own.
BASE_RAISED = [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError(),
               StopIteration(), StopAsyncIteration()]


def raise_base(x: int) -> int:
    if 1 <= x <= len(BASE_RAISED):
        raise type(BASE_RAISED[x - 1])(*BASE_RAISED[x - 1].args)
    return x


def exit_with(x: int) -> int:
    if x == 1:
        raise SystemExit(3)
    if x == 2:
        raise KeyboardInterrupt
    return x


def note_start(args: tuple[int, str, float]) -> int:
    """Append this item to a file as it starts, then sleep."""
    x, path, seconds = args
    with open(path, "a") as f:
        f.write(f"{x}\n")
    time.sleep(seconds)
    return x


def spawn_sleeper(args: tuple[str, float]) -> int:
    """Start a `sleep 1000` grandchild (its pid noted in a file), then hang."""
    import subprocess

    path, seconds = args
    child = subprocess.Popen(["sleep", "1000"])
    Path(path).write_text(str(child.pid))
    time.sleep(seconds)
    return child.pid


_HELD: list[bytearray] = []


def leak(megabytes: int) -> tuple[int, int]:
    """Keep `megabytes` of touched memory in this worker for good; return the pid and
    the worker's resident memory after."""
    _HELD.append(bytearray(megabytes << 20))
    return os.getpid(), rss()


def rss(_: object = None) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


STATE: dict[str, object] = {}


def remember(tag: str) -> None:
    """An initializer: note the tag and how often this process ran it."""
    STATE["tag"] = tag
    STATE["runs"] = int(STATE.get("runs", 0)) + 1  # type: ignore[call-overload]


def remember_unless(tag: str, refuse: str) -> None:
    """An initializer that raises once the file ``refuse`` exists."""
    if os.path.exists(refuse):
        raise LookupError(f"{refuse} says no")
    remember(tag)


def recall(_: object = None) -> tuple[object, object, int]:
    return STATE.get("tag"), STATE.get("runs"), os.getpid()


def note_run(path: str, tag: str, hang_after: int = 0, settle: float = 0.0) -> None:
    """An initializer: sets the tag (None for ``settle`` seconds first) and appends it
    to the file ``path``; once this process ran it ``hang_after`` times (if not 0), it
    hangs 30 s instead."""
    runs = STATE.setdefault("runs_of", {})
    assert isinstance(runs, dict)
    runs[tag] = runs.get(tag, 0) + 1
    if hang_after and runs[tag] > hang_after:
        time.sleep(30)
    STATE["tag"] = None
    time.sleep(settle)
    STATE["tag"] = tag
    with open(path, "a") as f:
        f.write(tag + "\n")


#: Not a function (the command line says so, not "did you mean NOTHING").
NOTHING = None


def count_to(n: int) -> Iterator[int]:
    """A generator function (the pool refuses it)."""
    yield from range(n)


def recall_across(seconds: float) -> tuple[object, object]:
    """The tag an initializer set, as it was before and after ``seconds`` of work."""
    before = STATE.get("tag")
    time.sleep(seconds)
    return before, STATE.get("tag")


async def _remember_later(tag: str) -> None:
    remember(tag)


def remember_later(tag: str) -> object:
    """A plain function that returns an async one's coroutine: nothing would await it
    in a worker."""
    return _remember_later(tag)


def refuse_to_start() -> None:
    raise LookupError("the initializer refuses")


def echo(x: object) -> object:
    return x


def size_of(x: bytes) -> int:
    return len(x)


def make_bytes(n: int) -> bytes:
    return b"x" * n


def add_one_each(args: tuple[int, int]) -> int:
    a, b = args
    return a + b


def note_start_or_die(args: tuple[int, str, float, bool]) -> int:
    """Note the item in a file as it starts; a poison item then kills its worker."""
    x, path, seconds, poison = args
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if poison:
        os._exit(9)
    time.sleep(seconds)
    return x


def closes_descriptors_then_naps(seconds: float) -> float:
    """Closes every descriptor it inherited, as a daemon does, then runs on."""
    os.closerange(3, 1 << 16)
    time.sleep(seconds)
    return seconds


def note_pid_then_nap(path: str, seconds: float) -> None:
    """An initializer that notes its worker's pid in a file, then sleeps."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)


def note_pid_then_hang_first(path: str, firsts: int) -> None:
    """Note this worker's pid in a file; the first ``firsts`` runs then hang (for a
    test to kill them), later ones return at once."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        if len(f.read().split()) <= firsts:
            time.sleep(120)


def nap_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def hog_on(args: tuple[int, int]) -> int:
    """The poison item allocates and touches memory until the OOM killer stops it."""
    x, poison = args
    if x == poison:
        hog = []
        while True:
            hog.append(bytearray(64 << 20))
    return x


def object_on_two(x: int) -> object:
    """A result that is not JSON for item 2."""
    return {1, 2} if x == 2 else x


def hang_forever() -> None:
    """An initializer that never returns."""
    time.sleep(3600)


def _count_load(path: str, deadly: tuple[int, ...]) -> int:
    with open(path, "ab") as f:
        f.write(b".")
        count = f.tell()
    if count in deadly:
        os._exit(3)
    return 0


class DiesOnLoads:
    """Loads as 0, except at the loads numbered in ``deadly`` (counted in the file
    ``path``), which kill the process loading it."""

    def __init__(self, path: str, deadly: tuple[int, ...]) -> None:
        self.path, self.deadly = path, deadly

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_count_load, (self.path, self.deadly))


def scribble_on_socket(args: tuple[int, str]) -> int:
    """Item 5 writes to its worker's connection to the pool: ``how`` "garbage" (no
    frame), or "huge" (a frame header claiming 1 PB)."""
    x, how = args
    if x == 5:
        scribble = b"\x00\xff garbage " * 10 if how == "garbage" else (
            struct.pack("<BxxxIQ", 12, 1, 1 << 50))
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(fd) > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith("socket"):
                    os.write(int(fd), scribble)
    return x


def scribble_on_progress(x: int) -> int:
    """Item 3 writes over its worker's progress area (as if another chunk ran), then
    ends its worker."""
    if x == 3:
        from asyncpool import _wire, _worker
        for held in gc.get_objects():
            if isinstance(held, _worker._Worker) and held.progress is not None:
                held.progress[_wire.SEQ] = 10**9
        os._exit(7)
    return x


def meddle(how: str) -> str:
    """Changes its worker's process state as some libraries do: ``how`` "stdio"
    closes descriptors 0 to 2 (daemonizing), "sigchld" ignores SIGCHLD, "detach"
    re-encodes ``sys.stdout`` over its detached buffer."""
    if how == "stdio":
        for fd in (0, 1, 2):
            os.close(fd)
    elif how == "detach":
        sys.stdout = io.TextIOWrapper(sys.stdout.detach(), encoding="utf-8",
                                      line_buffering=True)
    else:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    return how


def prints_and_runs_false(x: int) -> int:
    """An innocent item: prints, and returns the exit code of `false` (1)."""
    print("item", x, flush=True)
    return subprocess.run(["false"]).returncode


def _load_slowly(seconds: float) -> SlowToLoad:
    time.sleep(seconds)
    return SlowToLoad(0)


class SlowToLoad:
    """Pickles at once; unpickling it takes ``seconds`` (a lazy model load, say)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_load_slowly, (self.seconds,))


class CrashOnLoad:
    """Pickles fine; unpickling it kills the process that loads it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os._exit, (3,))


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ refuses")


def raise_bad_str(x: int) -> int:
    if x == 3:
        raise BadStr()
    return x


def odd_as_error(x: int) -> object:
    """Returns (does not raise) an exception for odd items."""
    return ValueError(f"{x} is odd") if x % 2 else x


def spawn_session_sleeper(path: str) -> int:
    """Start `sleep 1000` in a session of its own (out of the worker's group)."""
    import subprocess

    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    Path(path).write_text(str(child.pid))
    return child.pid


def spawn_session_chain(path: str) -> None:
    """Start A in a session of its own, which starts B (`sleep 1000`, its pid noted in
    ``path``) in another session of its own; then hang."""
    import shlex
    import subprocess

    note = shlex.quote(path)
    subprocess.Popen(["sh", "-c", f"setsid sleep 1000 & echo $! > {note}.tmp && "
                      f"mv {note}.tmp {note}; sleep 1000"], start_new_session=True)
    time.sleep(1000)


class Scale:
    """Methods for the command line's MODULE:Class.method."""

    @staticmethod
    def triple(x: int) -> int:
        return 3 * x

    def of_instances(self, x: int) -> int:
        return x

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a method of instances, cached
    def cached_of_instances(self, x: int) -> int:
        return x

    #: A module's function kept on the class: Scale.kept(x) is square(x).
    kept = square


class _Named(type):
    def named(cls, x: object) -> str:
        """A method of the metaclass: Metered.named is bound to the class."""
        return f"{cls.__name__}:{x}"


class Metered(metaclass=_Named):
    """A class whose metaclass gives it a method."""


class Grid:
    """Holds its data in a buffer pickled out of band, writable or not, as NumPy arrays
    do: it must come back as writable as it left."""

    def __init__(self, data: bytearray | bytes) -> None:
        self.data = data

    @property
    def writable(self) -> bool:
        return not memoryview(self.data).readonly

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        return (_grid_from, (pickle.PickleBuffer(self.data),))


def _grid_from(buffer: object) -> Grid:
    view = memoryview(buffer)  # type: ignore[arg-type]
    return Grid(view if view.readonly else view.cast("B"))  # type: ignore[arg-type]


def make_grid(args: tuple[int, bool]) -> Grid:
    size, writable = args
    return Grid(bytearray(size) if writable else bytes(size))


def fill_grid(grid: Grid) -> tuple[bool, int]:
    """Whether an item's grid arrived writable, and its size."""
    return grid.writable, len(memoryview(grid.data))


def make_bytearray(n: int) -> bytearray:
    return bytearray(b"x" * n)


def _die_once_then(marker: str) -> object:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # one worker alone wins this
    except FileExistsError:
        return square
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


class KilledOnceWhileLoading:
    """A function whose loading is SIGKILLed the first time (the OOM killer, say)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, x: int) -> int:
        return square(x)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_die_once_then, (self.marker,))


def with_table(table: bytes, args: tuple[int, str]) -> int:
    """kill_self_once with a large table bound in (a partial too big to carry per task)."""
    return kill_self_once(args) + len(table)


def stall_on(args: tuple[int, int, float]) -> int:
    """``x``, at once, except item ``stalled``, which sleeps ``seconds`` first."""
    x, stalled, seconds = args
    if x == stalled:
        time.sleep(seconds)
    return x


def start_then_fail(directory: str, allowed: int, hang: bool) -> None:
    """An initializer that lets the first ``allowed`` workers start; every later one
    (their replacements) hangs or raises."""
    starts = len(os.listdir(directory))
    Path(directory, str(os.getpid())).touch()
    if starts >= allowed:
        if hang:
            time.sleep(3600)
        raise LookupError("a replacement's initializer fails")


def slow_at_start(directory: str, nth: int, seconds: float) -> None:
    """An initializer whose ``nth`` start (counted in ``directory``) takes ``seconds``."""
    starts = len(os.listdir(directory))
    Path(directory, str(os.getpid())).touch()
    if starts + 1 == nth:
        time.sleep(seconds)


def _claim(directory: str) -> int:
    """The number of this start in ``directory``, claimed atomically."""
    for number in itertools.count():
        try:
            os.close(os.open(os.path.join(directory, str(number)),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def dies_while_told(directory: str) -> None:
    """An initializer: its worker kills itself while ``directory/until`` holds a time
    still to come (the OOM killer over a bad moment)."""
    _claim(directory)
    until = os.path.join(directory, "until")
    if os.path.exists(until) and time.time() < float(open(until).read() or 0):
        os.kill(os.getpid(), signal.SIGKILL)


def slow_then_failing(directory: str, seconds: float) -> None:
    """An initializer: the first two starts are quick, the third takes ``seconds``,
    every later one raises."""
    number = _claim(directory)
    if number == 2:
        time.sleep(seconds)
    elif number > 2:
        raise LookupError(f"start {number} fails")


def raise_first_hang_next(directory: str) -> None:
    """An initializer: the first start raises, every later one hangs."""
    if _claim(directory) == 0:
        raise LookupError("the first start fails")
    time.sleep(3600)


def on_path(entry: str) -> bool:
    """Whether ``entry`` is on this worker's import path."""
    return entry in sys.path


def note_and_nap(directory: str, seconds: float) -> None:
    """An initializer that notes its worker's pid in ``directory``, then sleeps."""
    Path(directory, str(os.getpid())).touch()
    time.sleep(seconds)


def hang_at_start(directory: str, nth: int) -> None:
    """An initializer that notes each start as ``<n>-<pid>``; from the ``nth`` (from
    0) on they hang, so a test can kill those workers while they initialise."""
    starts = len(os.listdir(directory))
    Path(directory, f"{starts}-{os.getpid()}").touch()
    if starts >= nth:
        time.sleep(3600)


class LoadingStops(BaseException):
    """Not an Exception: raised while a value is unpickled."""


def _stop_loading(how: str) -> None:
    if how == "exit":
        sys.exit(4)
    if how == "interrupt":
        raise KeyboardInterrupt
    raise LoadingStops("stopped while loading")


class StopsWhenLoaded:
    """Pickles fine; unpickling it raises a BaseException that is not an Exception."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_stop_loading, (self.how,))


def odd_outcome(args: tuple[int, str, str]) -> object:
    """Item 1 returns, or raises a ValueError carrying, a value that stops its loader."""
    x, where, how = args
    if x != 1:
        return x
    if where == "result":
        return StopsWhenLoaded(how)
    error = ValueError("carries a value that stops its loader")
    error.payload = StopsWhenLoaded(how)  # type: ignore[attr-defined]
    raise error


def exit_on_after(args: tuple[int, int, float]) -> int:
    """A poison item that works ``seconds`` first, so that its neighbours on a worker
    with several threads are running when it kills the process."""
    x, poison, seconds = args
    time.sleep(seconds)
    if x == poison:
        os._exit(7)
    return x


class SlowToPickle:
    """An item that takes ``seconds`` to pickle, and arrives as the number it holds."""

    def __init__(self, value: int, seconds: float) -> None:
        self.value, self.seconds = value, seconds

    def __reduce__(self):  # type: ignore[no-untyped-def]
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:  # pickling costs CPU, not a wait
            pass
        return (int, (self.value,))


class LoadsAsNumber(Exception):
    """An exception whose pickle rebuilds an int, not an exception."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (int, (5,))


def raise_loads_as_number(x: int) -> int:
    if x == 1:
        raise LoadsAsNumber("rebuilt as a number")
    return x


class LoadsAsExit(Exception):
    """An exception whose pickle rebuilds a SystemExit, a CancelledError or a
    KeyboardInterrupt (its argument says which)."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        kind = {"exit": SystemExit, "cancel": asyncio.CancelledError,
                "interrupt": KeyboardInterrupt}[self.args[0]]
        return (kind, (3,) if kind is SystemExit else ())


def raise_loads_as_exit(kind: str) -> int:
    raise LoadsAsExit(kind)


_DAEMON = """
import os, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
print(os.getpid(), flush=True)
fd = os.open(os.devnull, os.O_WRONLY)
os.dup2(fd, 1)
os.dup2(fd, 2)
time.sleep(60)
"""


def daemon_outlives_neighbours(args: tuple[float, str]) -> tuple[int, bool]:
    """Start a double-forked daemon (adopted at once by the fork server), note its pid
    in a file, wait while other workers come and go, and say whether it is still
    alive."""
    import subprocess

    seconds, path = args
    out = subprocess.run([sys.executable, "-c", _DAEMON], capture_output=True, text=True,
                         check=True).stdout
    pid = int(out.split()[0])
    Path(path).write_text(str(pid))
    time.sleep(seconds)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    return pid, True


def hang_or_die(args: tuple[int, int, int, float]) -> int:
    """Each item takes ``pace`` s; item ``hang_at`` then sleeps a minute, item
    ``die_at`` kills its worker (every time)."""
    x, hang_at, die_at, pace = args
    time.sleep(pace)
    if x == hang_at:
        time.sleep(60)
    if x == die_at:
        os._exit(7)
    return x


def fail_outside(parent: int) -> None:
    """An initializer that works in the parent's threads, fails in worker processes."""
    if os.getpid() != parent:
        raise RuntimeError("this initializer fails in worker processes")


def cancelled_kept(_: object) -> int:
    """How many cancelled calls the worker process running this still remembers."""
    import gc

    from asyncpool._worker import _Worker

    return sum(len(w.cancelled) for w in gc.get_objects() if isinstance(w, _Worker))


#: Releases the threads held by :func:`held` (thread and inline rungs only).
RELEASE = threading.Event()


def held(_: object) -> None:
    """Waits (in this process) until RELEASE is set, or a minute."""
    RELEASE.wait(60)


def lock_at_five(x: int) -> object:
    """Item 5's result is a lock, which does not pickle."""
    return threading.Lock() if x == 5 else x


def note_then_nap(args: tuple[str, int, float]) -> int:
    """Notes item ``i`` as started in ``directory``, then sleeps."""
    directory, i, seconds = args
    Path(directory, str(i)).touch()
    time.sleep(seconds)
    return i


class Halt(BaseException):
    """A task's own BaseException (not an Exception)."""


def halt(x: int) -> int:
    raise Halt(f"halted at {x}")


def fail_on_cluster() -> None:
    """An initializer that raises an OSError of its own on the machines whose
    environment says ON_CLUSTER (a file they lack)."""
    if os.environ.get("ON_CLUSTER"):
        raise FileNotFoundError("no /data/model.bin on this machine")


def slow_on_cluster(path: str, seconds: float) -> None:
    """An initializer that notes its pid in a file, then sleeps, on the machines whose
    environment says ON_CLUSTER (elsewhere it does nothing)."""
    if os.environ.get("ON_CLUSTER"):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)


def die_on_cluster() -> None:
    """An initializer that kills its process where the environment says ON_CLUSTER."""
    if os.environ.get("ON_CLUSTER"):
        os._exit(7)


def comm_error_on_cluster() -> None:
    """An initializer that raises a connection error of its own (it talks to a
    service through Dask's comms) where the environment says ON_CLUSTER."""
    if os.environ.get("ON_CLUSTER"):
        from distributed.comm.core import CommClosedError

        raise CommClosedError("its own connection to the model store closed")


def raise_pool_errors(x: int) -> int:
    """Item 1 raises the pool's SerializationError and item 2 its FunctionUnavailable,
    as the task's own errors (a wrapper around another pool would)."""
    from asyncpool import FunctionUnavailable, SerializationError

    if x == 1:
        raise SerializationError(f"my own words at {x}")
    if x == 2:
        raise FunctionUnavailable(f"my own unavailable at {x}")
    return x


def noted_poison(args: tuple[str, int, int, frozenset[int]]) -> tuple[int, int]:
    """Note each run of item (caller, x) in ``directory``; items in ``poison`` kill the
    fork server (this worker's parent), and with it every worker."""
    directory, caller, x, poison = args
    with open(os.path.join(directory, f"{caller}-{x}"), "a") as f:
        f.write("ran\n")
    if x in poison:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
    time.sleep(0.01)
    return caller, x


def say(x: int) -> int:
    """Print to the worker's standard output (the caller's terminal, say)."""
    print(f"said {x}", flush=True)
    return x


class KillsWhenPickled(Exception):
    """Pickling it (as a result, or raised) kills the process: a worker OOM-killed as it
    sends a big result back, say."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        os._exit(9)


def deadly_result(x: int) -> object:
    """``x``, except for 2: a result whose pickling kills the worker (4: raised)."""
    if x == 4:
        raise KillsWhenPickled()
    return KillsWhenPickled() if x == 2 else x


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception that refuses every attribute set on it (a frozen dataclass)."""

    code: int


def raise_frozen(x: int) -> int:
    if x == 2:
        raise FrozenError(x)
    return x


def fail_late_and_early(x: int) -> int:
    """Item 1 fails after 0.5 s, item 4 at once: the later failure is the earlier item."""
    if x == 1:
        time.sleep(0.5)
        raise ValueError("item 1 failed")
    if x == 4:
        raise ValueError("item 4 failed")
    return x


def many_records(count: int) -> list[dict[str, object]]:
    """Results of many small objects: their pickle takes long to load (no big bytes)."""
    return [{"id": i, "name": str(i)} for i in range(count)]


def raise_many_records(count: int) -> None:
    """An error that carries many small objects (a validation error and its rows)."""
    raise ValueError(many_records(count))



def noted(args: tuple[str, str, int]) -> object:
    """Appends a dot to file ``path`` per run, then: ``"records"``: many_records(n);
    ``"nap"``: sleeps n s; ``"exit"``: os._exit(n)."""
    kind, path, n = args
    with open(path, "a") as f:
        f.write(".")
    if kind == "records":
        return many_records(n)
    if kind == "nap":
        time.sleep(n)
        return n
    os._exit(n)


class ReadOnlyCause(Exception):
    """An exception whose ``__cause__`` is a property of its own, with no setter."""

    @property  # type: ignore[override]
    def __cause__(self) -> BaseException | None:  # type: ignore[override]
        return None


def raise_read_only_cause(x: int) -> int:
    if x == 2:
        raise ReadOnlyCause(x)
    return x


class SentSlowly:
    """Pickles in ``seconds`` (a big result, say), as the string "sent"."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)
        return (str, ("sent",))


def sent_slowly_then_exit(x: int) -> object:
    """0: a result that takes 1 s to pickle; 1: exits (code 3) after 0.3 s."""
    if x == 0:
        return SentSlowly(1.0)
    time.sleep(0.3)
    os._exit(3)


def _loaded_slowly(seconds: float) -> str:
    time.sleep(seconds)
    return "loaded"


class LoadsSlowly:
    """Unpickling it takes ``seconds`` (in the process that loads it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_loaded_slowly, (self.seconds,))


def slow_to_load_then_exit(args: tuple[int, float]) -> object:
    """0: a big result (loaded in a thread) that takes ``seconds`` to load; 1: exits
    after 0.3 s (the results before it sent meanwhile)."""
    x, seconds = args
    if x == 0:
        return [LoadsSlowly(seconds), many_records(20_000)]
    time.sleep(0.3)
    os._exit(3)


def killed_as_sent_then_nap(x: int) -> object:
    """0: a result whose pickling kills the worker (sent as 1 naps); 1: naps 0.5 s."""
    if x == 0:
        return KillsWhenPickled()
    time.sleep(0.5)
    return x


class ClassUnreadable(Exception):
    """Reading its ``__class__`` raises (isinstance does, for a class it is not of)."""

    def __getattribute__(self, name: str) -> object:
        if name == "__class__":
            raise RuntimeError("no class here")
        return super().__getattribute__(name)


def raise_class_unreadable(x: int) -> int:
    raise ClassUnreadable(x)


def asserts_run() -> bool:
    """Whether this module's asserts run (not under ``python -O``)."""
    try:
        assert False  # noqa: B011, PT015
    except AssertionError:
        return True
    return False


def deprecation_raises() -> bool:
    """Whether a DeprecationWarning is an error here (``-W error::DeprecationWarning``)."""
    import warnings

    try:
        warnings.warn("old", DeprecationWarning, stacklevel=1)
    except DeprecationWarning:
        return True
    return False


def become_sleep(seconds: int) -> None:
    """The worker process becomes ``sleep`` (exec): it never answers."""
    os.execv("/bin/sleep", ["sleep", str(seconds)])


def total_size(blobs: object) -> int:
    """The bytes in a list, tuple or dict's values of ``bytes``."""
    return sum(len(b) for b in (blobs.values() if isinstance(blobs, dict) else blobs))  # type: ignore[attr-defined]
