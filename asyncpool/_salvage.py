"""Results of several items in one pickle, one of which will not load here.

A worker sends the results of a stretch of items as one pickle. When that pickle does
not load in the parent (a result's class is not importable here, or its pickle calls a
function that raises), :func:`load_results` loads it again with each failing class or
call (a constructor, a ``__setstate__``) replaced by a stand-in, and makes only the
items that hold a stand-in fail: the others keep their results and run no second time.
Where a failure cannot be pinned on items that way (a stand-in hidden where the search
cannot see, such as inside a deque or an object with slots), the original error is
raised and the caller runs each item again alone.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import SerializationError, pool_made
from ._execute import Unsendable

#: How many objects the search for stand-ins looks at, at most, before it gives up.
SEARCH_LIMIT = 200_000
FIX = "return plain data (built-in types, or classes importable in both processes)"


class _StandIn:
    """What a class or a call that failed while loading a result becomes."""

    failure: str = ""
    made: list[object]
    #: For a call that failed: what it was given.
    given: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        instance = object.__new__(cls)
        cls.made.append(instance)
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    # What a pickle may call on a list, set or dict subclass it rebuilds.
    def append(self, *args: Any) -> None:
        pass

    extend = add = __setitem__ = append


class _Loading:
    """A class that will not load becomes a stand-in (what both loaders share)."""

    def __init__(self) -> None:
        self.stand_ins: list[type[_StandIn]] = []
        self.made: list[object] = []

    def stand_in(self, name: str, exc: BaseException) -> type[_StandIn]:
        cls = type(name, (_StandIn,), {"failure": f"{name}: {exc!r}", "made": self.made})
        self.stand_ins.append(cls)
        return cls

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)  # type: ignore[misc]
        except Exception as exc:
            return self.stand_in(f"{module}.{name}", exc)


class _Tolerant(_Loading, pickle.Unpickler):
    """Fast: every function it loads is guarded, for a call to it that raises. A
    function that is itself a result then comes back guarded (see :class:`_Exact`)."""

    def __init__(self, data: Any, buffers: Sequence[Any]) -> None:
        pickle.Unpickler.__init__(self, io.BytesIO(data), buffers=buffers)
        _Loading.__init__(self)

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if isinstance(found, type) or not callable(found):
            return found
        return _Guard(found, f"{module}.{name}", self)


class _Exact(_Loading, pickle._Unpickler):
    """Slow (pure Python): catches a failing call where the pickle makes it, so a
    function that is a result stays itself. (The stdlib's pure-Python unpickler is
    private; the C one cannot be hooked per opcode.)"""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: Any, buffers: Sequence[Any]) -> None:
        pickle._Unpickler.__init__(self, io.BytesIO(data), buffers=buffers)
        _Loading.__init__(self)

    def load_reduce(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        args = stack.pop()
        fn = stack[-1]
        try:
            stack[-1] = fn(*args)
        except (Exception, SystemExit) as exc:
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
            stack[-1] = made = self.stand_in(name, exc)()
            made.given = fn, args  # stand-ins among them are this item's too

    dispatch[pickle.REDUCE[0]] = load_reduce  # type: ignore[assignment]

    def load_build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        try:
            pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        except (Exception, SystemExit) as exc:  # a __setstate__ that raises here
            half = stack[-1]
            kind = type(half)
            stack[-1] = made = self.stand_in(f"{kind.__module__}.{kind.__qualname__}", exc)()
            # The half-built object is in the memo too: a later reference to it (the
            # same object in another result) must find the stand-in as well.
            memo: dict[int, Any] = self.memo  # type: ignore[attr-defined]
            for key in [k for k, v in memo.items() if v is half]:
                memo[key] = made

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]

    def _new(self, cls: Any, args: Any, kwargs: Any) -> None:
        try:
            obj = cls.__new__(cls, *args, **kwargs)
        except (Exception, SystemExit) as exc:  # a __new__ that raises here
            name = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
            obj = self.stand_in(name, exc)()
            obj.given = cls, args
        self.append(obj)  # type: ignore[attr-defined]

    def load_newobj(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        args = stack.pop()
        self._new(stack.pop(), args, {})

    def load_newobj_ex(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        kwargs = stack.pop()
        args = stack.pop()
        self._new(stack.pop(), args, kwargs)

    dispatch[pickle.NEWOBJ[0]] = load_newobj  # type: ignore[assignment]
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex  # type: ignore[assignment]


class _Guard:
    """A function loaded by :class:`_Tolerant`: a call that raises makes a stand-in."""

    __slots__ = ("fn", "name", "loader")

    def __init__(self, fn: Callable[..., Any], name: str, loader: _Loading) -> None:
        self.fn, self.name, self.loader = fn, name, loader

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            made = self.loader.stand_in(self.name, exc)()
            made.given = args, kwargs  # stand-ins among them are this item's too
            return made


def load_results(parts: Sequence[Any], paced: bool = False
                 ) -> tuple[list[Any], dict[int, BaseException]]:
    """The results in ``parts`` (a pickle and its buffers), and an error for each
    position whose result will not load here. Raises the pickle's own error when it
    cannot tell which results are at fault. ``paced``: read in slices (in a thread,
    the interpreter is let go between them: see :class:`_Slices`)."""
    try:
        results = (pickle.Unpickler(_Slices(parts[0]), buffers=parts[1:]).load() if paced
                   else pickle.loads(parts[0], buffers=parts[1:]))
    except BaseException as exc:
        error = exc
    else:
        return results, _unsendable(results)
    if isinstance(error, KeyboardInterrupt):
        raise error  # perhaps the user's Ctrl-C, not a result's doing
    for loader in (_Tolerant, _Exact):
        pinned = _pin(loader(parts[0], parts[1:]), error)
        if pinned is not None:
            results, errors = pinned
            return results, {**_unsendable(results), **errors}
    raise error  # not even the exact loader could load them


def paced_loads(data: Any) -> Any:
    """``pickle.loads`` read in slices (see :class:`_Slices`)."""
    return pickle.Unpickler(_Slices(data)).load()


class _Slices:
    """A pickle as a file the C unpickler reads in slices of 128 KB (its look-ahead):
    each read is a call of Python code, where a thread that loads it lets the loop's
    thread run (the whole of a plain ``pickle.loads`` holds the interpreter: a 30 MB
    pickle of small objects held the loop 0.5 s, from any thread)."""

    def __init__(self, data: Any) -> None:
        self._data, self._at = memoryview(data).cast("B"), 0

    def peek(self, size: int = 1) -> bytes:
        return bytes(self._data[self._at:self._at + max(1, size)])

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._at + size
        piece = bytes(self._data[self._at:end])
        self._at += len(piece)
        return piece

    def readinto(self, buffer: Any) -> int:
        piece = self._data[self._at:self._at + memoryview(buffer).nbytes]
        memoryview(buffer).cast("B")[:len(piece)] = piece
        self._at += len(piece)
        return len(piece)

    def readline(self) -> bytes:
        end = bytes(self._data[self._at:self._at + 4096]).find(b"\n")
        return self.read(end + 1 if end >= 0 else 4096)


def _unsendable(results: list[Any]) -> dict[int, BaseException]:
    """A result the worker could not pickle came as a note of why: its item's error."""
    return {position: pool_made(SerializationError(value.reason))
            for position, value in enumerate(results) if type(value) is Unsendable}


