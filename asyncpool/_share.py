"""The globals of the caller's main script, shared in a worker by the functions of it
that the worker loads (see :func:`share_main`). Worker processes import this module:
it imports nothing heavy.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: A namespace: the globals of the caller's main script shared by the functions of it
#: that a worker loads, each name's latest pickle (its version, and the value it
#: brought), and (on a Dask worker) the functions loaded into it, by their pickle:
#: (the version they were last bound for, as unpickled, as bound).
Space = tuple["dict[str, Any]", "dict[str, tuple[int, Any]]",
              "dict[bytes, tuple[int, Any, Any]]"]
#: The one namespace of a worker process.
_main: Space = ({}, {}, {})
#: A Dask worker's loaded functions: at most this many in a namespace, and this many
#: bytes of pickles in all (beyond, they are loaded afresh).
LOADED, LOADED_BYTES = 64, 64 << 20
#: On a Dask worker, which serves many client processes: one namespace per pool of a
#: client process, so that two programs whose main scripts both define ``TABLE`` or
#: ``helper`` never see each other's, nor two pools the globals their initializers
#: set. The latest :data:`SPACES` are kept, and beside them those of pools whose
#: initializer ran here while its plugin is registered (what it set was lost once 16
#: other pools had used the worker, and with a cap of 64, once 64 pools with an
#: initializer had: their tasks then ran on a namespace never initialised). Plugins
#: of pools whose client is gone are unregistered by the next pool (_dask_sweep).
_spaces: dict[str, Space] = {}
SPACES = 16
#: The pools whose initializer ran here: by how many workers of this process.
_pinned: dict[str, int] = {}
#: Worker threads of a Dask worker load functions at once.
_lock = threading.RLock()


def initialize(initializer: Any, initargs: tuple[Any, ...]) -> None:
    """Run the pool's initializer. One that returns an awaitable (an async function
    behind a wrapper: a cache, a plain function returning its coroutine) ran nothing:
    it raises TypeError, as the pool refuses an async initializer itself."""
    result = initializer(*initargs)
    if hasattr(type(result), "__await__"):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # not "never awaited" at collection
        raise TypeError(f"the initializer returned {type(result).__name__}, which nothing "
                        "awaits here: pass a plain function (one may call asyncio.run "
                        "inside)")


def run_initializer(blob: bytes, space: str, load: Callable[[bytes], Any]) -> None:
    """On a Dask worker: run the initializer (and arguments) pickled as ``blob`` in pool
    ``space``'s namespace."""
    initializer, initargs = load(blob)
    initialize(share_main(initializer, space), initargs)


def pin(space: str, by: int) -> bool:
    """A worker of this process holds (``by`` 1) or let go of (-1) the initializer
    plugin of the pool whose namespace is ``space``; let go by all, the namespace goes
    (and this returns True)."""
    with _lock:
        held = _pinned[space] = _pinned.get(space, 0) + by
        if held > 0:
            return False
        del _pinned[space]
        _spaces.pop(space, None)
        return True


def cluster_function(space: str, blob: bytes, version: int,
                     load: Callable[[bytes], Any]) -> Any:
    """On a Dask worker: the function pickled as ``blob``, loaded (``load``) once into
    pool ``space``'s namespace, which is now the latest (a busy pool's went first when
    only loads counted). A later call's pickle of it binds its globals again (one the
    same as an earlier call's, a global set back to an earlier value, was not
    followed); the function itself stays, and with it a cache it keeps."""
    with _lock:
        found = _space(space)[2].get(blob)
        if found is not None and found[0] >= version:
            return found[2]
    # Unpickling runs the pickle's code (imports, a big table): not under the lock,
    # which the worker's own loop takes (a pool's initializer plugin).
    original = load(blob) if found is None else found[1]
    with _lock:
        loaded = _space(space)[2]
        found = loaded.get(blob)  # before, or loaded meanwhile by another thread
        if found is not None:
            share_main(found[1], space, version)
            loaded[blob] = max(version, found[0]), found[1], found[2]
            return found[2]
        bound = share_main(original, space, version)
        if len(loaded) >= LOADED:
            loaded.clear()
        if len(blob) + sum(len(b) for s in _spaces.values() for b in s[2]) > LOADED_BYTES:
            for other in _spaces.values():
                other[2].clear()
        loaded[blob] = version, original, bound
        return bound


