"""The opcode -> handler tables of the TCPStore server: one function per opcode, written
against :class:`Server`, the part of the server a handler may use (the engine, the counters,
the wait limits, leases), and the :class:`~rdzv.server.connection.Connection` it
answers on (``conn.write`` for replies)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rdzv import auth, wire
from rdzv.engine import Engine, Waiter
from rdzv.errors import AuthError, StoreError
from rdzv.stats import ServerStats
from rdzv.wire import (
    CHECK_NOT_READY,
    CHECK_READY,
    STOP_WAITING,
    WAIT_CANCELED,
    Op,
    Request,
)

if TYPE_CHECKING:
    from rdzv.server.connection import Connection

logger = logging.getLogger("rdzv.server")

_I64 = wire.reply_i64
EXT_OK = wire.reply_ext_ok()
_EMPTY_BLOB = wire.reply_blob(b"")

# Replies of parked waiters (Waiter.owner = (connection, kind)): the engine's waiter kind
# says what was waited for, this one how the client asked (torch's WAIT/BARRIER or rdzv's).
KIND_WAIT, KIND_BARRIER, KIND_GET, KIND_MULTI_GET, KIND_QUEUE_POP, KIND_EXT_BARRIER = range(6)


def wait_reply(kind: int, result: object) -> bytes:
    """The reply to a wait of ``kind`` (``KIND_*``) satisfied with ``result``: what the
    engine returned at once or handed the woken waiter (:attr:`rdzv.engine.Waiter.result`)."""
    if kind in (KIND_WAIT, KIND_BARRIER):
        return STOP_WAITING
    if kind == KIND_EXT_BARRIER:
        return EXT_OK
    if kind == KIND_MULTI_GET:
        return EXT_OK + wire.reply_blobs(result)  # type: ignore[arg-type]
    return EXT_OK + wire.reply_blob(result)  # type: ignore[arg-type]


class Close(Exception):
    """Raised by a handler: close this connection, logging ``reason``."""


class Server(Protocol):
    """What a handler may use of the server (:class:`~rdzv.server.store_server.StoreServer`
    implements it)."""

    engine: Engine
    stats: ServerStats
    #: The shared secret connections authenticate with, or None (authentication off).
    token: bytes | None
    #: Why writes are refused (the journal cannot be written), or None.
    read_only: str | None

    def set_lease(self, key: bytes, value: bytes, ttl: float) -> None:
        """Set ``key`` deleted after ``ttl`` seconds unless set again."""

    def check_waits(self, conn: Connection, keys: int) -> None:
        """Raise :class:`Close` if parking a wait on ``keys`` keys would pass a limit."""

    def on_fire(self, waiter: Waiter) -> None:
        """The engine's wake-up callback of the waiters handlers park."""

    def release(self, conn: Connection) -> None:
        """Drop every parked wait of ``conn``."""


# --------------------------------------------------------------------------- handlers
# One function per opcode: (server, connection, request) -> None; replies go to conn.write.
# ``@handles(op)`` registers it; adding an opcode to the server is writing one of these.

Handler = Callable[[Server, "Connection", Any], None]
_F = TypeVar("_F", bound=Callable[..., None])
_REGISTERED: dict[Op, Handler] = {}
_WRITES: set[Op] = set()


def handles(op: Op, *, writes: bool = False) -> Callable[[_F], _F]:
    """Register the decorated function as the handler of ``op`` (once per opcode).

    ``writes``: the request changes the store. Such requests are refused while the journal
    cannot be written (:attr:`Server.read_only`) and make the connection wait for the next
    group commit before its following replies are sent.
    """

    def register(fn: _F) -> _F:
        if op in _REGISTERED:
            raise RuntimeError(f"two handlers for {op.name}: {_REGISTERED[op]} and {fn}")
        _REGISTERED[op] = fn
        if writes:
            _WRITES.add(op)
        return fn

    return register


@handles(Op.VALIDATE)
def _h_validate(server: Server, conn: Connection, req: wire.Validate) -> None:
    pass  # the parser checked the magic; no reply (torch sends none)


@handles(Op.SET, writes=True)
def _h_set(server: Server, conn: Connection, req: wire.Set) -> None:
    server.engine.set(req.key, req.value)


