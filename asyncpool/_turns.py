"""Whose initializer's state a Dask worker process holds.

Pools that share a cluster share its worker processes, and with them every module
those import: an initializer that sets ``mymodule.MODEL`` (or fills a dict there) sets
it for every pool. So a pool's chunk runs only while the state of the process is its
own initializer's: when another pool's initializer ran there since (even one alike: a
pool's own run also sets its own globals of the main script), the pool's runs again
first, once the chunks running under the other have ended. Chunks of one pool run side
by side; of pools without an initializer, beside any. Turns are keyed by the pool's
namespace (see :mod:`asyncpool._share`).
A waiting turn goes before chunks that arrive after it (none waits for ever on a stream
of the other's chunks). Worker processes import this module: it imports nothing heavy.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable

_room = threading.Condition()
#: The pool whose initializer's state the process holds, or None (none ran, or the
#: last one raised or was given up).
_current: str | None = None
#: Chunks running under it; and the initializer running (alone), if one is.
_inside = 0
_switching: tuple[str, object] | None = None  # (pool, this switch)
#: Switches so far (a turn that waited through one to its own initializer goes in).
_generation = 0
#: Turns waiting, by pool.
_waiting: dict[str, int] = {}
#: Initializers given up on (their pool left, or their time was up) that then ran to
#: their end, so far: what they set meanwhile may be anybody's state.
_spoils = 0


class Unchanged(Exception):
    """Raised by an ``apply`` that gave up before it ran anything: the state stays."""


def enter(pool: str, apply: Callable[[], None], timeout: float | None = None,
          fresh: bool = False) -> bool:
    """Hold the process's state for ``pool`` (``apply`` runs its initializer when the
    state is another's, or with ``fresh`` in any case, alone) until :func:`leave`.
    Returns False with nothing held when chunks of another pool still run after
    ``timeout`` seconds (None: no bound), or once ``apply`` returned if the turn was
    abandoned meanwhile. ``apply``'s error is raised, with nothing held."""
    global _current, _inside, _switching, _generation, _spoils
    end = None if timeout is None else time.monotonic() + timeout
    with _room:
        since = None  # the switch this turn waited from
        try:
            while True:
                if _switching is None:
                    others = any(other != pool for other in _waiting)
                    if _current == pool and not fresh and (
                            not others or (since is not None and since < _generation)):
                        _inside += 1
                        return True
                    if (_current != pool or fresh) and not _inside:
                        _switching = mine = pool, object()
                        spoils = _spoils
                        break
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if since is None:
                    since = _generation
                    _waiting[pool] = _waiting.get(pool, 0) + 1
                _room.wait(left)
        finally:
            if since is not None:
                _waiting[pool] -= 1
                if not _waiting[pool]:
                    del _waiting[pool]
                    _room.notify_all()  # (chunks it held back, if it gave up)
    try:
        apply()
    except BaseException as exc:
        with _room:
            if _switching is mine:  # (a fresh run that failed leaves what it found)
                if _current != pool and not isinstance(exc, Unchanged):
                    _current = None
                _switching = None
                _room.notify_all()
        raise
    with _room:
        if _switching is not mine:  # abandoned meanwhile: what it set is nobody's
            _spoiled()
            return False
        # One given up on that ended meanwhile may have written over what this set.
        _current, _switching = (pool if _spoils == spoils else None), None
        _generation += 1
        _inside += 1
        _room.notify_all()
    return True


def abandon(pool: str) -> None:
    """``pool`` left while its initializer ran (one that hangs must not hold the
    process from the others): the state is nobody's."""
    global _current, _switching
    with _room:
        if _switching is not None and _switching[0] == pool:
            _current, _switching = None, None
            _room.notify_all()


def spoiled() -> None:
    """An initializer given up on (see :func:`abandon`) ran to its end after all: the
    state is nobody's (the next chunk of each pool runs its own again)."""
    with _room:
        _spoiled()


def _spoiled() -> None:
    global _current, _spoils
    _spoils += 1
    _current = None
    _room.notify_all()


def leave() -> None:
    """A chunk (or an initializer's first run) that :func:`enter` let in ended."""
    global _inside
    with _room:
        _inside -= 1
        if not _inside:
            _room.notify_all()
