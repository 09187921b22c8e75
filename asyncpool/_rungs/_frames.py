"""A chunk as the process rung sends it to a worker (see ``_worker.run_chunk``)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import _wire

if TYPE_CHECKING:
    from .._call import Chunk
    from .._functions import Shipped


def chunk_frame(seq: int, flush: float, functions: Iterable[Shipped], forget: list[int],
                runs: list[Any]) -> _wire.Parts:
    """Its head (number, how often results go back, the shipment's size), the
    functions it ships (id, pickle, its buffers, whether it is kept: Shipped.kept) and
    the ids the worker may drop, then its runs: one per call (function id, whether its
    items are argument tuples, call id, items)."""
    shipping = _wire.dumps(([(f.id, pickle.PickleBuffer(f.blob),
                              [pickle.PickleBuffer(b) for b in f.buffers], f.kept)
                             for f in functions], forget))
    head = _wire.CHUNK_HEAD.pack(seq, flush, len(shipping))
    return [head, *shipping, *_wire.dumps_any(runs, for_workers=True)]


def runs_of(chunk: Chunk) -> list[Any]:
    """The chunk's runs, large bytes in its items marked to travel out of band."""
    return [(p.call.shipped.id, p.call.star, p.call.id,
             # A call's arguments (starmap, run) are one level more.
             _wire.wrap_big(p.items, 3 if p.call.star else 2) if _big(p) else p.items)
            for p in chunk.pieces]


def _big(piece: Any) -> bool:
    # Small chunks are checked item by item (cheap); big ones only if items were big.
    per_item = piece.call.timing.bytes_per_item
    return len(piece.items) <= 64 or (per_item is not None and per_item >= _wire.BIG // 2)
