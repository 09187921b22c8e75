"""The exceptions asyncpool raises.

::

    AsyncPoolError
     +-- PoolClosed            a call on a pool that is closed, never entered, or on
     |                         another event loop (also RuntimeError)
     +-- WorkerCrashed         an item whose worker died every time it ran
     +-- SerializationError    an item, function or result that cannot cross to a
     |    |                    worker (also TypeError)
     |    +-- FunctionUnavailable  the function itself cannot run in the workers:
     |                             the whole call fails, once
     +-- DeadlineExceeded      the call ran past `timeout` (also TimeoutError); `.partial`
     +-- RemoteError           a task's exception that cannot be rebuilt in the caller,
     |                         or a SystemExit / KeyboardInterrupt raised by a task
     +-- InitializerFailed     the worker initializer raised (the cause is its error),
     |                         killed its worker, or outlasted start_timeout
     +-- PoolUnavailable       no rung of the ladder could start (the cause is the last
                               rung's error; also RuntimeError)

A task's own exception reaches the caller as itself, with the worker's traceback as its
``__cause__`` (a [`RemoteTraceback`][asyncpool.RemoteTraceback]). Cancellation
exceptions pass through
untouched. Every exception here pickles, and each can be built from a message alone.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from typing import Any, Final, TypeVar

    E = TypeVar("E", bound=BaseException)


class _Missing:
    """The type of [`MISSING`][asyncpool.MISSING]: a result that was not computed."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "asyncpool.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
"""Stands for each item that had not finished, in `DeadlineExceeded.partial` and
`PoolClosed.partial`.

Examples:
    ```python
    try:
        results = await pool.map(fn, items, timeout=5)
    except DeadlineExceeded as exc:
        done = [r for r in exc.partial if r is not MISSING]
    ```
"""


