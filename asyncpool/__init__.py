"""asyncpool: CPU-bound work from async code, in worker processes that survive faults.

The names below load on first use (PEP 562): worker processes import
``asyncpool._worker``, and must not pay for anyio and the pool machinery to do so.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# Not `from typing import TYPE_CHECKING`: the fork server imports this package, and
# importing typing would add ~10 ms to every pool's first start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._config import PoolConfig as PoolConfig
    from ._errors import MISSING as MISSING
    from ._errors import AsyncPoolError as AsyncPoolError
    from ._errors import DeadlineExceeded as DeadlineExceeded
    from ._errors import FunctionUnavailable as FunctionUnavailable
    from ._errors import InitializerFailed as InitializerFailed
    from ._errors import PoolClosed as PoolClosed
    from ._errors import PoolUnavailable as PoolUnavailable
    from ._errors import RemoteError as RemoteError
    from ._errors import RemoteTraceback as RemoteTraceback
    from ._errors import SerializationError as SerializationError
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._events import EventHook as EventHook
    from ._events import PoolEvent as PoolEvent
    from ._events import PoolStatistics as PoolStatistics
    from ._options import CallKwargs as CallKwargs
    from ._config import PoolOptions as PoolOptions
    from ._consume import ResultStream as ResultStream
    from ._pool import ResilientPool as ResilientPool

_WHERE = {
    "MISSING": "._errors",
    "AsyncPoolError": "._errors",
    "CallKwargs": "._options",
    "DeadlineExceeded": "._errors",
    "EventHook": "._events",
    "FunctionUnavailable": "._errors",
    "InitializerFailed": "._errors",
    "PoolClosed": "._errors",
    "PoolConfig": "._config",
    "PoolEvent": "._events",
    "PoolOptions": "._config",
    "PoolStatistics": "._events",
    "PoolUnavailable": "._errors",
    "RemoteError": "._errors",
    "RemoteTraceback": "._errors",
    "ResilientPool": "._pool",
    "ResultStream": "._consume",
    "SerializationError": "._errors",
    "WorkerCrashed": "._errors",
}

__all__ = (
    "MISSING",
    "AsyncPoolError",
    "CallKwargs",
    "DeadlineExceeded",
    "EventHook",
    "FunctionUnavailable",
    "InitializerFailed",
    "PoolClosed",
    "PoolConfig",
    "PoolEvent",
    "PoolOptions",
    "PoolStatistics",
    "PoolUnavailable",
    "RemoteError",
    "RemoteTraceback",
    "ResilientPool",
    "ResultStream",
    "SerializationError",
    "WorkerCrashed",
)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'asyncpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
