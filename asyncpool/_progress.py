"""Progress reporting for map/imap: a tqdm bar, or a callback(done, total)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("asyncpool")

ProgressCallback = Callable[[int, int | None], object]
Progress = bool | ProgressCallback | None


class Reporter:
    """Counts finished items and reports them; a failing callback is logged once."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        self.done = 0
        self.total = total
        self._bar: Any = None
        self._callback: ProgressCallback | None = None
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError(
                    "progress=True draws a bar with tqdm, which is not installed: "
                    "pip install 'asyncpool[progress]' (or pass progress=callback)"
                ) from None
            self._bar = tqdm(total=total, unit="item", dynamic_ncols=True)
        elif callable(progress):
            self._callback = progress
        elif progress not in (None, False):
            raise TypeError(f"progress must be True, False, None or a callable, not {progress!r}")

    def advance(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        if self._callback is not None:
            try:
                self._callback(self.done, self.total)
            except Exception:
                logger.exception("the progress callback raised; it will not be called again")
                self._callback = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
