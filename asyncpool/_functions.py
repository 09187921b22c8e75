"""Functions, pickled once and known to workers by a number.

A module-level function pickles by reference, so its pickle never changes: it is made
once per pool and each worker loads it once. Anything else (a ``functools.partial``, a
lambda, a closure, a callable object) may change between calls, so it is pickled once
per call and dropped from the workers when the call ends. Chunks then carry only the
number, whatever the function weighs. A function of the main script goes by value, as
each call's own; its pickle is made again only when what it read may have changed.
"""

from __future__ import annotations

import functools
import itertools
import operator
import pickle
import sys
import types
from collections import OrderedDict
from typing import Any

from ._sizing import Timing
from ._wire import wrap_big
from ._errors import SerializationError
from ._retry import is_transient
from ._share import dumps_for_workers, of_script

#: Functions (and their timings) remembered per pool; the oldest go first.
_REMEMBERED = 512

#: Function ids are unique in the process, not per pool: a worker parked by one pool
#: (reuse_workers) still holds the functions it loaded, by id, when the next takes it.
_ids = itertools.count(1)


class Shipped:
    """A function as workers receive it."""

    __slots__ = ("id", "blob", "name", "lasting", "buffers", "fn", "kept")

    def __init__(self, fn_id: int, blob: bytes, name: str, lasting: bool,
                 buffers: list[Any] | None = None, fn: Any = None, kept: bool = False) -> None:
        self.id, self.blob, self.name, self.lasting = fn_id, blob, name, lasting
        #: A function of the main script whose pickle holds only plain values and names
        #: (see read_by_pickle): a worker may load it once for every call that ships it.
        self.kept = kept
        #: The out-of-band buffers of ``blob``: a partial's large bytes, not copied.
        self.buffers: list[Any] = buffers or []
        self.fn = fn

    def whole(self) -> bytes:
        """The pickle with every buffer inside it (for Dask, which pickles its own)."""
        if not self.buffers:
            return self.blob
        self.blob, self.buffers = dumps_for_workers(self.fn), []
        return self.blob

    def __repr__(self) -> str:
        return f"<Shipped {self.id} {self.name} {len(self.blob)} bytes>"