def _pin(loader: _Loading, error: BaseException
         ) -> tuple[list[Any], dict[int, BaseException]] | None:
    """Results loaded with stand-ins, and an error for each one that holds one; None
    if they did not load, or a guarded function is among them (load them again
    exactly)."""
    try:
        results = loader.load()  # type: ignore[attr-defined]
    except Exception:
        return None  # a constructor or __setstate__ raised: the exact loader sees it
    if not isinstance(results, list):
        raise error
    wanted = {id(o) for o in loader.made} | {id(c) for c in loader.stand_ins}
    errors: dict[int, BaseException] = {}
    found: set[int] = set()
    budget = SEARCH_LIMIT
    for position, value in enumerate(results):
        held, budget = _stand_ins(value, budget)
        if budget <= 0 or held is None:
            raise error  # an item it cannot see through may hold one: rerun them alone
        if any(isinstance(h, _Guard) for h in held):
            return None
        if held:
            classes: set[type[_StandIn]] = {s if isinstance(s, type) else type(s)
                                             for s in held}
            found |= {id(s) for s in held} | {id(c) for c in classes}
            names = sorted({c.failure for c in classes})
            failure = pool_made(SerializationError(
                f"its result could not be unpickled in the parent ({'; '.join(names)}); "
                f"{FIX}"))
            failure.__cause__ = error
            errors[position] = failure
            results[position] = None
    if wanted - found:
        raise error  # a stand-in ended where no search reaches: rerun them alone
    return results, errors


