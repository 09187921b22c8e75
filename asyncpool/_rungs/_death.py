"""A worker process's states, and how it died."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._call import Chunk


class ProcState(enum.Enum):
    STARTING = "starting"  # forked, initialising
    READY = "ready"        # takes chunks
    RETIRING = "retiring"  # told us it leaves after its chunk: takes nothing more
    DEAD = "dead"


class Death:
    """How a worker died: its chunks (the running one first), whether it crashed on
    the first of them (not killed, not retiring, not idle), the item it was running or
    the function it was loading, and its exit code."""

    __slots__ = ("chunks", "exitcode", "crashed", "culprit", "loading")

    def __init__(self, chunks: list[Chunk], exitcode: int | None) -> None:
        self.chunks, self.exitcode = chunks, exitcode
        self.crashed = False
        self.culprit: int | None = None
        self.loading = 0
