"""Fixtures shared by the whole suite.

Async tests are marked ``anyio`` and run once on asyncio and once on trio (anyio's
pytest plugin, through the ``anyio_backend`` fixture below; ``ASYNCPOOL_TEST_BACKENDS=
asyncio`` runs one of them, as CI does on its second and third Python). Tests of
asyncio-only features (Dask) are marked ``asyncio_only`` (a ``reason=`` of their own,
or Dask's): on trio they skip, saying why. No other async plugin is installed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Cgroup, ThreadStarts, children, settle


@pytest.fixture(params=os.environ.get("ASYNCPOOL_TEST_BACKENDS", "asyncio,trio").split(","))
def anyio_backend(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("asyncio_only")
    if request.param != "asyncio" and marker is not None:
        pytest.skip(marker.kwargs.get("reason", "Dask's asynchronous client needs an "
                                      "asyncio loop: the dask rung refuses trio "
                                      "(NotImplementedError)"))
    return str(request.param)


def ours() -> set[int | None]:
    """Live threads, less trio's cache of idle worker threads (each leaves after 10 s
    idle, by trio's design, as the fork server stays by ours)."""
    return {t.ident for t in threading.enumerate() if not t.name.startswith("Trio thread")}


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Threads and child processes return to where they were (as dask's checks do)."""
    threads_before = ours()
    children_before = children()
    yield
    # Idle input threads are kept 5 s for the next input, by design: let them go now.
    from asyncpool._puller import Puller

    Puller.release_idle()
    ok_threads = settle(lambda: ours() <= threads_before)
    ok_children = settle(lambda: children() <= children_before)
    extra_threads = [t.name for t in threading.enumerate()
                     if t.ident in ours() - threads_before]
    assert ok_threads, f"threads leaked: {extra_threads}"
    assert ok_children, f"child processes leaked: {children() - children_before}"


@pytest.fixture
def thread_starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadStarts]:
    """Make chosen thread starts fail as on a machine out of threads."""
    starts = ThreadStarts()
    monkeypatch.setattr(threading.Thread, "start", lambda self: starts(self))
    yield starts


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A fresh pids cgroup (root only); skips where none can be made."""
    with Cgroup.create() as path:
        yield path