@handles(Op.COMPARE_SET, writes=True)
def _h_compare_set(server: Server, conn: Connection, req: wire.CompareSet) -> None:
    conn.write(wire.reply_blob(server.engine.compare_set(req.key, req.expected, req.desired)))


@handles(Op.GET)
def _h_get(server: Server, conn: Connection, req: wire.Get) -> None:
    value = server.engine.get(req.key)
    # Missing key: an empty blob, as torch's libuv server (its legacy server closes).
    conn.write(_EMPTY_BLOB if value is None else wire.reply_blob(value))


@handles(Op.ADD, writes=True)
def _h_add(server: Server, conn: Connection, req: wire.Add) -> None:
    conn.write(_I64(server.engine.add(req.key, req.amount)))


@handles(Op.CHECK)
def _h_check(server: Server, conn: Connection, req: wire.Check) -> None:
    conn.write(CHECK_READY if server.engine.check(req.keys) else CHECK_NOT_READY)


@handles(Op.WAIT)
def _h_wait(server: Server, conn: Connection, req: wire.Wait) -> None:
    keys = req.keys
    engine = server.engine
    if len(keys) == 1 and engine.get(keys[0]) is not None:  # fast path: torch's get()
        conn.write(STOP_WAITING)
        return
    server.check_waits(conn, len(keys))
    waiter = engine.wait(keys, server.on_fire, (conn, KIND_WAIT))
    if waiter is None:
        conn.write(STOP_WAITING)
    else:
        conn.add_waiter(waiter, len(keys))


@handles(Op.GETNUMKEYS)
def _h_num_keys(server: Server, conn: Connection, req: wire.GetNumKeys) -> None:
    conn.write(_I64(server.engine.num_keys()))


@handles(Op.DELETE_KEY, writes=True)
def _h_delete_key(server: Server, conn: Connection, req: wire.DeleteKey) -> None:
    conn.write(_I64(1 if server.engine.delete_key(req.key) else 0))


@handles(Op.APPEND, writes=True)
def _h_append(server: Server, conn: Connection, req: wire.Append) -> None:
    server.engine.append(req.key, req.value)


@handles(Op.MULTI_GET)
def _h_multi_get(server: Server, conn: Connection, req: wire.MultiGet) -> None:
    values = server.engine.multi_get(req.keys)
    conn.write(wire.reply_blobs([b"" if v is None else v for v in values]))


@handles(Op.MULTI_SET, writes=True)
def _h_multi_set(server: Server, conn: Connection, req: wire.MultiSet) -> None:
    server.engine.multi_set(req.keys, req.values)


@handles(Op.CANCEL_WAIT)
def _h_cancel_wait(server: Server, conn: Connection, req: wire.CancelWait) -> None:
    server.release(conn)
    conn.write(WAIT_CANCELED)


@handles(Op.PING)
def _h_ping(server: Server, conn: Connection, req: wire.Ping) -> None:
    read_only = server.read_only is not None
    conn.send_stateless(wire.reply_ping(req.nonce, conn.parser.extended, read_only=read_only))


@handles(Op.QUEUE_PUSH, writes=True)
def _h_queue_push(server: Server, conn: Connection, req: wire.QueuePush) -> None:
    server.engine.queue_push(req.key, req.value)


@handles(Op.QUEUE_POP, writes=True)
def _h_queue_pop(server: Server, conn: Connection, req: wire.QueuePop) -> None:
    engine = server.engine
    length = engine.queue_len(req.key)
    conn.write(wire.reply_queue_pop(engine.queue_pop(req.key), length))


@handles(Op.QUEUE_LEN)
def _h_queue_len(server: Server, conn: Connection, req: wire.QueueLen) -> None:
    conn.write(_I64(server.engine.queue_len(req.key)))


@handles(Op.LIST_KEYS)
def _h_list_keys(server: Server, conn: Connection, req: wire.ListKeys) -> None:
    conn.write(wire.reply_key_list(server.engine.list_keys()))


@handles(Op.BARRIER, writes=True)
def _h_barrier(server: Server, conn: Connection, req: wire.Barrier) -> None:
    server.check_waits(conn, 1)
    waiter = server.engine.barrier(req.key, req.world_size, server.on_fire, (conn, KIND_BARRIER))
    if waiter is None:
        conn.write(STOP_WAITING)
    else:
        conn.add_waiter(waiter, 1)


