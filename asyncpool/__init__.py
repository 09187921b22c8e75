"""asyncpool: CPU-bound work from async code, in worker processes that survive faults."""

from ._config import PoolConfig as PoolConfig
from ._errors import MISSING as MISSING
from ._errors import AsyncPoolError as AsyncPoolError
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import PoolClosed as PoolClosed
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SerializationError as SerializationError
from ._errors import WorkerCrashed as WorkerCrashed
from ._events import EventHook as EventHook
from ._events import PoolEvent as PoolEvent
from ._events import PoolStatistics as PoolStatistics
from ._pool import ResilientPool as ResilientPool

__all__ = (
    "MISSING",
    "AsyncPoolError",
    "DeadlineExceeded",
    "EventHook",
    "PoolClosed",
    "PoolConfig",
    "PoolEvent",
    "PoolStatistics",
    "RemoteTraceback",
    "ResilientPool",
    "SerializationError",
    "WorkerCrashed",
)
