"""The pool's initializer on a Dask cluster: a worker plugin registered as the rung
starts (a hung or failing initializer told apart from a worker that stopped answering),
and unregistered as it closes, or later by a rung that finds it left behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .._errors import InitializerFailed
from .._retry import RungUnavailable
from .._share import dumps_for_workers
from . import _dask_sweep
from ._dask_client import answers

if TYPE_CHECKING:
    from .._config import PoolConfig

logger = logging.getLogger("asyncpool")


#: Initializer plugins left on a scheduler by rungs that could not unregister them
#: (it did not answer as they closed), by the scheduler's id (a restarted scheduler
#: has none left): a later rung of this process there removes them, or the close of a
#: pool given its client; else workers joining would run them for good.
_LEFT: dict[str | None, set[str]] = {}


async def unregister_quietly(client: Any, name: str) -> bool:
    """Unregister the worker plugin ``name``; False if the scheduler did not answer."""
    try:
        await asyncio.wait_for(client.unregister_worker_plugin(name), 5)
    except Exception as exc:  # not there (a restarted scheduler) is as good as gone
        return not isinstance(exc, OSError | TimeoutError)  # CommClosedError is an OSError
    except BaseException:
        return False
    return True


async def unregister_initializers(client: Any, scheduler: str | None, name: str | None,
                                  answering: bool) -> None:
    """A closing rung's initializer plugin ``name`` leaves the cluster (whose
    scheduler's id is ``scheduler``), and those earlier rungs left there; what cannot
    leave now (``answering`` False: the scheduler did not answer, or is gone) is left
    for later. The first that gets no answer ends the try (each waits 5 s)."""
    left = _LEFT.setdefault(scheduler, set())
    if name is not None:
        left.add(name)
    if answering:
        for plugin in sorted(left):
            if not await unregister_quietly(client, plugin):
                break
            left.discard(plugin)
    if not left and _LEFT.get(scheduler) is left:  # (another may have emptied it too)
        del _LEFT[scheduler]


async def unregister_left_with(client: Any) -> None:
    """At the close of a pool given ``client``: what rungs left on its scheduler
    (a rung given up on it could not; none climbed back since) leaves now."""
    try:
        scheduler = (client.scheduler_info() or {}).get("id")
    except Exception:  # a client in a state of its own: nothing is known of it
        return
    if scheduler in _LEFT and getattr(client, "status", "") == "running":
        await unregister_initializers(client, scheduler, None, True)


async def register_initializer(client: Any, config: PoolConfig, name: str, space: str,
                               scheduler_id: str | None) -> None:
    """Run the config's initializer on every worker (and each that joins), as a
    worker plugin. InitializerFailed if it raised or hung there; RungUnavailable if
    the scheduler went away meanwhile (not the initializer's fault: that would keep
    the pool off the cluster for good)."""
    from ._dask_plugin import InitializerPlugin

    blob = dumps_for_workers((config.initializer, config.initargs))
    timeout = config.start_timeout
    started = asyncio.get_running_loop().time()
    await _unregister_gone(client, config.dask_connect_timeout)
    try:
        await _while_answering(client.register_plugin(
            InitializerPlugin(blob, space, name, timeout), name=name), client, timeout,
            config.dask_connect_timeout)
    except RungUnavailable:
        raise
    except Exception as exc:
        # Whatever it raised (an OSError or a CommClosedError of its own too), it is
        # the initializer's fault only if the client's connection held and the same
        # scheduler still answers (one restarted at once answers, as another).
        if getattr(client, "status", "running") != "running" or not await answers(
                client, config.dask_connect_timeout, scheduler_id):
            raise RungUnavailable(f"the Dask scheduler was lost while the initializer "
                                  f"was registered: {exc!r}") from exc
        elapsed = asyncio.get_running_loop().time() - started
        if isinstance(exc, TimeoutError) and timeout is not None and elapsed >= timeout:
            # One that hangs runs in a thread (see _dask_plugin): its worker still
            # answers. One that does not (stopped, say) never ran it: not its fault.
            silent = await _on_scheduler(client, _dask_sweep.silent_workers, timeout=min(
                config.dask_connect_timeout, 5))
            if silent:
                raise RungUnavailable(
                    f"Dask worker(s) {', '.join(silent)} stopped answering the scheduler "
                    "while the initializer was registered (stopped or overloaded)") from None
            raise InitializerFailed.timed_out(config.initializer, timeout,
                                              " on a Dask worker") from None
        from distributed.comm.core import CommClosedError

        # A worker that died running it (os._exit) is a connection the scheduler lost.
        where = "on a Dask worker" + (", or the worker died running it" if isinstance(
            exc, CommClosedError) else "")
        raise InitializerFailed.raised(config.initializer, exc, where) from exc


async def _unregister_gone(client: Any, timeout: float) -> None:
    """The initializer plugins of pools whose client is gone (killed, or left open at
    exit) leave the cluster: every worker that joined ran them, for good, and kept
    what they set."""
    for name in await _on_scheduler(client, _dask_sweep.plugins_of_gone_clients,
                                    timeout=timeout):
        logger.info("the initializer of a pool whose client is gone leaves the "
                    "cluster: %s", name)
        await unregister_quietly(client, name)


async def _on_scheduler(client: Any, function: Callable[..., list[str]], **kwargs: Any
                        ) -> list[str]:
    """``function`` (of _dask_sweep) run on the scheduler, within ``timeout``; nothing
    if it could not run there (a scheduler that refuses pickled code, say)."""
    import cloudpickle

    timeout = kwargs.pop("timeout")
    # By value while it is sent, and no longer: left registered, it made every script
    # function's pickle in this process be made again on each call (see _functions).
    registered = _dask_sweep.__name__ in cloudpickle.list_registry_pickle_by_value()
    cloudpickle.register_pickle_by_value(_dask_sweep)
    try:
        return list(await asyncio.wait_for(client.run_on_scheduler(function, **kwargs),
                                           timeout))
    except Exception as exc:
        logger.debug("%s could not run on the Dask scheduler: %r", function.__name__, exc)
        return []
    finally:
        if not registered:
            cloudpickle.unregister_pickle_by_value(_dask_sweep)


async def _while_answering(work: Coroutine[Any, Any, Any], client: Any,
                           timeout: float | None, every: float) -> None:
    """Await ``work`` for up to ``timeout`` (TimeoutError), giving up as soon as the
    scheduler stops answering, as it is asked every ``every`` seconds (a hung one kept
    a pool opening for the whole start_timeout, a minute by default)."""
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    task = asyncio.ensure_future(work)
    try:
        while True:
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError
            step = every if left is None else min(every, left)
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                task.result()
                return
            if not await answers(client, every):
                raise RungUnavailable("the Dask scheduler stopped answering")
    finally:
        if not task.done():
            task.cancel()