# ---- extensions: every reply starts with EXT_OK or EXT_ERROR.


def _ext_error(conn: Connection, exc: Exception) -> None:
    conn.write(wire.reply_ext_error(wire.error_code_for(exc), str(exc)))


@handles(Op.EXT_ADD, writes=True)
def _h_ext_add(server: Server, conn: Connection, req: wire.ExtAdd) -> None:
    try:
        total = server.engine.add(req.key, req.amount)
    except (StoreError, ValueError) as exc:
        _ext_error(conn, exc)
    else:
        conn.write(EXT_OK + _I64(total))


@handles(Op.EXT_BARRIER, writes=True)
def _h_ext_barrier(server: Server, conn: Connection, req: wire.ExtBarrier) -> None:
    server.check_waits(conn, 1)
    try:
        waiter = server.engine.barrier(
            req.key, req.world_size, server.on_fire, (conn, KIND_EXT_BARRIER)
        )
    except (StoreError, ValueError) as exc:
        _ext_error(conn, exc)
        return
    if waiter is None:
        conn.write(EXT_OK)
    else:
        conn.add_waiter(waiter, 1)


@handles(Op.EXT_GET_WAIT)
def _h_ext_get_wait(server: Server, conn: Connection, req: wire.ExtGetWait) -> None:
    got = server.engine.get_wait(req.key, server.on_fire, (conn, KIND_GET))
    _reply_or_park(server, conn, got, KIND_GET, 1)


@handles(Op.EXT_MULTI_GET_WAIT)
def _h_ext_multi_get_wait(server: Server, conn: Connection, req: wire.ExtMultiGetWait) -> None:
    got = server.engine.multi_get_wait(req.keys, server.on_fire, (conn, KIND_MULTI_GET))
    _reply_or_park(server, conn, got, KIND_MULTI_GET, len(req.keys))


@handles(Op.EXT_QUEUE_POP_WAIT, writes=True)
def _h_ext_queue_pop_wait(server: Server, conn: Connection, req: wire.ExtQueuePopWait) -> None:
    got = server.engine.queue_pop_wait(req.key, server.on_fire, (conn, KIND_QUEUE_POP))
    _reply_or_park(server, conn, got, KIND_QUEUE_POP, 1)


def _reply_or_park(server: Server, conn: Connection, got: object, kind: int, keys: int) -> None:
    """Reply with what a wait got at once, or record its parked waiter on ``conn`` (within
    the connection's wait limits: past one, the waiter is cancelled and Close raised)."""
    if not isinstance(got, Waiter):
        conn.write(wait_reply(kind, got))
        return
    try:
        server.check_waits(conn, keys)
    except Close:
        server.engine.cancel(got)
        raise
    conn.add_waiter(got, keys)


@handles(Op.EXT_LIST_KEYS)
def _h_ext_list_keys(server: Server, conn: Connection, req: wire.ExtListKeys) -> None:
    prefix = req.prefix
    entries = [(k, len(v)) for k, v in server.engine.items() if k.startswith(prefix)]
    conn.write(EXT_OK + wire.reply_key_sizes(entries))


@handles(Op.EXT_NUM_KEYS)
def _h_ext_num_keys(server: Server, conn: Connection, req: wire.ExtNumKeys) -> None:
    prefix = req.prefix
    if prefix:
        count = sum(1 for k in server.engine.list_keys() if k.startswith(prefix))
    else:
        count = server.engine.num_keys()
    conn.write(EXT_OK + _I64(count))


@handles(Op.EXT_SET_EPHEMERAL, writes=True)
def _h_ext_set_ephemeral(server: Server, conn: Connection, req: wire.ExtSetEphemeral) -> None:
    server.engine.set_ephemeral(req.key, req.value, conn)
    conn.write(EXT_OK)


@handles(Op.EXT_SET_LEASE, writes=True)
def _h_ext_set_lease(server: Server, conn: Connection, req: wire.ExtSetLease) -> None:
    if not 0 < req.ttl_ms <= wire.MAX_LEASE_MS:
        limit = wire.MAX_LEASE_MS
        _ext_error(conn, ValueError(f"set_lease: ttl must be 1..{limit} ms, got {req.ttl_ms}"))
        return
    server.set_lease(req.key, req.value, req.ttl_ms / 1000.0)
    conn.write(EXT_OK)