def _space(space: str) -> Space:
    """Pool ``space``'s namespace (made if new), now the latest; the oldest not
    pinned beyond SPACES go, with the functions bound to them."""
    found = _spaces.pop(space, None)
    _spaces[space] = found = ({}, {}, {}) if found is None else found
    names = [s for s in _spaces if s not in _pinned]
    for gone in names[:max(0, len(names) - SPACES)]:  # never this one: the latest
        del _spaces[gone]
    return found


def share_main(fn: Any, space: str | None = None, version: int = 0) -> Any:
    """``fn`` with the globals of the caller's main script shared with its other
    functions loaded here; ``version`` orders the pickles (a later call's is higher).

    cloudpickle sends a function of ``__main__`` by value with a copy of the globals it
    uses, one copy per pickle: an initializer that fills a global dict and a task that
    reads it would each see their own. Rebinding them to one namespace gives what a
    forked worker would have: one set of module globals. In it, a plain value (a
    number, a string, a tuple...) follows the caller's changes (``MODEL = None`` that
    an initializer set stays set until the caller changes it), a function or a class
    the caller's latest, as each call's pickle brings it (an older call's pickle that
    arrives later changes nothing); a mutable one (a dict an initializer filled, a
    loaded model) stays as the worker first got it.
    """
    import functools
    import types

    if isinstance(fn, functools.partial):
        inner = share_main(fn.func, space, version)
        if inner is fn.func:
            return fn
        # Its own class (a subclass may add a __call__) and attributes, kept.
        clone = functools.partial.__new__(type(fn), inner, *fn.args, **fn.keywords)
        clone.__dict__.update(fn.__dict__)
        return clone
    if isinstance(fn, types.MethodType):  # of an object (or class) of the script
        inner = share_main(fn.__func__, space, version)
        if inner is fn.__func__:
            return fn
        owner = fn.__self__ if isinstance(fn.__self__, type) else type(fn.__self__)
        if owner.__module__ == "__main__":
            base = inner
            while not hasattr(base, "__globals__"):  # under a cache
                base = base.__wrapped__
            _rebound(owner, base.__globals__)
        return types.MethodType(inner, fn.__self__)
    if _cachedof_script(fn):
        # Cached (functools.lru_cache, functools.cache): the function it caches shares
        # them, under a cache of this worker's own.
        params = fn.cache_parameters()
        return cached(share_main(fn.__wrapped__, space, version), params["maxsize"],
                      params["typed"])
    if not isinstance(fn, types.FunctionType) and type(fn).__module__ == "__main__":
        # An object of a script class with a __call__: its class shares them too.
        call = share_main(type(fn).__call__, space, version)
        if of_script(call):
            _rebound(type(fn), call.__globals__)  # the shared ones, not a library's
        return fn
    if not of_script(fn):
        return fn
    with _lock:
        shared, seen, _ = _main if space is None else _space(space)
        return _bind(fn, shared, seen, version)