class FunctionBook:
    """The pool's functions, and what their items cost."""

    def __init__(self) -> None:
        self._lasting: OrderedDict[int, tuple[Any, Shipped]] = OrderedDict()
        self._timings: OrderedDict[Any, tuple[Any, Timing]] = OrderedDict()
        #: Functions of the main script: (the function, what its pickle read, the pickle,
        #: whether workers may share one loaded copy: see Shipped.kept).
        self._script: OrderedDict[int, tuple[Any, list[Any], bytes, bool]] = OrderedDict()

    def ship(self, fn: Any) -> Shipped:
        """``fn`` pickled for the workers; raises SerializationError if it cannot be."""
        key = id(fn)
        found = self._lasting.get(key)
        if found is not None and found[0] is fn:
            self._lasting.move_to_end(key)
            return found[1]
        name = name_of(fn)
        # A function of the main script pickles by reference too, but workers do not
        # run the main script: it must travel by value (cloudpickle).
        if (isinstance(fn, types.FunctionType | types.BuiltinFunctionType)
                and getattr(fn, "__module__", None) not in (None, "__main__", "__mp_main__")):
            try:
                blob = pickle.dumps(fn, 5)
            except Exception:
                pass
            else:
                # Pickled by reference: the same bytes for as long as the function lives.
                shipped = Shipped(next(_ids), blob, name, True)
                self._lasting[key] = (fn, shipped)
                if len(self._lasting) > _REMEMBERED:
                    self._lasting.popitem(last=False)
                return shipped
        read = read_by_pickle(fn)
        if read is not None:
            kept = self._script.get(key)
            if kept is not None and kept[0] is fn and kept[1][0] == read[0] and len(
                    kept[1]) == len(read) and all(map(operator.is_, kept[1][1:], read[1:])):
                # Each object it read is the same: so would its pickle be. As a call's
                # own (a number of its own), it still brings the globals as they are.
                self._script.move_to_end(key)
                return Shipped(next(_ids), kept[2], name, False, kept=kept[3])
        try:
            wrapped = _with_big_bytes_marked(fn)
            if wrapped is not None:
                # Its large bytes travel out of band: copied into the pickle, a 200 MB
                # table held the loop 130 to 270 ms.
                buffers: list[pickle.PickleBuffer] = []
                blob = dumps_for_workers(wrapped, buffers.append)
                return Shipped(next(_ids), blob, name, False, [b.raw() for b in buffers],
                               fn)
            blob = dumps_for_workers(fn)
            if read is not None and len(blob) <= KEPT_BYTES:  # (a big one: not held)
                read[0] = len(sys.modules)  # what pickling it imported (cloudpickle)
                # Its cells are its own: a worker's copy shared by calls would keep
                # what a call set in them (nonlocal), as calls of its own did not.
                shared = not any(f.__closure__ for f in read if of_script(f))
                self._script[key] = (fn, read, blob, shared)
                if len(self._script) > _SCRIPT_KEPT:
                    self._script.popitem(last=False)
                return Shipped(next(_ids), blob, name, False, kept=shared)
        except Exception as exc:
            if is_transient(exc):  # the machine's shortage (no descriptor to import
                raise  # cloudpickle with): not the function's fault
            raise SerializationError(
                f"the function {fn!r} cannot be pickled for the worker processes ({exc!r}); "
                "define it at module level, or pass it through functools.partial"
            ) from exc
        return Shipped(next(_ids), blob, name, False)

    def timing(self, fn: Any, apart: bool = False) -> Timing:
        """The measured cost of ``fn``'s items, shared by every call of the same code;
        a new one for a call ``apart`` (its Dask tasks ask for some workers: they may
        wait for them, for good if none has what they ask, and a chunk of its function
        out unmeasured held back every other call of it)."""
        if apart:
            return Timing()
        root = fn
        while isinstance(root, functools.partial):
            root = root.func
        root = getattr(root, "__func__", root)
        found = self._timings.get(id(root))
        if found is not None and found[0] is root:
            return found[1]
        timing = Timing()
        self._timings[id(root)] = (root, timing)
        if len(self._timings) > _REMEMBERED:
            self._timings.popitem(last=False)
        return timing


#: Pickles of the main script's functions kept (see read_by_pickle), each at most this
#: big (a lambda holding a request's 8 MB body kept 64 of them alive).
_SCRIPT_KEPT, KEPT_BYTES = 64, 64 << 10
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})
_BASE = ("__package__", "__name__", "__path__", "__file__")


def read_by_pickle(fn: Any) -> list[Any] | None:
    """What cloudpickle reads to pickle ``fn``, a plain function of the main script
    (its code, defaults, closure, the globals it uses, the functions of the script it
    calls, and the number of modules imported, whose submodules it may take): while
    each is the same object, its pickle is the same. None for anything whose pickle
    might change although none of them did (a list or a dict it reads, a class of the
    script, attributes set on a function)."""
    read: list[Any] = [len(sys.modules)]  # compared by value, the rest by identity
    todo, seen = [fn], set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if not of_script(f) or f.__dict__:
            return None
        g = f.__globals__
        read += [f, f.__code__, f.__defaults__, f.__kwdefaults__, f.__annotations__,
                 f.__name__, f.__qualname__, f.__doc__, *(g.get(k) for k in _BASE)]
        # Names with their values (a global that went and another that came with the
        # same value read alike).
        values = [_contents(c) for c in f.__closure__ or ()]
        named = [(n, g[n]) for n in _names(f.__code__) if n in g]
        named += [*(f.__kwdefaults__ or {}).items(), *f.__annotations__.items()]
        values += [*(f.__defaults__ or ()), *(v for _, v in named)]
        for value in values:
            if of_script(value):
                todo.append(value)
            elif value is not _EMPTY and not _by_reference(value):
                return None
        read += [*values, *(n for n, _ in named)]
    return read


