from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psutil
import pytest


def _children() -> set[int]:
    """Child processes, less loky's resource tracker (one per interpreter, by design)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        found.add(child.pid)
    return found


def _settle(check: callable, timeout: float = 10.0) -> bool:  # type: ignore[valid-type]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Threads and child processes return to where they were (as dask's checks do)."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _children()
    yield
    ok_threads = _settle(lambda: {t.ident for t in threading.enumerate()} <= threads_before)
    ok_children = _settle(lambda: _children() <= children_before)
    extra_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    extra_children = _children() - children_before
    assert ok_threads, f"threads leaked: {extra_threads}"
    assert ok_children, f"child processes leaked: {extra_children}"
