"""Progress reporting for map/imap: a tqdm bar, or a callback(done, total)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ._options import Progress, ProgressCallback

logger = logging.getLogger("asyncpool")

#: Without tqdm, ``progress=True`` logs a line at most this often (seconds).
LOG_EVERY = 2.0


class Reporter:
    """Counts finished items and reports them; a failing callback is logged once."""

    def __init__(self, progress: Progress, total: Callable[[], int | None]) -> None:
        self.done = 0
        #: The input's length, when known (a sequence of the caller's is measured in
        #: the thread that reads it: its __len__ may be slow).
        self._total = total
        self._bar: Any = None
        self._callback: ProgressCallback | None = None
        self._logged = 0.0
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                # No bar without tqdm (the `progress` extra): a log line instead.
                self._callback = self._log
            else:
                self._bar = tqdm(total=total(), unit="item", dynamic_ncols=True)
        elif callable(progress):
            self._callback = progress

    def _log(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY or done == total:
            self._logged = now
            logger.info("progress: %d%s items done", done, f" of {total}" if total else "")

    def advance(self, count: int) -> None:
        if count <= 0:
            return
        self.done += count
        if self._bar is not None:
            if self._bar.total is None and self._total() is not None:
                self._bar.total = self._total()
            self._bar.update(count)
        if self._callback is not None:
            try:
                self._callback(self.done, self._total())
            except Exception:
                logger.exception("the progress callback raised; it will not be called again")
                self._callback = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