def _bind(fn: Any, shared: dict[str, Any], seen: dict[str, tuple[int, Any]],
          version: int) -> Any:
    """``fn`` with ``shared`` as its globals, given what its pickle brought."""
    # Only the names it uses, as its pickle brought them: not its own name, unless it
    # calls itself. A function is not always what the script's global of its name
    # holds (one made in another function, a wraps() wrapper, one whose name a
    # decorator rebound), and set there it replaced that global for other calls.
    for name, value in fn.__globals__.items():
        last, brought = seen.get(name, (0, _NOTHING))
        if name in shared and last > version:
            continue  # set by a later call's pickle
        seen[name] = version, value
        if of_script(value) or (isinstance(value, type) and value.__module__ == "__main__"):
            # A function or class of the script follows the caller's latest (one
            # redefined in a notebook cell), and sees the shared globals.
            shared[name] = _rebound(value, shared)
        elif name not in shared or (not _same(value, brought) and (
                _plain(value) or _plain(shared[name]))):
            # The caller changed it: a plain value is replaced, and so is anything that
            # replaces a plain one (CFG = None, then a dict); a mutable value the
            # worker holds (a dict an initializer filled) stays.
            shared[name] = value
    return _rebound(fn, shared)


_NOTHING = object()


def _lru_wrapper_type() -> Any:
    import functools

    return type(functools.lru_cache(None)(_lru_wrapper_type))


_LRU_WRAPPER: Any = _lru_wrapper_type()


def _cachedof_script(fn: Any) -> bool:
    """Whether ``fn`` is a function of the main script under ``functools.lru_cache``."""
    return isinstance(fn, _LRU_WRAPPER) and of_script(getattr(fn, "__wrapped__", None))


