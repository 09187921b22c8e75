"""Exceptions across the process boundary: what a worker sends of an item's error, and
what the parent rebuilds of it. Each leaves as itself where it can be rebuilt on the
other side, and as :class:`~asyncpool.RemoteError` (its type's name, message and
traceback) where not. This module imports little: worker processes load it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from ._errors import RemoteError, RemoteTraceback, SerializationError, is_pool_made


def message_of(exc: BaseException) -> str | None:
    """``str(exc)``; None if its ``__str__`` (the task's own code) raised."""
    try:
        return str(exc)
    except BaseException:  # (it must not end a worker, nor the caller's loop)
        return None


def describe(exc: BaseException) -> tuple[str, str, str]:
    """(qualified type name, message, traceback text) of an exception."""
    import traceback

    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else (
        f"{cls.__module__}.{cls.__qualname__}")
    message = message_of(exc)
    if message is None:
        message = f"<{name}: its __str__ raised>"
    try:
        text = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    except BaseException:
        text = f"{name}: {message}\n"
    return name, message, text


def portable(exc: BaseException, raiser: str = "the task") -> BaseException:
    """``exc`` if it can be rebuilt on the other side; else a :class:`RemoteError`
    (which says ``raiser`` raised a SystemExit or KeyboardInterrupt)."""
    name, message, text = describe(exc)
    if isinstance(exc, (SystemExit, KeyboardInterrupt)) or not isinstance(exc, Exception):
        code = exc.code if isinstance(exc, SystemExit) else None
        said = f"({code!r})" if code is not None else f": {message}" if (
            message and not isinstance(exc, SystemExit)) else ""
        return RemoteError(f"{raiser} raised {name}{said}", type_name=name,
                           traceback=text, exitcode=code)
    try:
        # A class whose __init__ needs more than ``args`` pickles but does not load (or
        # loads as no Exception: a SystemExit would end the caller).
        if isinstance(pickle.loads(pickle.dumps(exc, 5)), Exception):
            return exc
    except BaseException:
        pass
    try:
        import cloudpickle

        if isinstance(pickle.loads(cloudpickle.dumps(exc, 5)), Exception):
            return exc
    except BaseException:
        pass
    return RemoteError(f"{name}: {message}", type_name=name, traceback=text)


def encode_errors(errors: dict[int, BaseException]) -> list[tuple[int, bytes, str]]:
    """(position, pickled exception, traceback text) for each failed item."""
    return [(position, *encode_error(exc)) for position, exc in errors.items()]


def encode_error(exc: BaseException, raiser: str = "the task") -> tuple[bytes, str]:
    """``exc`` pickled as faithfully as it goes (by cloudpickle where a class of the
    caller's script needs it), and its traceback text."""
    name, message, text = describe(exc)
    try:
        exc = portable(exc, raiser)
        try:
            blob = pickle.dumps(exc, 5)
        except BaseException:
            import cloudpickle

            blob = cloudpickle.dumps(exc, 5)
    except BaseException:
        blob = pickle.dumps(RemoteError(f"{name}: {message}", type_name=name,
                                        traceback=text), 5)
    return blob, text


def decode_error(blob: bytes, text: str,
                 loads: Callable[[bytes], Any] = pickle.loads) -> BaseException:
    """In the parent: an error :func:`encode_errors` made, as faithful as it loads
    (with ``loads``: in a thread, one that reads it in slices)."""
    try:
        exc: BaseException = loads(blob)
        if not isinstance(exc, Exception):  # its __reduce__ rebuilt something else (a
            # SystemExit or CancelledError would end or cancel the caller)
            raise TypeError(f"it unpickled as {type(exc).__qualname__}")
    except BaseException as problem:  # its own code ran: a SystemExit is not ours
        # Rebuilt in the worker but not here (its class is not importable here).
        first = text.strip().splitlines()[-1] if text.strip() else repr(problem)
        exc = RemoteError(first, type_name=first.split(":", 1)[0], traceback=text)
    if text and not (isinstance(exc, SerializationError) and is_pool_made(exc)):
        try:  # past the class's own __setattr__ (a frozen dataclass's refuses any)
            object.__setattr__(exc, "__cause__", RemoteTraceback(text))
        except Exception:  # noqa: BLE001 - a class whose __cause__ is its own property
            pass
    return exc
