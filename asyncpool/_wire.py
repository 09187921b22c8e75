"""Frames on a worker's socket, shared by the parent and the worker.

A frame is a header (its kind and how many parts it has), the length of each part, then
the parts. A pickled message is one part and every out-of-band buffer of its pickle
(protocol 5) another, so a 200 MB ``bytes`` crosses without being copied into a pickle:
the parent sends it from where it lies and receives a result straight into the object
that the caller gets. This module imports little: worker processes load it.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from collections import namedtuple

from ._share import dumps_for_workers

TYPE_CHECKING = False  # not typing's: worker processes import this module quickly
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    Parts = list[Any]

HEADER = struct.Struct("<BxxxI")
#: A part's length; its top bit says the part was read-only where it was sent from (a
#: ``bytes``), so that the receiver rebuilds a writable buffer (a NumPy array's data, a
#: ``bytearray``) as writable, and a read-only one without a copy.
LENGTH = struct.Struct("<Q")
READ_ONLY = 1 << 63
#: A chunk's first part, read before its pickles: (chunk number, flush seconds, how
#: many parts the functions take). The functions travel apart from the items, so an
#: item that does not unpickle in the worker cannot take them down with it.
CHUNK_HEAD = struct.Struct("<qdi")

#: The worker's progress area (int64 slots in shared memory the parent reads after a
#: crash): the chunk it runs, the position of the item it runs (-1: none yet), the
#: function it is loading (0: none), and while it pickles results, the position after
#: the last of them (0: none; a crash then is one of theirs, not the running item's;
#: negative while an item runs: one of theirs or the item's, not known which).
SEQ, POSITION, LOADING, SENDING = 0, 1, 2, 3

# Parent -> worker
INIT, CHUNK, CANCEL, WITHDRAW = 1, 2, 3, 5  # 4 was a stop the worker never needed
# Worker -> parent
READY, INIT_FAILED, RESULTS, WITHDRAWN, CUT = 10, 11, 12, 13, 14
_KINDS = frozenset({INIT, CHUNK, CANCEL, WITHDRAW, READY, INIT_FAILED, RESULTS, WITHDRAWN,
                    CUT})
#: No frame has more parts, or bytes, than this (a stream that says so is not ours:
#: a task wrote to the worker's socket).
MOST_PARTS, MOST_BYTES = 1 << 24, 1 << 42

#: A ``bytes`` item or result this big (see :func:`wrap_big`) travels out of band.
BIG = 64 << 10
#: Frames up to this size are read into one buffer; bigger parts get their own.
SMALL_FRAME = 1 << 20
#: The most one turn of the loop reads or writes on one socket: a peer that keeps the
#: socket full (a 200 MB result) must not hold the loop for the whole transfer.
TURN_BYTES = 4 << 20
#: The longest (s) one turn spends reading one socket and decoding what it read.
TURN_SECONDS = 0.001

if TYPE_CHECKING:
    from typing import NamedTuple

    class ResultMeta(NamedTuple):
        """What a RESULTS frame says about the results it carries (it travels as a
        plain tuple)."""

        seq: int                   # the chunk
        first: int                 # positions [first, upto) in it
        upto: int
        errors: list[Any]          # (position, pickled error, traceback text) each
        done: bool                 # the chunk ended (at upto: the rest runs elsewhere)
        end: tuple[list[float], int]  # at its end: seconds spent per run, retries made
        retiring: str | None       # the worker leaves after this chunk, and why
        arguments_unloadable: bool  # the items did not unpickle (errors[0] says)
else:  # the same, without importing typing in every fork server (3 ms of its start)
    ResultMeta = namedtuple("ResultMeta", "seq first upto errors done end retiring "
                                          "arguments_unloadable")


class BigBytes:
    """Marks a large ``bytes`` or ``bytearray`` to be pickled out of band (rebuilt as
    the same type, from the receiver's buffer without a copy where it can). A
    ``bytes`` travels without a copy; a ``bytearray`` is copied once."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if type(self.data) is bytes:
            return (bytes, (pickle.PickleBuffer(self.data),))
        # A bytearray is copied (as pickling in band would): it leaves as it was when
        # its call began, and its owner may change or resize it while it travels.
        return (as_bytearray, (pickle.PickleBuffer(bytearray(self.data)),))


def as_bytearray(buffer: Any) -> bytearray:
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def wrap_big(values: Sequence[Any], depth: int = 2, memo: dict[int, Any] | None = None
             ) -> list[Any]:
    """``values`` with each large ``bytes`` or ``bytearray`` marked: at the top level,
    or inside a tuple, list or dict (``depth`` levels down, in containers of at most
    :data:`LOOK_INSIDE` elements, or :data:`LOOK_ALONG` that hold bytes among them).
    An object met twice is replaced by one and the same copy (``memo``, by id), so it
    still is one object where it arrives."""
    memo = {} if memo is None else memo
    return [_wrap(value, depth, memo) for value in values]


#: Containers this small are looked into for large bytes (a cheap look); bigger ones,
#: up to LOOK_ALONG elements, only if bytes stand among their elements (a look at
#: their types, at C speed: about 1.5 ms for 100,000).
LOOK_INSIDE, LOOK_ALONG = 64, 100_000
_BYTES = frozenset((bytes, bytearray))


def _wrap(value: Any, depth: int, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind is bytes or kind is bytearray:
        if len(value) < BIG:
            return value
    elif not depth or (kind is not tuple and kind is not list and kind is not dict) or (
            len(value) > LOOK_INSIDE and (len(value) > LOOK_ALONG or _BYTES.isdisjoint(
                map(type, value.values() if kind is dict else value)))):
        return value
    found = memo.get(id(value))
    if found is not None:
        return found
    if kind is bytes or kind is bytearray:
        wrapped: Any = BigBytes(value)
    elif kind is tuple:
        memo[id(value)] = value  # (a cycle through it meets it as it is)
        items = [_wrap(v, depth - 1, memo) for v in value]
        wrapped = value if all(a is b for a, b in zip(items, value, strict=True)) else (
            tuple(items))
    else:
        # Its copy stands in for it first: one that holds itself holds its copy (it
        # held a chain of copies, depth long, and came back without itself).
        copy: Any = {} if kind is dict else []
        memo[id(value)] = copy
        if kind is dict:
            inner = {k: _wrap(v, depth - 1, memo) for k, v in value.items()}
            changed = any(inner[k] is not v for k, v in value.items())
            copy.update(inner)
        else:
            items = [_wrap(v, depth - 1, memo) for v in value]
            changed = not all(a is b for a, b in zip(items, value, strict=True))
            copy.extend(items)
        wrapped = copy if changed else value
    memo[id(value)] = wrapped
    return wrapped


def dumps(obj: Any, *, by_value: bool = False, for_workers: bool = False) -> Parts:
    """Pickle ``obj`` into parts: the pickle, then its out-of-band buffers.

    ``by_value`` uses cloudpickle, which also takes lambdas, closures and classes
    defined in ``__main__``; ``for_workers``, as the workers need the script's cached
    functions too (see :func:`asyncpool._share.dumps_for_workers`).
    """
    buffers: list[pickle.PickleBuffer] = []
    if by_value and for_workers:
        data = dumps_for_workers(obj, buffer_callback=buffers.append)
    elif by_value:
        import cloudpickle

        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    else:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [data, *(b.raw() for b in buffers)]


def dumps_any(obj: Any, for_workers: bool = False) -> Parts:
    """Pickle with the standard pickler, or cloudpickle where that refuses. What goes
    to workers (``for_workers``) also goes by cloudpickle where it names something of
    the caller's main script (a dataclass item, a function): the workers have none."""
    try:
        parts = dumps(obj)
    except Exception:
        return dumps(obj, by_value=True, for_workers=for_workers)
    if for_workers and _MAIN in parts[0]:
        return dumps(obj, by_value=True, for_workers=True)
    return parts


#: How a pickle names the module ``__main__`` (protocol 4 and up).
_MAIN = b"\x8c\x08__main__"


def loads(parts: Sequence[Any]) -> Any:
    return pickle.loads(parts[0], buffers=parts[1:])


def frame(kind: int, parts: Sequence[Any]) -> list[Any]:
    """The buffers to send for one frame."""
    views = [memoryview(p) for p in parts]
    head = HEADER.pack(kind, len(parts)) + b"".join(
        LENGTH.pack(v.nbytes | (READ_ONLY if v.readonly else 0)) for v in views)
    return [head, *parts]


# -- blocking I/O (the worker) -------------------------------------------------------


def send_frame(sock: socket.socket, kind: int, parts: Sequence[Any]) -> None:
    views = [memoryview(b).cast("B") for b in frame(kind, parts)]
    views = [v for v in views if v.nbytes]
    while views:
        sent = sock.sendmsg(views[:64])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def recv_frame(sock: socket.socket) -> tuple[int, Parts] | None:
    """One whole frame; None when the other end closed."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    kind, count = HEADER.unpack(head)
    sizes = _recv_exact(sock, LENGTH.size * count)
    if sizes is None:
        return None
    parts: Parts = []
    for i in range(count):
        (size,) = LENGTH.unpack_from(sizes, i * LENGTH.size)
        part = _recv_exact(sock, size & ~READ_ONLY)
        if part is None:
            return None
        parts.append(part)
    return kind, parts


# -- non-blocking I/O (the parent, on its event loop) --------------------------------


def _uninitialised(kind: str, size: int) -> Any:
    """A ``bytes`` or ``bytearray`` of ``size`` bytes, left as it is allocated (no
    zero-filling: it is about to be filled from the socket), or None off CPython."""
    try:
        import ctypes

        make = getattr(ctypes.pythonapi, f"Py{kind}_FromStringAndSize")
        make.restype = ctypes.py_object
        make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        return make(None, size)
    except Exception:  # pragma: no cover - not CPython
        return None


def _new_bytes(size: int) -> Any:
    """A writable buffer that becomes ``bytes`` without a copy where CPython allows.

    ``bytes(buffer)`` of an exact ``bytes`` returns it as is, so a large result read
    straight into a fresh ``bytes`` object reaches the caller with no copy made while
    holding the interpreter lock (copying 200 MB takes about 100 ms here).
    """
    blob = _uninitialised("Bytes", size)
    if blob is None:  # pragma: no cover - not CPython
        return _writable(size)
    import ctypes

    # The data of a bytes object starts where its header ends.
    offset = bytes.__basicsize__ - 1
    view = (ctypes.c_char * size).from_address(id(blob) + offset)
    return blob, memoryview(view).cast("B")


class FrameReader:
    """Reassembles frames from a non-blocking socket, reading only what is there."""

    def __init__(self) -> None:
        self._buf = bytearray()
        # The big frame being read part by part: (kind, [(object, view)], index, filled)
        self._big: tuple[int, list[tuple[Any, memoryview]]] | None = None
        self._part = 0
        self._filled = 0

    def read(self, sock: socket.socket, deliver: Callable[[int, Parts], None]) -> bool:
        """Read what the socket holds (up to :data:`TURN_BYTES`), passing each whole
        frame on; False at end-of-file."""
        budget = TURN_BYTES
        stop = time.perf_counter() + TURN_SECONDS
        while budget > 0 and time.perf_counter() < stop:
            try:
                if self._big is not None:
                    kind, parts = self._big
                    obj, view = parts[self._part]
                    n = sock.recv_into(view[self._filled:]) if view.nbytes else 0
                    if view.nbytes and n == 0:
                        return False
                    budget -= n
                    self._filled += n
                    if self._filled >= view.nbytes:
                        self._part += 1
                        self._filled = 0
                        if not self._next_big_part(deliver):
                            return False
                    continue
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            budget -= len(data)
            self._buf += data
            if not self._parse(deliver):
                return False  # as if the peer had closed it: what sent that is broken
        return True

    def _parse(self, deliver: Callable[[int, Parts], None]) -> bool:
        """Deliver the whole frames read; False if what was read is no frame."""
        buf = self._buf
        pos = 0
        while self._big is None and len(buf) - pos >= HEADER.size:
            kind, count = HEADER.unpack_from(buf, pos)
            if kind not in _KINDS or count > MOST_PARTS:
                return False
            sizes_end = pos + HEADER.size + LENGTH.size * count
            if len(buf) < sizes_end:
                break
            flagged = [LENGTH.unpack_from(buf, pos + HEADER.size + LENGTH.size * i)[0]
                       for i in range(count)]
            sizes = [size & ~READ_ONLY for size in flagged]
            total = sum(sizes)
            if total > MOST_BYTES:
                return False
            if total <= SMALL_FRAME:
                if len(buf) - sizes_end < total:
                    break
                parts: Parts = []
                at = sizes_end
                for size, flag in zip(sizes, flagged, strict=True):
                    kept = bytes if flag & READ_ONLY else bytearray
                    parts.append(kept(buf[at:at + size]))
                    at += size
                pos = at
                deliver(kind, parts)
                continue
            # A big frame: each part gets its own buffer, filled first from what is
            # already here, then straight from the socket.
            big = [_new_bytes(size) if size >= BIG and flag & READ_ONLY else _writable(size)
                   for size, flag in zip(sizes, flagged, strict=True)]
            at = sizes_end
            self._big, self._part, self._filled = (kind, big), 0, 0
            while self._part < len(big):
                obj, view = big[self._part]
                take = min(view.nbytes - self._filled, len(buf) - at)
                view[self._filled:self._filled + take] = buf[at:at + take]
                at += take
                self._filled += take
                if self._filled < view.nbytes:
                    break
                self._part += 1
                self._filled = 0
            pos = at
            del buf[:pos]
            pos = 0
            if not self._next_big_part(deliver):
                return False
            buf = self._buf
        del buf[:pos]
        return True

    def _next_big_part(self, deliver: Callable[[int, Parts], None]) -> bool:
        assert self._big is not None
        kind, parts = self._big
        if self._part < len(parts):
            return True
        self._big = None
        deliver(kind, [obj for obj, _ in parts])
        return self._parse(deliver)


def _writable(size: int) -> tuple[bytearray, memoryview]:
    """A ``bytearray`` to read a writable part into. A big one is not zero-filled
    first (``bytearray(size)`` writes 200 MB of zeros in about 100 ms, on the loop)."""
    buf = _uninitialised("ByteArray", size) if size >= BIG else None
    if buf is None:
        buf = bytearray(size)
    return buf, memoryview(buf)