class AsyncPoolError(Exception):
    """Base class of every error asyncpool raises itself (a task's own exceptions
    reach the caller as themselves, not as this).

    Examples:
        ```python
        try:
            result = await pool.run(fn, x)
        except AsyncPoolError as exc:  # the pool's doing, not fn's
            log.warning("offloading failed: %s", exc)
        ```
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes survive pickling (the default keeps only ``args``).
        return (_rebuild, (type(self), str(self), self.__dict__))


def _rebuild(cls: type[AsyncPoolError], message: str, state: dict[str, Any]) -> AsyncPoolError:
    error = cls(message)
    error.__dict__.update(state)
    return error


class PoolClosed(AsyncPoolError, RuntimeError):
    """The pool is closed, was never entered with ``async with``, or belongs to
    another event loop (or to the process that forked this one).

    Raised by `run`, `map`, `starmap` and `imap` when called so, and by calls still
    waiting when `aclose()` ends them: those carry ``partial`` and ``start`` as
    [`DeadlineExceeded`][asyncpool.DeadlineExceeded] does (what finished, in input
    order, [`MISSING`][asyncpool.MISSING] for the rest).

    Examples:
        ```python
        pool = ResilientPool()
        await pool.run(abs, -1)  # PoolClosed: enter it with `async with` first
        ```
    """

    def __init__(self, message: str = "", partial: list[Any] | None = None,
                 start: int = 0) -> None:
        super().__init__(message)
        self.partial: list[Any] = [] if partial is None else partial
        self.start = start


class WorkerCrashed(AsyncPoolError):
    """An item killed the worker process that ran it, each time it was tried.

    ``index`` is the item's position in the input and ``exitcode`` the worker's exit
    code (negative: the signal that killed it), where known. Raised by `run`, `map`,
    `starmap` and `imap` for that item (or put in its place with
    ``return_exceptions=True``); the other items are not affected.

    Examples:
        ```python
        results = await pool.map(parse, files, return_exceptions=True)
        crashed = [r.index for r in results if isinstance(r, WorkerCrashed)]
        ```
    """

    def __init__(self, message: str = "", *, index: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.exitcode = exitcode


class SerializationError(AsyncPoolError, TypeError):
    """An argument, function or result could not be pickled or unpickled.

    Raised by `run`, `map`, `starmap` and `imap` for the item at fault (its message
    says which item, which side and why; the other items are not affected), or for
    the whole call when its function cannot be pickled.

    Examples:
        ```python
        import threading

        await pool.run(len, threading.Lock())  # SerializationError: item 0 ...
        ```
    """

    #: The input index of the item at fault, when the error is one item's.
    index: int | None = None


class FunctionUnavailable(SerializationError):
    """The workers cannot load the call's function (its module is not importable
    there, or unpickling it fails or kills the worker): the whole call fails with this,
    once, even with ``return_exceptions``. Raised by `run`, `map`, `starmap` and
    `imap`; install the function's module where the workers run (a Dask cluster's
    workers), or define it at module level.

    Examples:
        ```python
        try:
            await pool.map(mylib.work, items)
        except FunctionUnavailable as exc:
            log.error("the cluster lacks mylib: %s", exc)
        ```
    """


class DeadlineExceeded(AsyncPoolError, TimeoutError):
    """The call passed its deadline.

    ``partial`` lists, in input order, every result that had finished (exceptions in
    place with ``return_exceptions``) and [`MISSING`][asyncpool.MISSING] for the rest.
    For ``imap`` it starts at input index ``start``, the first item not yet yielded; for ``map`` and
    ``run``, ``start`` is 0. For ``imap(..., ordered=False)`` it lists, in the order
    they finished, the results not yet yielded (no `MISSING`: which items are left is
    not tracked), and ``start`` is how many were yielded. Raised by `run`, `map`,
    `starmap` and `imap` given a ``timeout``, at the deadline, whatever the call was
    waiting for.

    Examples:
        ```python
        try:
            results = await pool.map(fn, items, timeout=2.0, kill_on_timeout=True)
        except DeadlineExceeded as exc:
            results = exc.partial  # MISSING where an item had not finished
        ```
    """

    def __init__(self, message: str = "", partial: list[Any] | None = None,
                 start: int = 0) -> None:
        super().__init__(message)
        self.partial: list[Any] = [] if partial is None else partial
        self.start = start


class RemoteError(AsyncPoolError):
    """An exception raised in a worker that cannot be rebuilt here as itself.

    It happens when the exception's class cannot be unpickled in the caller (its
    ``__init__`` needs arguments that ``args`` does not hold, or its module is not
    importable here), and for a ``SystemExit`` or ``KeyboardInterrupt`` raised by a
    task, which must not end the caller. ``type_name`` is the original class's
    qualified name, ``traceback`` the worker's traceback as text, and ``exitcode``
    the code of a ``SystemExit`` (as ``WorkerCrashed.exitcode`` is a process's).
    Raised by `run`, `map`, `starmap` and `imap` in place of such an exception.

    Examples:
        ```python
        try:
            await pool.run(sys.exit, 3)
        except RemoteError as exc:
            assert exc.type_name == "SystemExit" and exc.exitcode == 3
        ```
    """

    def __init__(self, message: str = "", *, type_name: str = "", traceback: str = "",
                 exitcode: int | str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback = traceback
        self.exitcode = exitcode


class PoolUnavailable(AsyncPoolError, RuntimeError):
    """No rung of the ladder could start: every try of each failed, or it cannot run
    here. The ``__cause__`` is the last rung's error (``BlockingIOError`` when the
    machine has no process left, ``RuntimeError`` when no thread can start).

    Raised by ``async with ResilientPool(...)`` when opening the pool, and by the calls
    waiting while the pool starts its rungs again; the pool stays open and tries again
    for the next call. With the default ladder (its last rung inline) it is not raised.

    Examples:
        ```python
        try:
            async with ResilientPool(rungs=("process",)) as pool:
                ...
        except PoolUnavailable as exc:
            log.error("no worker could start: %r", exc.__cause__)
        ```
    """

    @classmethod
    def after(cls, error: BaseException | None) -> PoolUnavailable:
        """No rung started; ``error`` stopped the last one (the ``__cause__``)."""
        failure = cls("no rung of the ladder could start" + (
            f" (the last: {error!r})" if error is not None else ""))
        failure.__cause__ = error
        return failure


class InitializerFailed(AsyncPoolError):
    """The ``initializer`` raised in a worker (its exception is the ``__cause__``),
    killed the worker, or did not return within ``start_timeout`` (no cause).

    Raised by ``async with ResilientPool(...)`` when opening the pool, and by calls
    when it starts failing in replacement workers.

    Examples:
        ```python
        try:
            async with ResilientPool(initializer=load_model, start_timeout=30) as pool:
                ...
        except InitializerFailed as exc:
            log.error("workers could not start: %s", exc.__cause__)
        ```
    """

    @classmethod
    def raised(cls, initializer: object, error: BaseException,
               where: str = "in a worker") -> InitializerFailed:
        """It raised ``error`` (the ``__cause__``) ``where``."""
        failure = cls(f"the initializer {initializer!r} raised {where}: {error!r}")
        failure.__cause__ = error
        return failure

    @classmethod
    def timed_out(cls, initializer: object, start_timeout: float | None,
                  where: str = "") -> InitializerFailed:
        """It did not return within ``start_timeout`` (``where``: how it ran)."""
        return cls(f"the initializer {initializer!r} did not return within "
                   f"start_timeout={start_timeout} s{where}")


class RemoteTraceback(Exception):
    r"""The formatted traceback of an exception raised in a worker.

    It is the ``__cause__`` of a task's own exception, so that the caller's traceback
    shows where in the worker it was raised. Never raised by itself.

    Examples:
        ```python
        try:
            await pool.run(int, "x")
        except ValueError as exc:
            log.error("failed in the worker\n%s", exc.__cause__)  # its traceback
        ```
    """

    def __init__(self, tb: str = "") -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def exit_described(exitcode: int | None) -> str:
    """A worker's exit code, with the signal that ended it: "exit code -9, SIGKILL"."""
    import signal

    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"exit code {exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


