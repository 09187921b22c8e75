"""What runs on a Dask worker: a chunk's task, and what the client process tells it.

The dask rung submits :func:`run_on_cluster` (by reference: the workers import this
module). Where the pool has an initializer, the chunk runs under that pool's turn (see
:mod:`asyncpool._turns`): the state of the worker's process is its initializer's. This
module imports little: it loads in every worker process of the cluster.
"""

from __future__ import annotations

import threading

from . import _turns
from ._errors import InitializerFailed
from ._execute import dump_results, execute, loads
from ._remote import encode_errors
from ._share import cluster_function, run_initializer

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from collections.abc import Set as AbstractSet
    from typing import Any

    from . import _wire

    #: (the results' pickle and its out-of-band buffers, errors, (seconds, retries),
    #: why the function could not be loaded or None, why the arguments could not be).
    Answer = tuple[list[bytes | bytearray], list[tuple[int, bytes, str]],
                   tuple[list[float], int], str | None, str | None]

#: Calls each client process stopped: a Dask worker's running chunks skip their items
#: not started (Dask cannot stop a task that runs). At most 4,096 for each.
_cluster_cancelled: dict[str, set[int]] = {}
#: Why a pool's initializer failed on a Dask worker of this process (one that joined,
#: or restarted, or where it ran again for a chunk), by its plugin's name and the
#: worker's address: the pool's tasks must not run there uninitialised.
cluster_init_failures: dict[tuple[str, str], str] = {}


def forget_space(space: str) -> None:
    """The pool whose client process and pool are ``space`` closed (its functions went
    with its namespace)."""
    _cluster_cancelled.pop(space, None)


def cancel_on_cluster(space: str, calls: list[int]) -> None:
    """Run on each Dask worker (``client.run``) when the client process stops calls."""
    found = _cluster_cancelled.setdefault(space, set())
    if len(found) + len(calls) > 4096:
        found.clear()
    found.update(calls)


class _NotRun(_turns.Unchanged):
    """The chunk's turn came in vain: its pool left ("left"), or every call of it
    stopped."""


def run_on_cluster(blobs: list[bytes], arguments: _wire.Parts, retries: int, space: str,
                   versions: Sequence[int] = (), initializer: str | None = None) -> Answer:
    """What the dask rung runs on a Dask worker (see :data:`Answer`).

    ``arguments`` is the runs' pickle (function index, star, call id, items) and its
    buffers, made by the rung: an item that does not unpickle here fails its chunk
    (which the rung splits), not the task. ``space`` names the client process,
    ``versions`` orders the functions' pickles (see :func:`cluster_function`). Raises
    InitializerFailed if the pool's ``initializer`` (its plugin's name) failed here.
    """
    plugin: Any = None
    mark = initializer or "", ""
    if initializer is not None:
        from distributed import get_worker

        worker = get_worker()
        mark = initializer, worker.address
        failed = cluster_init_failures.get(mark)
        if failed is not None:
            raise InitializerFailed(f"the initializer failed on this Dask worker: {failed}")
        plugins: Any = worker.plugins
        plugin = plugins.get(initializer)
    functions = []
    for index, blob in enumerate(blobs):
        # Each task carries its function's pickle: loaded once per worker process.
        try:
            functions.append(cluster_function(
                space, blob, versions[index] if index < len(versions) else 0, loads))
        except BaseException as exc:
            return [], [], ([], 0), repr(exc), None
    try:
        runs: list[tuple[int, bool, int, list[Any]]] = loads(arguments[0], arguments[1:])
    except BaseException as exc:
        return [], [], ([], 0), None, repr(exc)
    cancelled = _cluster_cancelled.setdefault(space, set())
    if len(_cluster_cancelled) > 1024:  # pools long gone (those without a plugin)
        _cluster_cancelled.pop(list(_cluster_cancelled)[0], None)
    bound = [(functions[f], star, call, items) for f, star, call, items in runs]

    def wanted() -> bool:
        """Whether an item of the chunk is still wanted (its client may be gone)."""
        return any(call not in cancelled for _, _, call, _ in runs) and _task_wanted()

    everything = {call for _, _, call, _ in runs}  # (to skip, when none is wanted)
    if plugin is None:
        return _run(bound, retries, cancelled)
    if not wanted():
        return _run(bound, retries, everything)

    ours: dict[str, Any] = vars(plugin)  # (its blob, space and timeout: see _dask_plugin)

    def again() -> None:
        """Another pool's initializer ran in this process since this pool's did (or
        was running as this pool opened): this pool's runs again, within its
        start_timeout, unless the pool left or stopped these calls meanwhile."""
        if worker.plugins.get(mark[0]) is not plugin or not wanted():
            raise _NotRun("left" if worker.plugins.get(mark[0]) is not plugin else "")
        try:
            _bounded(lambda: run_initializer(ours["blob"], ours["space"], loads),
                     ours["timeout"])
        except BaseException as exc:
            if isinstance(exc, TimeoutError):  # (not again: each would hang a thread)
                cluster_init_failures[mark] = f"{exc!r} (run there again for this pool)"
            raise InitializerFailed(f"the initializer raised on this Dask worker, where "
                                    f"it ran again for this pool (another pool's had "
                                    f"run there since): {exc!r}") from exc

    try:
        if not _turns.enter(ours["space"], again):
            raise InitializerFailed("the pool left this Dask worker while its initializer "
                                    "ran there")
    except _NotRun as not_run:
        if not_run.args[0]:
            raise InitializerFailed("the pool left this Dask worker") from None
        return _run(bound, retries, everything)
    try:
        return _run(bound, retries, cancelled)
    finally:
        _turns.leave()