#: Values with nothing inside them to look at.
_ATOMS = frozenset({str, bytes, bytearray, int, float, complex, bool, type(None),
                    type(Ellipsis), range, memoryview, types.ModuleType})
_ATOM_MODULES = frozenset({"datetime", "decimal", "uuid", "fractions", "pathlib",
                           "ipaddress"})


def _stand_ins(value: Any, budget: int) -> tuple[list[Any] | None, int]:
    """Every stand-in (class or instance) reachable from ``value``; None if it holds
    something the search cannot see inside (a deque, an instance of a class derived
    from a builtin container or another type written in C), where one may hide."""
    held: list[Any] = []
    seen: set[int] = set()
    stack = [value]
    while stack and budget > 0:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        budget -= 1
        kind = type(value)
        if kind in _ATOMS or kind.__module__ in _ATOM_MODULES or (
                kind.__name__ == "ndarray" and not getattr(value.dtype, "hasobject", True)):
            continue
        if isinstance(value, (_StandIn, _Guard)) or (isinstance(value, type)
                                                     and issubclass(value, _StandIn)):
            held.append(value)
            if isinstance(value, _StandIn):
                stack.append(value.__dict__)  # what a call that failed was given
        elif kind is types.MethodType:
            # Its function (a stand-in, when cloudpickle named one the parent lacks).
            stack.extend((value.__self__, value.__func__))
        elif kind is types.BuiltinMethodType:
            stack.append(value.__self__)
        elif kind in (list, tuple, set, frozenset):
            stack.extend(value)
        elif kind is functools.partial:
            stack.extend((value.func, *value.args, *value.keywords.values()))
        elif kind is dict:
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, type) or callable(value) and hasattr(value, "__code__"):
            continue  # a class or a function: what it holds came in by reference
        elif (inside := _attributes(value, kind)) is not None:
            stack.extend(inside)
        else:
            return None, budget
    return held, budget


def _attributes(value: Any, kind: type) -> list[Any] | None:
    """What an instance of a class written in Python holds: its ``__dict__`` and its
    slots; None for one whose class derives from a type written in C (other than
    ``object``), which may hold more than either shows."""
    held = getattr(value, "__dict__", None)
    if not all(map(_in_python, kind.__mro__[:-1])) or held is not None and (
            type(held) is not dict):
        return None
    inside: list[Any] = [] if held is None else [held]
    for c in kind.__mro__[:-1]:
        for slot in vars(c).values():
            if type(slot) is types.MemberDescriptorType:
                try:
                    inside.append(slot.__get__(value, kind))
                except AttributeError:  # (never set)
                    pass
    return inside


def _in_python(cls: type) -> bool:
    """Whether ``cls`` was made by a class statement: a heap type (as some types of C
    modules are too, since 3.12: deque) whose ``__new__`` and ``__init__``, if its own,
    are Python functions, and that stores no items of its own."""
    if not cls.__flags__ & _HEAPTYPE or cls.__itemsize__:
        return False
    for name in ("__new__", "__init__"):
        own = vars(cls).get(name)
        if own is not None and not isinstance(own, types.FunctionType | staticmethod):
            return False
    return True


#: ``type.__flags__``: a class not built into the interpreter.
_HEAPTYPE = 1 << 9