# ---- authentication (see rdzv.auth): served before and after the connection authenticated.


@handles(Op.EXT_AUTH_BEGIN)
def _h_auth_begin(server: Server, conn: Connection, req: wire.ExtAuthBegin) -> None:
    if server.token is None:
        _ext_error(conn, AuthError("this server has no token configured (authentication off)"))
        return
    conn.auth_nonce = auth.new_nonce()  # fresh per attempt: a recorded proof never verifies
    conn.send_stateless(EXT_OK + conn.auth_nonce)


@handles(Op.EXT_AUTH_PROOF)
def _h_auth_proof(server: Server, conn: Connection, req: wire.ExtAuthProof) -> None:
    token = server.token
    if token is None:
        _ext_error(conn, AuthError("this server has no token configured (authentication off)"))
        return
    nonce, conn.auth_nonce = conn.auth_nonce, None  # single use
    if nonce is None:
        server.stats.auth_failure("no_challenge")
        _ext_error(conn, AuthError("EXT_AUTH_PROOF sent before EXT_AUTH_BEGIN"))
        raise Close("authentication refused: proof sent without asking for a challenge")
    if not auth.verify(auth.client_proof(token, nonce, req.client_nonce), req.proof):
        server.stats.auth_failure("wrong_token")
        _ext_error(conn, AuthError("authentication failed: wrong token"))
        raise Close("authentication failed: wrong token (the client's proof did not verify)")
    conn.handlers = HANDLERS
    conn.send_stateless(EXT_OK + auth.server_proof(token, nonce, req.client_nonce))
    logger.info("connection from %s authenticated", conn.peer)


def _h_unauth_ping(server: Server, conn: Connection, req: wire.Ping) -> None:
    if req.nonce == wire.RDZV_PING_NONCE and conn.parser.extended:
        conn.send_stateless(wire.reply_ping(req.nonce, True, auth_required=True))
        return
    server.stats.auth_failure("unauthenticated")
    raise Close(
        "refused an unauthenticated client: this server requires a token and the client "
        "did not negotiate rdzv extensions (a torch client cannot authenticate); allow its "
        "network with --allow-unauthenticated / allow_unauthenticated="
    )


def _h_unauthenticated(server: Server, conn: Connection, req: Request) -> None:
    server.stats.auth_failure("unauthenticated")
    raise Close(
        f"refused {req.op.name} before authentication: this server requires a token "
        "(rdzv clients: pass token= / token_file= / $RDZV_TOKEN; torch clients: allow their "
        "network with --allow-unauthenticated)"
    )


def _h_refused_ping(server: Server, conn: Connection, req: wire.Ping) -> None:
    if req.nonce == wire.RDZV_PING_NONCE and conn.parser.extended:
        conn.send_stateless(wire.reply_refused(conn.refusal))
    raise Close(conn.refusal)


def _h_refused(server: Server, conn: Connection, req: Request) -> None:
    raise Close(conn.refusal)


#: Handlers of an authenticated (or unauthenticated-allowed) connection, by opcode byte
#: (opcodes the parser refuses never reach a handler).
HANDLERS: list[Handler] = [_h_validate] * 256
for _op, _fn in _REGISTERED.items():
    HANDLERS[_op] = _fn
#: Requests that change the store: refused while the journal cannot be written.
WRITE_OPS = frozenset(_WRITES)
IS_WRITE = [op in WRITE_OPS for op in range(256)]
#: ... of which these have an extension reply, which can carry the error.
EXT_WRITE_OPS = frozenset(op for op in WRITE_OPS if wire.is_extension(op))

REFUSED_HANDLERS: list[Handler] = [_h_refused] * 256
REFUSED_HANDLERS[Op.VALIDATE] = _h_validate
REFUSED_HANDLERS[Op.PING] = _h_refused_ping

UNAUTH_HANDLERS: list[Handler] = [_h_unauthenticated] * 256
UNAUTH_HANDLERS[Op.VALIDATE] = _h_validate
UNAUTH_HANDLERS[Op.PING] = _h_unauth_ping
UNAUTH_HANDLERS[Op.EXT_AUTH_BEGIN] = _h_auth_begin
UNAUTH_HANDLERS[Op.EXT_AUTH_PROOF] = _h_auth_proof
