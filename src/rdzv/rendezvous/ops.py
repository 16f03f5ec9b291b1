"""The operations a rendezvous decision asks for, and the blocking executor that performs them.

The dynamic rendezvous decides in generators (:mod:`rdzv.rendezvous.decision`,
:mod:`rdzv.rendezvous.liveness`): a *program* yields an operation (a store call such as
:class:`Add`, the time :data:`NOW`, or an effect of the handler such as "beat this key from now
on"), the executor performs it and sends the result back (or throws the store's exception into
the program). A program never touches a socket, a thread or a clock itself, so the same code runs
one node on a blocking :class:`~rdzv.store.base.Store` (:func:`run_blocking`, used by
:class:`~rdzv.rendezvous.dynamic.DynamicRendezvousHandler`), thousands of nodes as coroutines
over :class:`~rdzv.store.async_tcp.AsyncTCPStore` (:mod:`rdzv.rendezvous.async_node`), and no
node at all in a unit test that answers each operation by hand. This is the split of torch's
``_RendezvousJoinOp`` (decides) and ``_RendezvousOpExecutor`` (does the I/O), one level finer:
torch's op decides once per state read, ours at every store call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from rdzv.errors import CounterError, RendezvousConnectionError, RendezvousStateError, StoreError
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.store.base import Store

__all__ = [
    "NOW",
    "Add",
    "Call",
    "Check",
    "CompareSet",
    "DeleteKey",
    "Effect",
    "Get",
    "MultiGet",
    "MultiSet",
    "Now",
    "Op",
    "Program",
    "ProgramRun",
    "Set",
    "StoreOp",
    "Wait",
    "record_node_lost",
    "rendezvous_error",
    "run_blocking",
]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Add:
    """``store.add(key, amount)`` -> int."""

    key: str
    amount: int


@dataclass(frozen=True, slots=True)
class Get:
    """``store.get(key)`` -> bytes, waiting at most ``timeout`` seconds for the key to appear
    (None: the store's own timeout). Raises StoreTimeoutError into the program on expiry."""

    key: str
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Set:
    """``store.set(key, value)`` -> None."""

    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class MultiGet:
    """``store.multi_get(keys)`` -> list[bytes], waiting at most ``timeout`` seconds for
    missing keys (None: the store's own timeout; 0: do not wait, one request that either
    returns every value or raises StoreTimeoutError into the program)."""

    keys: list[str]
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class MultiSet:
    """``store.multi_set(keys, values)`` -> None."""

    keys: list[str]
    values: list[bytes]


@dataclass(frozen=True, slots=True)
class CompareSet:
    """``store.compare_set(key, expected, desired)`` -> bytes (torch's semantics)."""

    key: str
    expected: bytes
    desired: bytes


@dataclass(frozen=True, slots=True)
class Check:
    """``store.check(keys)`` -> bool."""

    keys: list[str]


@dataclass(frozen=True, slots=True)
class Wait:
    """``store.wait(keys, timeout)`` -> None; StoreTimeoutError into the program on expiry."""

    keys: list[str]
    timeout: float


@dataclass(frozen=True, slots=True)
class DeleteKey:
    """``store.delete_key(key)`` -> bool."""

    key: str


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(store)`` on a blocking store: the form of a liveness backend that has no
    program of its own (etcd leases). Only :func:`run_blocking` performs it."""

    fn: Callable[[Store], Any]


class Now:
    """The executor's monotonic clock, in seconds (``time.monotonic()`` for the blocking
    executor, the event loop's ``time()`` for the asyncio one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOW"


#: The one :class:`Now` operation.
NOW = Now()


class Effect:
    """Base of the operations that are neither store calls nor the clock: what the node does
    besides the store (beat a key, start a bootstrap server, record an event). Each executor
    hands them to its owner (see :mod:`rdzv.rendezvous.decision`)."""

    __slots__ = ()


StoreOp = Add | Get | Set | MultiGet | MultiSet | CompareSet | Check | Wait | DeleteKey
Op = StoreOp | Call | Now | Effect
#: A decision: yields operations, receives their results, returns a ``_T``.
Program = Generator[Op, Any, _T]


def _perform(store: Store, op: Op) -> Any:
    if isinstance(op, Add):
        return store.add(op.key, op.amount)
    if isinstance(op, Get):
        # One request that waits and returns (None: the store's timeout).
        return store.get(op.key, op.timeout)
    if isinstance(op, CompareSet):
        return store.compare_set(op.key, op.expected, op.desired)
    if isinstance(op, Check):
        return store.check(op.keys)
    if isinstance(op, MultiGet):
        return store.multi_get(op.keys, op.timeout)
    if isinstance(op, MultiSet):
        return store.multi_set(op.keys, op.values)
    if isinstance(op, Set):
        return store.set(op.key, op.value)
    if isinstance(op, Wait):
        # The core call with float seconds, as for Get (a Python-defined store's public
        # wait receives a timedelta through it, as torch passes one).
        if op.timeout is None or not op.keys:
            return store.wait(op.keys)
        return store._wait(list(op.keys), op.timeout)
    if isinstance(op, DeleteKey):
        return store.delete_key(op.key)
    if isinstance(op, Call):
        return op.fn(store)
    raise TypeError(f"not a store operation: {op!r}")


class ProgramRun(Generic[_T]):
    """Steps one program for an executor: answers :data:`NOW` (from ``clock``) and
    :class:`Effect` (from ``effect``; TypeError if there is none) itself and hands every
    store operation to the executor, which answers with :meth:`resolve` or :meth:`fail`.
    The blocking and asyncio executors differ only in how they perform an operation."""

    def __init__(
        self,
        program: Program[_T],
        clock: Callable[[], float],
        effect: Callable[[Effect], Any] | None,
    ) -> None:
        self._program = program
        self._clock = clock
        self._effect = effect
        self._result: Any = None
        self._error: Exception | None = None
        self.value: _T | None = None

    def next_op(self) -> Op | None:
        """The next operation to perform, or None once the program returned (its result
        in :attr:`value`). What the program does not catch propagates from here."""
        while True:
            error, self._error = self._error, None
            try:
                op = self._program.throw(error) if error is not None else self._program.send(
                    self._result
                )  # fmt: skip
            except StopIteration as stop:
                self.value = stop.value
                return None
            if isinstance(op, Now):
                self._result = self._clock()
            elif isinstance(op, Effect):
                try:
                    if self._effect is None:
                        raise TypeError(f"no executor for the effect {op!r}")
                    self._result = self._effect(op)
                except Exception as exc:  # handed to the program, which decides
                    self.fail(exc)
            else:
                return op

    def resolve(self, result: Any) -> None:
        """The last operation returned ``result``."""
        self._result = result

    def fail(self, exc: Exception) -> None:
        """The last operation raised ``exc``: it is thrown into the program."""
        self._result, self._error = None, exc


def run_blocking(
    store: Store, program: Program[_T], effect: Callable[[Effect], Any] | None = None
) -> _T:
    """Run ``program`` on ``store`` in the calling thread and return its result.

    Store calls are made on ``store``; :data:`NOW` is ``time.monotonic()``; an
    :class:`Effect` goes to ``effect`` (TypeError if there is none). An exception raised by an
    operation (e.g. StoreTimeoutError from a :class:`Wait`) is thrown into the program at the
    ``yield``; what the program does not catch propagates from here.
    """
    run = ProgramRun(program, time.monotonic, effect)
    while (op := run.next_op()) is not None:
        try:
            run.resolve(_perform(store, op))
        except Exception as exc:  # handed to the program, which decides
            run.fail(exc)
    return cast(_T, run.value)


def record_node_lost(owner: str, run_id: str, message: str, local_id: int) -> None:
    """Record the core's ``Record`` effect (a node declared dead) as a rendezvous event of
    ``owner`` (the executor's class name), state RUNNING."""
    record_rdzv_event_fields(
        f"{owner}._node_lost", run_id, message, NodeState.RUNNING, local_id=local_id
    )


def rendezvous_error(exc: BaseException, run_id: str, store: str) -> Exception | None:
    """The rendezvous error that a store failure ``exc`` becomes, None if it is not one: a
    counter holding a non-integer is RendezvousStateError (corrupt or hostile state), a store
    or OS error is RendezvousConnectionError (with ``store``, its repr, in the message)."""
    if isinstance(exc, CounterError):
        return RendezvousStateError(
            f"a counter of the rendezvous '{run_id}' holds a value that is not an integer: "
            f"{exc}; the rendezvous state is corrupt or hostile"
        )
    if isinstance(exc, (StoreError, OSError)):
        return RendezvousConnectionError(
            f"The connection to the store {store} of the rendezvous '{run_id}' has failed: "
            f"{type(exc).__name__}: {exc}"
        )
    return None
