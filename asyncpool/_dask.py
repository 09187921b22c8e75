"""The dask rung: chunks as tasks on a Dask cluster, awaited on the pool's own loop.

``distributed`` is an optional extra; it is imported only when a cluster is asked for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from loky.process_executor import BrokenProcessPool

from ._backends import Rung
from ._bridge import on_asyncio
from ._retry import RungUnavailable
from ._worker import run_items

_pools = itertools.count()


class DaskKilledWorker(BrokenProcessPool):  # type: ignore[misc]
    """A chunk that Dask gave up on: it killed workers `allowed-failures` times."""


class DaskRung(Rung):
    """Chunks as Dask tasks.

    A ``KilledWorker`` is counted as one crash of the chunk, not as proof: Dask raises
    it for every task queued on a worker that died (with ``allowed-failures`` spent),
    innocent neighbours included, so an item needs ``max_crashes_per_item`` of them,
    alone.
    """

    name = "dask"
    exact_crashes = False

    def __init__(self, client: Any, owned: bool) -> None:
        super().__init__()
        self.client = client
        self.owned = owned
        self._prefix = f"asyncpool-{next(_pools)}-"
        self._relays: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(cls, address: str | None, client: Any, timeout: float) -> DaskRung:
        if not on_asyncio():
            raise NotImplementedError("the dask rung runs on asyncio only (distributed's "
                                      "asynchronous Client needs an asyncio loop)")
        try:
            from distributed import Client
        except ImportError:
            raise ImportError("a Dask cluster needs the 'distributed' package: "
                              "pip install 'asyncpool[dask]'") from None
        if client is not None:
            return cls(client, owned=False)
        try:
            connected = await asyncio.wait_for(
                Client(address, asynchronous=True,  # type: ignore[no-untyped-call]
                       timeout=f"{timeout}s"), timeout + 1)
        except (OSError, TimeoutError) as exc:
            raise RungUnavailable(f"the Dask scheduler at {address} did not answer within "
                                  f"{timeout} s: {exc}") from exc
        return cls(connected, owned=True)

    def submit(self, fn: Callable[..., Any], items: Sequence[Any], star: bool,
               retries: int, key: str) -> cf.Future[Any]:
        bridge: cf.Future[Any] = cf.Future()
        task = self.client.submit(run_items, fn, list(items), star, retries,
                                  key=self._prefix + key, pure=False)
        relay = asyncio.ensure_future(self._relay(task, bridge))
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        return bridge

    async def _relay(self, task: Any, bridge: cf.Future[Any]) -> None:
        """Await the Dask future natively and pass its outcome on."""
        from distributed import KilledWorker

        waiter = asyncio.ensure_future(task.result())
        bridge.add_done_callback(lambda b: b.cancelled() and waiter.cancel())
        try:
            result = await waiter
        except asyncio.CancelledError:
            await self.client.cancel(task)
            if not bridge.done():
                bridge.cancel()
            return
        except KilledWorker as exc:
            error: BaseException | None = DaskKilledWorker(str(exc))
        except Exception as exc:
            error = exc
        else:
            if not bridge.done():
                bridge.set_result(result)
            return
        if not bridge.done():
            bridge.set_exception(error)

    def suspect(self, key: str) -> tuple[int | None, str] | None:
        return None, "Dask reported KilledWorker for it"

    def kill_chunks(self, keys: list[str]) -> bool:
        # Dask cannot stop a running task; cancelling forgets it and frees its slot.
        return False

    async def aclose(self, kill: bool) -> None:
        for relay in list(self._relays):
            relay.cancel()
        if self.owned:
            await self.client.close()