def _task_wanted() -> bool:
    """Whether Dask still wants the task this thread runs (not once its client is gone,
    or it was released)."""
    try:
        import distributed.utils
        from distributed import get_worker

        key = getattr(vars(distributed.utils)["thread_state"], "key", None)
        tasks: Any = get_worker().state.tasks
    except Exception:  # pragma: no cover - another version of distributed
        return True
    task = tasks.get(key)
    return key is None or (task is not None and task.state not in (
        "cancelled", "released", "forgotten"))


def _bounded(run: Callable[[], None], timeout: float | None) -> None:
    """``run()``, in a thread of its own given ``timeout`` seconds (TimeoutError: it
    goes on, unwaited for); its error raised here."""
    if timeout is None:
        run()
        return
    ended: list[BaseException | None] = []
    given_up: list[bool] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:
            ended.append(exc)
        else:
            ended.append(None)
        if given_up:  # (what it set since is nobody's state)
            _turns.spoiled()

    thread = threading.Thread(target=target, name="asyncpool-initializer", daemon=True)
    thread.start()
    thread.join(timeout)
    if not ended:
        given_up.append(True)
        raise TimeoutError(f"it did not return within start_timeout ({timeout} s)")
    if ended[0] is not None:
        raise ended[0]


def _run(runs: list[Any], retries: int, cancelled: set[int]) -> Answer:
    results: list[Any] = []
    errors: dict[int, BaseException] = {}
    spent: list[tuple[list[float], int]] = [([], 0)]

    def tick(first: int, upto: int, done: list[Any], failed: dict[int, BaseException],
             end: tuple[list[float], int] | None) -> tuple[AbstractSet[int], bool]:
        results.extend(done)
        errors.update(failed)
        if end is not None:
            spent[0] = end
        return cancelled, False

    execute(runs, retries, tick, skip=cancelled)
    # As the wire does: a writable buffer (a NumPy array's data) comes back writable.
    parts = [bytes(part) if memoryview(part).readonly else bytearray(part)
             for part in dump_results(results)]
    return parts, encode_errors(errors), spent[0], None, None
