"""A fake rung for ladder and engine tests: the seam where faults are chosen exactly.

It stands in for a real rung through ``asyncpool._rungs.FACTORIES`` and runs chunks in
the parent on the loop, reporting to the listener exactly as a real rung does. The
:class:`Script` says what goes wrong: starts that fail (as on a machine out of
processes), items that "crash their worker", chunks held until released. Faults aimed
this precisely are for exact lines; the real faults are in the other test modules.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from asyncpool import _rungs
from asyncpool._rungs.base import Rung, RungState


@dataclass
class Script:
    #: Starts of this rung that fail with EAGAIN before one succeeds.
    failing_starts: int = 0
    #: Raise this (non-transient) error instead when starting.
    start_error: BaseException | None = None
    #: Seconds each start takes.
    start_delay: float = 0.0
    #: Chunks the rung takes at once.
    capacity: int = 4
    #: An item for which this is true "kills its worker" every time it runs.
    crashes: Callable[[Any], bool] = lambda item: False
    #: While set, chunks wait until released (to hold slots busy).
    holding: bool = False
    #: Raised by submit (a fault of the engine's own code, not of an item).
    submit_error: Exception | None = None
    #: Whether submit raises it only after taking the chunk (which then runs).
    submit_error_late: bool = False
    # What happened:
    starts: int = 0
    chunk_sizes: list[int] = field(default_factory=list)
    chunk_calls: list[int] = field(default_factory=list)
    ran: list[Any] = field(default_factory=list)
    rungs: list[FakeRung] = field(default_factory=list)

    def release(self) -> None:
        self.holding = False
        for rung in self.rungs:
            rung.run_held()


class FakeRung(Rung):

    def __init__(self, name: str, script: Script, listener: Any, loop: Any) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.script, self.listener, self.loop = script, listener, loop
        self.held: list[Any] = []
        self.cancelled: set[int] = set()

    def crash(self, error: BaseException | None = None) -> None:
        """It stops serving, as a lost cluster or a rung with no worker left does (the
        test tells the listener when it likes)."""
        self._out_of_service(error)

    def offer(self) -> int | None:
        ok = self.state is RungState.SERVING and self.in_flight < self.script.capacity
        return None if ok else 0

    def submit(self, chunk: Any) -> None:
        if self.script.submit_error is not None and not self.script.submit_error_late:
            raise self.script.submit_error
        chunk.rung = self
        self._in_flight += 1
        self.script.chunk_sizes.append(chunk.size)
        self.script.chunk_calls.append(len(chunk.calls()))
        if self.script.holding:
            self.held.append(chunk)
        else:
            self.loop.call_soon(lambda: self._run(chunk))
        if self.script.submit_error is not None:
            raise self.script.submit_error

    def _release(self) -> None:
        """A chunk leaves (the one place): before its final report, as a real rung."""
        self._in_flight -= 1

    def run_held(self) -> None:
        held, self.held = self.held, []
        for chunk in held:
            self._run(chunk)

    def cancel(self, calls: Any) -> None:
        self.cancelled.update(calls)

    def kill(self, chunks: Any, calls: Any = None) -> bool:
        for chunk in list(chunks):
            if chunk in self.held:
                self.held.remove(chunk)
                self._release()
                self.listener.chunk_lost(chunk)
        return True

    def _run(self, chunk: Any) -> None:
        results: list[Any] = []
        errors: dict[int, BaseException] = {}
        position = 0
        for piece in chunk.pieces:
            for item in piece.items:
                if self.script.crashes(item):
                    if position:
                        self.listener.chunk_progress(chunk, 0, position, results, errors)
                    self._release()
                    self.listener.worker_crashed("fake worker died")
                    self.listener.chunk_crashed(chunk, position, -9)
                    return
                self.script.ran.append(item)
                try:
                    results.append(piece.call.fn(*item) if piece.call.star
                                   else piece.call.fn(item))
                except Exception as exc:
                    results.append(None)
                    errors[position] = exc
                position += 1
        self.listener.chunk_progress(chunk, 0, position, results, errors)
        self._release()
        self.listener.chunk_done(chunk, position, 0.0001 * position)

    async def aclose(self, kill: bool) -> None:
        self._move(RungState.CLOSED)
        for chunk in self.held:
            self._release()
            self.listener.chunk_lost(chunk)
        self.held = []


@contextmanager
def fake_rungs(monkeypatch: pytest.MonkeyPatch, **scripts: Script) -> Iterator[None]:
    """Stand a fake rung in for each named rung, following its script."""

    def factory(name: str, script: Script) -> Any:
        async def create(config: Any, listener: Any, loop: Any) -> Rung:
            script.starts += 1
            if script.start_delay:
                import anyio

                await anyio.sleep(script.start_delay)
            if script.start_error is not None:
                raise script.start_error
            if script.starts <= script.failing_starts:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            rung = FakeRung(name, script, listener, loop)
            script.rungs.append(rung)
            return rung

        return create

    for name, script in scripts.items():
        monkeypatch.setitem(_rungs.FACTORIES, name, factory(name, script))
    yield
