"""Rebuilding functions sent by value, without importing cloudpickle.

cloudpickle sends a function of the main script as its code, globals and closure,
rebuilt by functions of its own module, whose import (dataclasses, inspect, typing,
logging: 15-20 ms) was most of a new worker's first call. The pool's pickler names
these instead (:data:`LIGHT`, see :func:`asyncpool._share.dumps_for_workers`): they
rebuild the same state and import nothing. What else cloudpickle sends (a class of the
script, say) still loads with its own.

Nothing here imports ``typing``: a worker has not imported it.
"""

from __future__ import annotations

import sys
import types

#: cloudpickle's rebuilding functions (by name, in ``cloudpickle.cloudpickle``) that
#: a function sent by value names, and those standing in for them here.
LIGHT = {"_builtin_type": "builtin_type", "_make_function": "make_function",
         "_function_setstate": "function_setstate", "_make_cell": "make_cell",
         "_make_empty_cell": "make_empty_cell", "subimport": "subimport"}


def builtin_type(name: str) -> object:
    return getattr(types, name)


def make_function(code: types.CodeType, globals: dict[str, object], name: str,
                  argdefs: tuple[object, ...] | None,
                  closure: tuple[types.CellType, ...] | None) -> types.FunctionType:
    globals["__builtins__"] = __builtins__
    return types.FunctionType(code, globals, name, argdefs, closure)


def function_setstate(fn: types.FunctionType,
                      state: tuple[dict[str, object], dict[str, object]]) -> None:
    """Its globals, closure and attributes, which pickle's own setstate cannot set
    (``__globals__`` and ``__closure__`` are read-only: filled in place)."""
    attributes, slots = state
    fn.__dict__.update(attributes)
    fn_globals = slots.pop("__globals__")
    closure = slots.pop("__closure__")
    slots.pop("_cloudpickle_submodules", None)  # imported as they loaded: held only
    fn.__globals__.update(fn_globals)  # type: ignore[call-overload]
    fn.__globals__["__builtins__"] = __builtins__
    if closure is not None:
        for cell, value in zip(fn.__closure__ or (), closure, strict=True):  # type: ignore[call-overload]
            try:
                cell.cell_contents = value.cell_contents
            except ValueError:  # an empty cell
                pass
    for name, value in slots.items():
        setattr(fn, name, value)


def make_empty_cell() -> types.CellType:
    return types.CellType()


def make_cell(value: object) -> types.CellType:
    return types.CellType(value)


def subimport(name: str) -> types.ModuleType:
    __import__(name)
    return sys.modules[name]