#: Set on the serialization errors the pool itself makes (in a worker or here): one a
#: task raised as its own error is that item's error, left as it is.
_POOL_MADE = "asyncpool_made"


def pool_made(exc: E) -> E:
    """``exc``, marked as the pool's own (the mark travels with its pickle)."""
    setattr(exc, _POOL_MADE, True)
    return exc


def is_pool_made(exc: BaseException) -> bool:
    """Whether the pool made ``exc`` (not a task that raised one of its classes)."""
    return getattr(exc, _POOL_MADE, False) is True


def fresh(error: E) -> E:
    """A copy of ``error`` for one more caller, with its cause: one object raised in
    many calls gathers every caller's frames in its traceback (and keeps them alive).
    ``error`` itself if it cannot be copied."""
    import copy

    try:
        clone = copy.copy(error)
    except Exception:
        return error
    if type(clone) is not type(error):
        return error
    clone.__cause__, clone.__suppress_context__ = error.__cause__, error.__suppress_context__
    return clone


def public(*objects: Any) -> None:
    """Name these as the package's own: ``asyncpool.RemoteError`` in tracebacks and
    reprs, not the module that defines them (pickles name them so too; the package
    loads each on first use). Not for a class whose annotations name private types:
    ``typing.get_type_hints`` looks them up in the module it names."""
    for obj in objects:
        obj.__module__ = "asyncpool"


public(AsyncPoolError, PoolClosed, WorkerCrashed, SerializationError, FunctionUnavailable,
       DeadlineExceeded, RemoteError, InitializerFailed, PoolUnavailable, RemoteTraceback)
