"""A node of the dynamic rendezvous as a coroutine: the asyncio executor of the decision core.

:class:`AsyncRendezvousNode` runs the same decisions as
:class:`~rdzv.rendezvous.dynamic.DynamicRendezvousHandler` (:class:`~rdzv.rendezvous.decision.
RendezvousCore`) over an :class:`~rdzv.store.async_tcp.AsyncTCPStore`, with its keep-alive as a
timer of the event loop instead of a thread. One process can thus run thousands of nodes, each
with its own connection to a real server: the rendezvous benchmarks (``bench/scale.py``) and
asyncio programs that join a rendezvous without a thread per node use it::

    store = await AsyncTCPStore("127.0.0.1", 29500, wait_for_workers=False).connect()
    node = AsyncRendezvousNode("job", store, 2, 4, master_endpoint=("127.0.0.1", 29500))
    done = await node.next_rendezvous()      # Completed: rank, world_size, master
    ...
    await node.shutdown()

The heartbeats go over ``keep_alive_store`` (default: a clone of ``store`` opened on the first
``next_rendezvous``); nodes of one process may share one, as a node-local agent would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from rdzv.errors import RendezvousClosedError, RendezvousError
from rdzv.rendezvous.decision import (
    Bootstrap,
    CleanUp,
    Completed,
    Record,
    RendezvousCore,
    RendezvousSettings,
    RendezvousTimeout,
    Track,
    clean_up_program,
)
from rdzv.rendezvous.liveness import HeartbeatLiveness
from rdzv.rendezvous.ops import (
    Add,
    Call,
    Check,
    CompareSet,
    DeleteKey,
    Effect,
    Get,
    MultiGet,
    MultiSet,
    Op,
    Program,
    ProgramRun,
    Set,
    Wait,
    record_node_lost,
    rendezvous_error,
)
from rdzv.rendezvous.state import RunKeys
from rdzv.store.async_tcp import AsyncTCPStore

__all__ = ["AsyncRendezvousNode", "run_async"]

logger = logging.getLogger("rdzv.rendezvous.async_node")
_T = TypeVar("_T")
_ids = itertools.count()


async def _perform(store: AsyncTCPStore, op: Op) -> Any:
    if isinstance(op, Add):
        return await store.add(op.key, op.amount)
    if isinstance(op, Get):
        return await store.get(op.key, op.timeout)
    if isinstance(op, CompareSet):
        return await store.compare_set(op.key, op.expected, op.desired)
    if isinstance(op, Check):
        return await store.check(op.keys)
    if isinstance(op, MultiGet):
        return await store.multi_get(op.keys, op.timeout)
    if isinstance(op, MultiSet):
        return await store.multi_set(op.keys, op.values)
    if isinstance(op, Set):
        return await store.set(op.key, op.value)
    if isinstance(op, Wait):
        return await store.wait(op.keys, op.timeout)
    if isinstance(op, DeleteKey):
        return await store.delete_key(op.key)
    if isinstance(op, Call):
        raise TypeError(
            "this liveness has no program form (it calls a blocking store): use "
            "HeartbeatLiveness with the asyncio executor"
        )
    raise TypeError(f"not a store operation: {op!r}")


async def run_async(
    store: AsyncTCPStore,
    program: Program[_T],
    effect: Callable[[Effect], Any] | None = None,
    counter: list[int] | None = None,
) -> _T:
    """Run ``program`` on ``store`` in the running event loop; the asyncio twin of
    :func:`~rdzv.rendezvous.ops.run_blocking` (:data:`~rdzv.rendezvous.ops.NOW` is the loop's
    ``time()``). ``counter[0]``, if given, is incremented for each store operation."""
    run = ProgramRun(program, asyncio.get_running_loop().time, effect)
    while (op := run.next_op()) is not None:
        if counter is not None:
            counter[0] += 1
        try:
            run.resolve(await _perform(store, op))
        except Exception as exc:  # handed to the program, which decides
            run.fail(exc)
    return cast(_T, run.value)


class AsyncRendezvousNode:
    """One node of a dynamic rendezvous on an :class:`AsyncTCPStore` (see the module
    docstring). Same rendezvous semantics, keys and arguments as
    :class:`~rdzv.rendezvous.dynamic.DynamicRendezvousHandler` (``run_id``, ``min_nodes``,
    ``max_nodes``, ``local_addr``, ``timeout``, ``keep_alive_interval``,
    ``keep_alive_max_attempt``, ``master_endpoint``, ``key_prefix``), with heartbeat
    liveness; ``keep_alive_store``: the connection the heartbeats use.

    Raises ValueError for bad bounds or intervals (the handler's messages).
    :meth:`next_rendezvous` raises the handler's errors (RendezvousClosedError,
    RendezvousGracefulExitError, RendezvousTimeoutError, RendezvousStateError,
    RendezvousConnectionError).
    """

    def __init__(
        self,
        run_id: str,
        store: AsyncTCPStore,
        min_nodes: int,
        max_nodes: int,
        *,
        local_addr: str = "127.0.0.1",
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: timedelta | float = 5.0,
        keep_alive_max_attempt: int = 3,
        master_endpoint: tuple[str, int] | None = None,
        key_prefix: str | None = None,
        keep_alive_store: AsyncTCPStore | None = None,
    ) -> None:
        self.settings = RendezvousSettings.checked(
            run_id, min_nodes, max_nodes, timeout, keep_alive_interval, keep_alive_max_attempt
        )
        interval = self.settings.keep_alive_interval
        self._store = store
        self._keep_alive_store = keep_alive_store
        self._interval = interval.total_seconds()
        self._master = master_endpoint
        self._local_id = next(_ids)
        self.core = RendezvousCore(
            self.settings,
            RunKeys(key_prefix if key_prefix is not None else f"rdzv/{run_id}/"),
            HeartbeatLiveness(self._interval, keep_alive_max_attempt),
            addr=local_addr,
            pid=os.getpid(),
            local_id=self._local_id,
            nonce=secrets.token_hex(8),
        )
        #: Store operations performed by this node (rendezvous and heartbeats).
        self.ops = [0]
        self._beat_key: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._beating: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False

    @property
    def node(self) -> str:
        """This node's descriptor, ``{addr}_{pid}_{local_id}``."""
        return self.core.node

    async def next_rendezvous(self) -> Completed:
        """Join the next round and wait until it completes (the handler's semantics)."""
        if self._stopped:
            raise RendezvousClosedError(f"The node '{self.node}' has been shut down.")
        if self._keep_alive_store is None:
            self._keep_alive_store = await self._guard(self._store.clone())
        self._arm()
        return await self._run(self.core.next_rendezvous(self._master))

    async def set_closed(self) -> None:
        """Close the rendezvous (the handler's ``set_closed``)."""
        await self._run(self.core.close())

    async def shutdown(self) -> None:
        """Stop the heartbeats and leave the rounds (no close); idempotent."""
        self.stop()
        if self.core.membership is not None or self.core.pending is not None:
            await self._run(self.core.leave_all())

    def stop(self) -> None:
        """Stop the keep-alive timer at once (what a node's death looks like to its peers)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ executor
    async def _run(self, program: Program[_T]) -> _T:
        return await self._guard(run_async(self._store, program, self._effect, self.ops))

    async def _guard(self, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except RendezvousError:
            raise
        except Exception as exc:
            error = rendezvous_error(exc, self.settings.run_id, repr(self._store))
            if error is None:
                raise
            raise error from exc

    def _effect(self, effect: Effect) -> Any:
        if isinstance(effect, Track):
            self._beat_key = effect.key
        elif isinstance(effect, Bootstrap):
            if self._master is None:
                raise RendezvousError(
                    f"The node '{self.node}' became rank 0 without a bootstrap endpoint: "
                    "pass master_endpoint= to AsyncRendezvousNode."
                )
            return self._master
        elif isinstance(effect, CleanUp):
            keys = self.core.keys.of(effect.number)
            self._spawn(run_async(self._store, clean_up_program(keys), None, self.ops))
        elif isinstance(effect, Record):
            record_node_lost(
                type(self).__name__, self.settings.run_id, effect.message, self._local_id
            )
        else:
            raise TypeError(f"no executor for the effect {effect!r}")
        return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.warning("%s: background work failed: %s: %s", self.node, type(exc).__name__, exc)

    # ------------------------------------------------------------------ keep-alive timer
    def _arm(self) -> None:
        if self._timer is None and not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._stopped:
            return
        key = self._beat_key
        if key is not None and (self._beating is None or self._beating.done()):
            self._beating = asyncio.get_running_loop().create_task(self._beat(key))
            self._tasks.add(self._beating)
            self._beating.add_done_callback(self._done)
        self._arm()

    async def _beat(self, key: str) -> None:
        store = self._keep_alive_store
        assert store is not None
        liveness = self.core.liveness
        ok = await run_async(store, liveness.keep_alive_program(key), None, self.ops)
        if not ok and self._beat_key == key:
            self._beat_key = None
            logger.warning(
                "The heartbeat key %r of %s was retired or declared dead by a peer.",
                key,
                self.node,
            )
