"""Running items, wherever they run: each item with its own outcome.

Threads of the thread rung call :func:`execute` directly; worker processes
(:mod:`asyncpool._worker`) and Dask workers (:mod:`asyncpool._cluster`) call it on
what they unpickled. What their errors become on the way back is :mod:`asyncpool._remote`'s.
This module imports little: worker processes load it.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import types

from . import _wire
from ._errors import FunctionUnavailable, RemoteError, pool_made
from ._handover import Running, unwatch, watch
from ._retry import retry_again, task_retry_delays

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from collections.abc import Set as AbstractSet
    from typing import Any

    #: One run of a chunk: (function, star, call id, items).
    Run = tuple[Callable[..., Any], bool, int, Sequence[Any]]
    #: Hands over a slice of a chunk: (first position, end, results, errors by
    #: position, and with the last slice only: (seconds spent on each run, retries
    #: made)).
    Tick = Callable[[int, int, list[Any], dict[int, BaseException],
                     tuple[list[float], int] | None], tuple[AbstractSet[int], bool]]

    from ._handover import Late

#: A worker sends what finished at least this often (seconds), so a caller's result
#: does not wait for the rest of its chunk, and a crash loses at most this much work.
FLUSH_SECONDS = 0.005


def load_site() -> None:
    """Process .pth files now, in an interpreter started without ``site`` (-S)."""
    if sys.flags.no_site and "site" not in _loaded:
        _loaded.add("site")
        import site

        site.main()


_loaded: set[str] = set()


def loads(data: Any, buffers: Any = ()) -> Any:
    """``pickle.loads``; a module not found is looked for again once ``site`` ran."""
    try:
        return pickle.loads(data, buffers=buffers)
    except ImportError:
        if not sys.flags.no_site or "site" in _loaded:
            raise
    load_site()
    return pickle.loads(data, buffers=buffers)


#: What a task may not return: each runs only where it is iterated or awaited (on the
#: caller's loop, from a thread), or cannot leave its worker at all.
_LAZY = {types.GeneratorType: "a generator", types.CoroutineType: "a coroutine",
         types.AsyncGeneratorType: "an async generator"}


def plain(value: Any) -> None:
    """TypeError if a task's result ``value`` is a generator or a coroutine (its
    function is one behind a wrapper the pool cannot see through, say)."""
    kind = _LAZY.get(type(value))
    if kind is not None:
        if type(value) is not types.AsyncGeneratorType:
            value.close()  # (not "never awaited" at collection)
        wanted = "what it awaits" if kind == "a coroutine" else "a list of what it yields"
        raise pool_made(TypeError(f"the function returned {kind}, which nothing here "
                                  f"iterates or awaits: pass one that returns {wanted}"))


def call_item(fn: Callable[..., Any], item: Any, star: bool, retries: int,
              retried: list[int], call: int = 0, skip: AbstractSet[int] = frozenset()
              ) -> Any:
    """``fn(item)``, retrying transient resource errors with backoff (counted in
    ``retried[0]``) while its ``call`` is not among those to ``skip`` (a live set: its
    deadline passed, or it was cancelled, as it waited)."""
    try:
        return fn(*item) if star else fn(item)
    except Exception as exc:
        if not retry_again(exc, 0, retries):
            raise
        last = exc
    delays = task_retry_delays()  # made only after a failure: the loop above is hot
    attempt = 1
    while True:
        until = time.monotonic() + next(delays)
        while call not in skip and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.01))  # (the next call waits for no backoff it dropped)
        if call in skip:
            raise last
        retried[0] += 1
        try:
            return fn(*item) if star else fn(item)
        except Exception as exc:
            if not retry_again(exc, attempt, retries):
                raise
            last = exc
        attempt += 1


def own_frames_dropped(exc: BaseException) -> BaseException:
    """``exc`` without the pool's own frames at the front of its traceback: they hold
    the chunk, and the error itself (a cycle, which kept a failed call's arguments
    until the cyclic GC ran). One whose class cannot even be read (a __getattribute__
    of its own that raises: every isinstance on it would) comes as a RemoteError."""
    try:
        exc.__class__  # noqa: B018 - read as isinstance reads it
    except BaseException as problem:  # noqa: BLE001 - its own code: a SystemExit too
        name = type(exc).__qualname__
        return RemoteError(f"the task raised {name}, whose class cannot be read "
                           f"({type(problem).__name__}: {problem})", type_name=name)
    tb = exc.__traceback__
    while tb is not None and str(tb.tb_frame.f_globals.get("__name__")).startswith(
            "asyncpool."):
        tb = tb.tb_next
    return exc.with_traceback(tb)  # (not through __setattr__: a frozen dataclass's refuses)


#: Not empty in a process that a task forked and that came back into this code (its
#: child raised or returned instead of calling ``os._exit``): it must not run another
#: item, nor write to the worker's socket (see :func:`leave_if_forked`).
FORKED: list[bool] = []


def leave_if_forked(error: BaseException | None = None) -> None:
    """In such a process, exit: as ``sys.exit`` would if it raised ``SystemExit``
    (exit handlers run, its code), else with code 70."""
    if not FORKED:
        return
    code = 70
    if isinstance(error, SystemExit):
        import atexit

        # Private, but the only way to run the exit handlers here: the process leaves
        # with os._exit, since a SystemExit would unwind into the worker's loop.
        atexit._run_exitfuncs()
        code = error.code if isinstance(error.code, int) else 0 if error.code is None else 1
        if not isinstance(error.code, int | None):
            sys.stderr.write(f"{error.code}\n")  # as the interpreter's own exit does
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def cut_runs(runs: list[Any], keep: int) -> bool:
    """Cut a running chunk's lists of items (and of runs) after its first ``keep``
    items, which ends the loops over them; False if nothing could be cut. The running
    thread notes an item's position before it fetches the item, so if the position
    read before the cut is still there after it, no item past it will run."""
    if keep >= sum(len(items) for _, _, _, items in runs):
        return False
    seen = 0
    for index, (_, _, _, items) in enumerate(runs):
        if seen + len(items) >= keep:
            if not isinstance(items, list):
                return False
            del items[keep - seen:]
            del runs[index + 1:]
            return True
        seen += len(items)
    return False


def cut_after_running(runs: list[Any], progress: Any) -> int | None:
    """Cut a running chunk (its ``runs``, its ``progress``) after the item it runs:
    how many of its items will have run, or None if it is not known (it runs no item
    yet, nothing is left to cut, or it moved on meanwhile: its end report says)."""
    at = int(progress[_wire.POSITION])
    if at < 0 or not cut_runs(runs, at + 1) or int(progress[_wire.POSITION]) != at:
        return None
    return at + 1


def execute(runs: Sequence[Run], retries: int, tick: Tick, progress: Any = None,
            skip: AbstractSet[int] = frozenset(),
            flush: float = FLUSH_SECONDS, late: Late | None = None,
            shared: list[Any] | None = None, each: bool = False) -> tuple[int, float]:
    """Run every item of ``runs``; returns (where it stopped, seconds spent).

    ``tick(first, upto, results, errors, end)`` hands over positions [first, upto) at
    least every ``flush`` seconds and at the end (the only time ``end``, the seconds
    spent and retries made, is given), and answers which calls to skip and whether to
    stop. Items of the calls in ``skip`` are not run. ``progress[POSITION]`` is set to the
    position of each item before it starts, for the parent to read after a crash.
    ``late(first, upto, results, errors)``, if given, is called from another thread
    with what finished before an item that runs long (see :mod:`asyncpool._handover`);
    its :class:`~asyncpool._handover.Running` is then put in ``shared``, if given.
    Results that are generators or coroutines fail their items (see :func:`plain`):
    each result is looked at with ``each`` (where none is pickled), else those of a
    run till one is plain (where pickling fails the others).
    """
    results: list[Any] = []
    append = results.append
    errors: dict[int, BaseException] = {}
    started = last = time.perf_counter()
    position = 0
    retried = [0]
    running = None
    if late is not None:
        running = Running(results, errors, late)
        watch(running)
        if shared is not None:
            shared.append(running)
    # The last item's results go with the end, in one message: a caller that has every
    # result then never sees its chunk still in flight.
    total = sum(len(items) for _, _, _, items in runs)
    # The next item's position is noted before it is fetched from its list: a thread
    # that cuts the lists short and then still reads the position it saw knows that
    # nothing past it will run (see cut_runs).
    if progress is not None and total:
        progress[_wire.POSITION] = 0
    # Each run's own time: runs of several calls share a chunk, and a quick function
    # must not be taken for as slow as the one beside it.
    spent: list[float] = []
    forked = FORKED
    value = None
    try:
        for fn, star, call, items in runs:
            begun = time.perf_counter()
            checked = False  # what a run's function returns: looked at till it is plain
            for item in items:
                if call in skip:
                    append(SKIPPED)
                else:
                    try:
                        value = (call_item(fn, item, star, retries, retried, call, skip)
                                 if retries else fn(*item) if star else fn(item))
                        if not checked:
                            plain(value)
                            checked = not each
                        append(value)
                    except BaseException as exc:
                        # SystemExit and KeyboardInterrupt too: they are the item's
                        # outcome, and must not end the worker. The error goes in
                        # first: the watcher takes an appended result as finished.
                        errors[position] = own_frames_dropped(exc)
                        append(None)
                    if forked:
                        leave_if_forked(errors.get(position))
                position += 1
                if position < total:
                    now = time.perf_counter()
                    if now - last >= flush:
                        last = now
                        skip, stop = _hand(running, tick, position, results, errors, None)
                        errors = running.errors if running is not None else {}
                        if stop:
                            return position, now - started
                    if progress is not None:
                        progress[_wire.POSITION] = position
            spent.append(time.perf_counter() - begun)
        seconds = time.perf_counter() - started
        _hand(running, tick, position, results, errors, (spent, retried[0]))
        return position, seconds
    finally:
        if running is not None:
            unwatch(running)
        # A task's error holds this frame (its frame's caller) for as long as it
        # lives: not the errors (a cycle) or the results and items with them.
        del results, append, errors, runs, running, value


def _hand(running: Running | None, tick: Tick, position: int, results: list[Any],
          errors: dict[int, BaseException], end: tuple[list[float], int] | None
          ) -> tuple[AbstractSet[int], bool]:
    """Hand over every result not handed over yet (some the watcher may have)."""
    if running is None:
        answer = tick(position - len(results), position, results, errors, end)
        results.clear()
        return answer
    with running.lock:
        answer = tick(running.flushed, position, running.results, running.errors, end)
        running.flushed = position
        results.clear()
        running.errors = {}
    return answer


class _Skipped:
    def __repr__(self) -> str:
        return "<skipped>"

    def __reduce__(self) -> str:
        return "SKIPPED"


#: Stands for an item that was not run because its call was cancelled.
SKIPPED = _Skipped()


def dump_results(results: list[Any]) -> _wire.Parts:
    """Pickled results; one that will not pickle becomes its item's error, alone."""
    # Big results travel out of band: the parent reads them into place. A few results
    # are looked at one by one; many are, only if their pickle turned out big.
    wrapped = len(results) <= 64
    try:
        parts = _wire.dumps_any(_wire.wrap_big(results) if wrapped else results)
        if not wrapped and len(parts[0]) >= _wire.SMALL_FRAME:
            parts = _wire.dumps_any(_wire.wrap_big(results))
    except BaseException:
        parts = []
    if parts:
        return parts
    fixed = []
    for value in results:
        try:
            _wire.dumps_any(value)
            fixed.append(value)
        except BaseException as exc:
            fixed.append(Unsendable(f"its result, a {type(value).__qualname__}, cannot be "
                                     f"pickled back to the parent ({exc!r}); return plain "
                                     "data instead"))
    return _wire.dumps_any(fixed)


class Unloadable:
    """Stands for a function the worker could not unpickle; calling it says why."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self, *args: Any) -> Any:
        raise pool_made(FunctionUnavailable(
            f"the function could not be loaded in the worker ({self.exc!r}); define it "
            "in a module the workers can import, or at module level of the main script"
        )) from self.exc


class Unsendable:
    """Stands for a result that could not be pickled (the parent makes it an error)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unsendable, (self.reason,))