_EMPTY = object()  # an empty cell's contents


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # empty: a name bound later
        return _EMPTY


def _by_reference(value: Any, depth: int = 0) -> bool:
    """Whether ``value``'s pickle depends on nothing but its identity: a plain value
    (a tuple of them, not long), or a module, function or class pickled by name."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is tuple or kind is frozenset:
        return depth < 2 and len(value) <= 32 and all(_by_reference(v, depth + 1)
                                                        for v in value)
    if kind is types.ModuleType:
        return sys.modules.get(value.__name__) is value and not _by_value_modules()
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | type):
        module = sys.modules.get(getattr(value, "__module__", None) or "")
        name = getattr(value, "__qualname__", "")
        return (module is not None and value.__module__ not in ("__main__", "__mp_main__")
                and "." not in name and getattr(module, name, None) is value
                and not _by_value_modules())
    return False


def _by_value_modules() -> bool:
    """Whether modules were registered with cloudpickle to travel by value."""
    found = sys.modules.get("cloudpickle.cloudpickle")
    return bool(getattr(found, "_PICKLE_BY_VALUE_MODULES", None))


@functools.lru_cache(1024)
def _names(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the code nested in it may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_names(const))
    return tuple(sorted(names))


def _with_big_bytes_marked(fn: Any) -> functools.partial[Any] | None:
    """A copy of a plain ``functools.partial`` whose large bytes are marked to travel
    out of band (see :func:`~asyncpool._wire.wrap_big`); None if it holds none."""
    if type(fn) is not functools.partial:
        return None
    memo: dict[int, Any] = {}  # an object passed twice stays one object
    args = wrap_big(fn.args, 2, memo)
    values = wrap_big(list(fn.keywords.values()), 2, memo)
    if all(a is b for a, b in zip(args, fn.args, strict=True)) and all(
            a is b for a, b in zip(values, fn.keywords.values(), strict=True)):
        return None
    wrapped = functools.partial(fn.func, *args, **dict(zip(fn.keywords, values,
                                                           strict=True)))
    wrapped.__dict__.update(fn.__dict__)
    return wrapped


def check_function(fn: Any) -> None:
    """TypeError unless the pool can run ``fn``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {fn!r}")
    if is_async(fn):
        raise TypeError(f"{name_of(fn)} is an async function: the pool runs plain "
                        "functions; await it on your own loop, or pass a plain one")
    if _is(_unwrapped(fn), "isgeneratorfunction"):  # (its generator would run on the
        # caller's loop on the thread and inline rungs; it cannot leave a process)
        raise TypeError(f"{name_of(fn)} is a generator function: its generator cannot "
                        "come back from a worker; pass a function that returns a list "
                        "of what it yields (or map over those items)")


def is_async(fn: Any) -> bool:
    """Whether ``fn`` (through partials) is an async function or object."""
    fn = _unwrapped(fn)
    return _is(fn, "iscoroutinefunction") or _is(fn, "isasyncgenfunction")


def _unwrapped(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _is(fn: Any, test: str) -> bool:
    """``inspect.<test>`` of the function, or of a callable object's ``__call__``."""
    import inspect

    check = getattr(inspect, test)
    return bool(check(fn) or (not inspect.isroutine(fn) and check(type(fn).__call__)))


def name_of(fn: Any) -> str:
    """A readable name: the function's own, through partials and bound methods."""
    root = fn
    while isinstance(root, functools.partial):
        root = root.func
    name = getattr(root, "__qualname__", None) or getattr(root, "__name__", None)
    return str(name or type(root).__name__)
