"""A worker's messages, handled in the order they came; big results loaded off the loop.

Loading results runs their pickle. One that weighs megabytes (a million small dicts, say)
held the loop for up to a second, and a result whose class rebuilds slowly held it past its
call's deadline. A results message whose pickle is big is loaded in a daemon thread, read
in slices, so that the thread lets go of the interpreter between them (the C unpickler
holds it throughout a plain ``pickle.loads``); the worker's later messages wait behind it.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _wire
from .._remote import decode_error
from .._salvage import load_results, paced_loads

#: A results pickle this big (bytes, not counting buffers sent out of band) is loaded in
#: a thread: about 4 ms of plain small objects.
SLOW_BYTES = 256 << 10
#: Killed by the pool, a worker's death waits this long (s) at most for what it sent
#: before to load (what a load of code of the caller's that hangs holds up: a close).
KILLED_WAIT = 5.0

#: What a results message became: (results, errors by position), or what loading raised.
Loaded = tuple[list[Any], dict[int, BaseException]] | BaseException


class Unpacked(NamedTuple):
    """A results message read: its meta, the errors it carries (rebuilt), and its
    results (None when its arguments did not load)."""

    meta: _wire.ResultMeta
    errors: dict[int, BaseException]
    loaded: Loaded | None


#: Handles a message: (kind, parts, a results message as unpacked in a thread, or None).
Handler = Callable[[int, list[Any], "Unpacked | None"], None]


def unpack(parts: list[Any], paced: bool = False) -> Unpacked:
    """A results message's parts read (``paced``: in slices, see :func:`load`)."""
    meta = _wire.ResultMeta._make(pickle.loads(parts[0]))
    loads = paced_loads if paced else pickle.loads
    errors = {position: decode_error(blob, text, loads) for position, blob, text in meta.errors}
    return Unpacked(meta, errors,
                    None if meta.arguments_unloadable else load(parts[1:], paced))


def load(parts: list[Any], paced: bool = False) -> Loaded:
    """The results in ``parts`` (see :func:`~asyncpool._salvage.load_results`), or
    what loading them raised (their own code ran: a SystemExit too)."""
    try:
        return load_results(parts, paced)
    except BaseException as exc:
        return exc


def load_in_thread(parts: list[Any], call_soon_threadsafe: Callable[..., Any],
                   then: Callable[[Any], None],
                   loader: Callable[[list[Any], bool], Any] = load) -> bool:
    """Load ``parts`` with ``loader`` in a thread of their own (in slices: the loop runs
    between them), then call ``then`` with the outcome on the loop; False if no thread
    can start."""
    def run() -> None:
        outcome = loader(parts, True)
        try:
            call_soon_threadsafe(lambda: then(outcome))
        except RuntimeError:  # the loop is closed: nothing waits for it
            pass

    try:
        threading.Thread(target=run, name="asyncpool-results", daemon=True).start()
    except RuntimeError:
        return False
    return True


async def load_apart(parts: list[Any]) -> Loaded | None:
    """Results whose pickle is big, loaded in a thread while an asyncio loop runs (the
    Dask rung's); None if they are small, or no thread can start."""
    import asyncio

    if memoryview(parts[0]).nbytes < SLOW_BYTES:
        return None
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Loaded] = loop.create_future()

    def settle(outcome: Loaded) -> None:
        if not done.done():  # (its waiter may have been cancelled meanwhile)
            done.set_result(outcome)

    if not load_in_thread(parts, loop.call_soon_threadsafe, settle):
        return None
    return await done


class Inbox:
    """Hands a worker's messages to ``handle`` in order; a load ends on ``owner.loop``
    (a worker's). The worker's death waits behind them (see :meth:`hold`)."""

    def __init__(self, handle: Handler, owner: Any) -> None:
        self._handle, self._owner = handle, owner
        #: Messages behind a load (None: none is loading).
        self._waiting: deque[tuple[int, list[Any]]] | None = None
        self._drops = 0  # what a load that ended finds changed if it was dropped
        self._then: Callable[[], None] | None = None  # the death held (see hold)
        self._timer: threading.Timer | None = None  # (see hurry)

    def put(self, kind: int, parts: list[Any]) -> None:
        if self._waiting is not None:
            self._waiting.append((kind, parts))
        else:
            self._take(kind, parts)

    def hold(self, death: Callable[[], None], killed: bool) -> bool:
        """Whether ``death`` (a call that buries the worker) waits until what the worker
        sent before it died is handled (its results come first: they ran once). Killed
        by the pool, it waits at most :data:`KILLED_WAIT`; then what is left is dropped."""
        if self._waiting is None:
            return False
        if self._then is None:
            self._then = death
        if killed:
            self.hurry()
        return True

    @property
    def holding(self) -> bool:
        """Whether a death is held: the worker takes no more work."""
        return self._then is not None

    def hurry(self) -> None:
        """The pool killed the worker: a death held waits at most :data:`KILLED_WAIT`."""
        if self._then is not None and self._timer is None:
            self._timer = threading.Timer(KILLED_WAIT, self._owner.loop.call_soon_threadsafe,
                                          (self._give_up,))
            self._timer.daemon = True
            self._timer.start()

    def _give_up(self) -> None:
        then, self._then, self._waiting = self._then, None, None
        self._drops += 1
        if then is not None:
            then()

    def _take(self, kind: int, parts: list[Any]) -> deque[tuple[int, list[Any]]] | None:
        """Handle the message now, or start loading it (then: what is to wait behind)."""
        # Big results, or errors (a task's exception may carry megabytes too).
        if kind != _wire.RESULTS or sum(memoryview(part).nbytes
                                        for part in parts[:2]) < SLOW_BYTES:
            self._handle(kind, parts, None)
            return None
        waiting = self._waiting = deque()
        drops = self._drops
        if not load_in_thread(parts, self._owner.loop.call_soon_threadsafe,
                              lambda outcome: self._loaded(drops, kind, parts, outcome),
                              unpack):
            self._waiting = None  # no thread to be had: here, then
            self._handle(kind, parts, None)
            return None
        return waiting

    def _loaded(self, drops: int, kind: int, parts: list[Any], outcome: Unpacked) -> None:
        waiting = self._waiting
        if drops != self._drops or waiting is None:
            return  # dropped
        self._waiting = None
        self._handle(kind, parts, outcome)
        while waiting and drops == self._drops:
            behind = self._take(*waiting.popleft())
            if behind is not None:
                behind.extend(waiting)  # behind this one's load, in order
                return
        then, self._then = self._then, None
        if self._timer is not None:
            self._timer.cancel()
        if then is not None and drops == self._drops:
            then()
