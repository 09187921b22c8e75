"""Whose initializer a Dask worker process holds the state of.

Pools that share a cluster share its worker processes, and with them every module
those import: an initializer that sets ``mymodule.MODEL`` (or fills a dict there) sets
it for every pool. So a pool's chunk runs only while the state of the process is its
own initializer's: when another initializer (another function, or other arguments) ran
there since, the pool's runs again first, once the chunks running under the other have
ended. Chunks of one initializer run side by side; of pools without one, beside any.
A waiting turn goes before chunks that arrive after it (none waits for ever on a stream
of the other's chunks). Worker processes import this module: it imports nothing heavy.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable

_room = threading.Condition()
#: The pickle of the initializer (and its arguments) whose state the process holds,
#: or None (none ran, or the last one raised).
_current: bytes | None = None
#: Chunks running under it; and the initializer running (alone), if one is.
_inside = 0
_switching: tuple[bytes, object] | None = None  # (initializer, this switch)
#: Switches so far (a turn that waited through one to its own initializer goes in).
_generation = 0
#: Turns waiting, by initializer.
_waiting: dict[bytes, int] = {}


def enter(blob: bytes, apply: Callable[[], None], wait: bool = True) -> bool:
    """Hold the process's state for initializer ``blob`` (``apply`` runs it when the
    state is another's) until :func:`leave`. Without ``wait``, returns False at once
    where chunks of another initializer run (nothing held), and False once ``apply``
    returned if the turn was abandoned meanwhile. ``apply``'s error is raised, with
    nothing held."""
    global _current, _inside, _switching, _generation
    with _room:
        since = None  # the switch this turn waited from
        try:
            while True:
                if _switching is None:
                    others = any(other != blob for other in _waiting)
                    if _current == blob and (
                            not others or (since is not None and since < _generation)):
                        _inside += 1
                        return True
                    if _current != blob and not _inside:
                        _switching = mine = blob, object()
                        break
                if not wait:
                    return False
                if since is None:
                    since = _generation
                    _waiting[blob] = _waiting.get(blob, 0) + 1
                _room.wait()
        finally:
            if since is not None:
                _waiting[blob] -= 1
                if not _waiting[blob]:
                    del _waiting[blob]
    try:
        apply()
    except BaseException:
        with _room:
            if _switching is mine:
                _current, _switching = None, None
                _room.notify_all()
        raise
    with _room:
        if _switching is not mine:  # abandoned meanwhile: what it set is nobody's
            return False
        _current, _switching = blob, None
        _generation += 1
        _inside += 1
        _room.notify_all()
    return True


def abandon(blob: bytes) -> None:
    """Initializer ``blob`` raised, or its pool left while it ran (one that hangs must
    not hold the process from the others): the state is nobody's."""
    global _current, _switching
    with _room:
        if _switching is not None and _switching[0] == blob:
            _current, _switching = None, None
            _room.notify_all()


def leave() -> None:
    """A chunk (or an initializer's first run) that :func:`enter` let in ended."""
    global _inside
    with _room:
        _inside -= 1
        if not _inside:
            _room.notify_all()


def holds(blob: bytes) -> bool:
    """Whether the process's state is initializer ``blob``'s."""
    with _room:
        return _current == blob