def dumps_for_workers(obj: Any, buffer_callback: Any = None) -> bytes:
    """``obj`` pickled by cloudpickle for processes that do not run the main script.

    A function of the script cached with ``functools.lru_cache`` (or ``cache``) pickles
    by its name, which the workers' ``__main__`` lacks. Wherever it is (the function
    shipped, a partial's, a global a function calls: a recursive one calls itself), it
    travels as the function it caches and is cached anew where it lands."""
    import io

    global _pickler
    if _pickler is None:
        _pickler = _cached_by_value()
    out = io.BytesIO()
    _pickler(out, 5, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


_pickler: Any = None


def _cached_by_value() -> Any:
    import collections
    import types

    import cloudpickle

    # cloudpickle's private reducer of code objects (None where a release lacks it:
    # code then pickles as cloudpickle does it).
    code_reduce = getattr(cloudpickle.cloudpickle, "_code_reduce", None)

    light = _light(cloudpickle)

    def lighter(reduced: Any) -> Any:
        if type(reduced) is not tuple or not light:
            return reduced
        return tuple(light.get(part, part) if type(part) is types.FunctionType else part
                     for part in reduced)

    table = cloudpickle.Pickler.dispatch_table
    if light:  # cells and modules as a function's globals and closure hold them
        cell, module = (cloudpickle.cloudpickle._cell_reduce,
                        cloudpickle.cloudpickle._module_reduce)
        table = collections.ChainMap({types.CellType: lambda c: lighter(cell(c)),
                                      types.ModuleType: lambda m: lighter(module(m))},
                                     table)

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table = table

        def reducer_override(self, obj: Any) -> Any:
            if _cachedof_script(obj):
                params = obj.cache_parameters()
                return cached, (obj.__wrapped__, params["maxsize"], params["typed"])
            if type(obj) is types.CodeType and code_reduce is not None:
                # Its file kept (cloudpickle names it "<dynamic-code>"): a worker's
                # traceback then shows the script's file, line and source.
                make, args = code_reduce(obj)
                return make, tuple(obj.co_filename if isinstance(a, str) and
                                   a == "<dynamic-code>" else a for a in args)
            return lighter(super().reducer_override(obj))

    return Pickler


def _light(cloudpickle: Any) -> dict[Any, Any]:
    """cloudpickle's functions that rebuild a function sent by value, and those of
    :mod:`asyncpool._thaw` that stand in for them in a worker (which then does not
    import cloudpickle); none for a release whose functions we do not know."""
    from . import _thaw

    inner = cloudpickle.cloudpickle
    light = {getattr(inner, theirs, None): getattr(_thaw, ours)
             for theirs, ours in _thaw.LIGHT.items()}
    known = cloudpickle.__version__.split(".")[0] == "3" and all(
        hasattr(inner, name) for name in ("_cell_reduce", "_module_reduce"))
    return light if known and None not in light else {}


def cached(fn: Any, maxsize: int | None, typed: bool) -> Any:
    """``fn`` under an ``lru_cache`` of its own (see :func:`dumps_for_workers`)."""
    import functools

    return functools.update_wrapper(functools.lru_cache(maxsize, typed)(fn), fn)


def _same(a: Any, b: Any) -> bool:
    """Whether the caller's value is the one its previous pickle brought (NaN too)."""
    if a is b:
        return True
    try:
        if type(a) is type(b) and bool(a == b):
            return True
        import pickle

        return pickle.dumps(a, 5) == pickle.dumps(b, 5)
    except Exception:
        return False


def _plain(value: Any) -> bool:
    """An immutable value (a number, string, tuple, date, path, enum member, compiled
    pattern...), or a module, class or function of a library: a name for it."""
    import enum
    import functools
    import types

    kind = type(value)
    if isinstance(value, types.ModuleType | types.BuiltinFunctionType | types.FunctionType
                  | type):
        return not of_script(value) and getattr(value, "__module__", None) != "__main__"
    if kind is functools.partial:  # of plain parts: int with base=2
        return all(_plain(part) for part in (value.func, *value.args,
                                             *value.keywords.values()))
    return kind in _PLAIN or isinstance(value, int | float | complex | str | bytes | tuple
                                        | frozenset) or (
        kind.__module__ in _PLAIN_MODULES or isinstance(kind, enum.EnumMeta))


def of_script(fn: Any) -> bool:
    """Whether ``fn`` is a function the main script defined. A library's wrapper
    (``functools.wraps``: a dataclass's ``__repr__``, a ``contextmanager``) says it is
    of ``__main__`` too, but its globals are its module's: given the script's, it
    would not find its own names."""
    import types

    return (isinstance(fn, types.FunctionType) and fn.__module__ == "__main__"
            and fn.__globals__.get("__name__") == "__main__")


def _rebound(fn: Any, shared: dict[str, Any]) -> Any:
    """A function of the main script with ``shared`` as its globals; a class of it
    with its methods so."""
    import types

    if isinstance(fn, type):
        # Its own methods (plain, static, class, properties), and its script bases'.
        for cls in fn.__mro__:
            if cls.__module__ != "__main__":
                continue
            for key, member in list(vars(cls).items()):
                if isinstance(member, property):
                    parts = [_rebound(f, shared) for f in (member.fget, member.fset,
                                                           member.fdel)]
                    if any(a is not b for a, b in zip(parts, (member.fget, member.fset,
                                                              member.fdel), strict=True)):
                        setattr(cls, key, property(parts[0], parts[1], parts[2],
                                                   member.__doc__))
                    continue
                inner = getattr(member, "__func__", member)
                if not of_script(inner) or inner.__globals__ is shared:
                    continue
                rebound = _rebound(inner, shared)
                if isinstance(member, types.MethodType):  # a bound method held there
                    rebound = types.MethodType(rebound, member.__self__)
                elif inner is not member:  # a static or class method
                    rebound = type(member)(rebound)
                setattr(cls, key, rebound)
        return fn
    if not of_script(fn) or fn.__globals__ is shared:
        return fn
    rebound = types.FunctionType(fn.__code__, shared, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    for name in ("__kwdefaults__", "__qualname__", "__annotations__", "__doc__"):
        value = getattr(fn, name)
        # Dicts copied: what a call changes in them is its own (one loaded copy of the
        # function serves every call that ships the same pickle).
        setattr(rebound, name, dict(value) if type(value) is dict else value)
    rebound.__dict__.update(fn.__dict__)
    return rebound


#: Values that are replaced, not shared, when a newer pickle brings them.
_PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None), tuple, frozenset,
                    range})
_PLAIN_MODULES = frozenset({"datetime", "decimal", "fractions", "pathlib", "uuid",
                            "ipaddress", "re"})
