"""The TCPStore client, sans I/O: its operations and its connection rules, written once.

:class:`~rdzv.store.tcp.TCPStore` (blocking sockets) and
:class:`~rdzv.store.async_tcp.AsyncTCPStore` (asyncio) differ only in how they perform I/O;
every rule lives here: key prefixing, the request sequences (``get`` = WAIT + GET like torch,
or one extension request on an rdzv server), the CANCEL_WAIT dance on timeouts, the use of
negotiated extensions, error mapping, and the connection's life (:class:`ClientCore`):
connecting with back-off, the handshake, which failures are a lost connection
(:func:`connection_lost`), reconnecting, what is replayed (:class:`Unacked`), when a retry
is unsafe (:func:`outcome_unknown`, :func:`lost_again`). Argument validation is one
function, :func:`rdzv.store.tcp.check_arguments`, shared by both clients.

Why generators and not a synchronous client generated from the asynchronous one (as
httpcore does with unasync): the operations already were sans-I/O generators, so the
connection rules became generators of the same kind, and each client only executes five
actions (about 40 lines each: ``TCPStore._drive``, ``AsyncTCPStore._drive``). The rules
then run as the same code in both clients (no generated copy to keep in sync, no build
step or CI check). The cost is a generator frame more per action (see
``docs/performance.md``).

An operation is a generator that yields actions and receives their results:

* ``bytes``: send these bytes (result: None);
* :class:`Read`: decode one reply with ``decoder`` before ``deadline`` (result: the value);
  at the deadline :class:`ReadTimeout` is thrown into the generator;
* :class:`Sleep`: pause (result: None).

The generator's return value is the operation's result; its exceptions are the operation's.
:meth:`ClientCore.perform` runs an operation: it decodes :class:`Read` actions from the
reply buffer itself and passes the driver only I/O actions: ``bytes``, :class:`Sleep`,
:class:`Recv` (receive some bytes before a deadline), :class:`Connect` and :class:`Close`.
A driver throws the errors of an action (OSError, ssl.SSLError, TimeoutError) back into
the core's generator, which decides: retry, reconnect, or raise; :func:`resume` is a
driver's step, and :class:`Done` carries the core's result.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar, cast

from rdzv import auth, wire
from rdzv.errors import (
    AuthError,
    ConnectionLimitError,
    NetworkError,
    ProtocolError,
    RdzvError,
    StoreError,
    StoreTimeoutError,
)
from rdzv.store.base import Deadline, timeout_error
from rdzv.wire import (
    EXT_ERROR,
    EXT_OK,
    HELLO_AUTH_REQUIRED,
    HELLO_READ_ONLY,
    INIT_KEY,
    KEY_PREFIX,
    RDZV_HELLO,
    RDZV_PING_NONCE,
    STOP_WAITING,
    WAIT_CANCELED,
    Decoder,
    Op,
)

__all__ = [
    "MIN_IO_TIMEOUT",
    "Read",
    "ReadTimeout",
    "Session",
    "Sleep",
    "backoff_delays",
    "wire_key",
]

_T = TypeVar("_T")
OpGen = Generator[Any, Any, _T]
_log = logging.getLogger("rdzv.store.tcp")

#: Floor of the deadline for replies the server sends at once (everything but WAIT-like
#: requests), in seconds. torch's client has no such deadline at all (a silent server hangs
#: it forever); ours is the store timeout, but never below this floor, so that
#: ``timeout=0`` ("do not block" on keys) still leaves the network time to answer.
MIN_IO_TIMEOUT = 10.0

# Connect back-off: torch starts at 500 ms, grows x1.5 with +-50 % jitter, caps at 60 s
# (TCPStore.cpp / socket.cpp since pytorch#129261). Local stores come up in milliseconds,
# so start lower and cap at a few seconds to notice a late server quickly.
BACKOFF_INITIAL = 0.05
BACKOFF_FACTOR = 1.5
BACKOFF_CAP = 2.0
#: Poll interval of the master's wait for workers (torch: 10 ms).
WORKER_POLL_INTERVAL = 0.01

_CANCEL = wire.encode_op(Op.CANCEL_WAIT)


class Read:
    """Action: decode one reply with ``decoder`` before the monotonic time ``deadline``."""

    __slots__ = ("deadline", "decoder", "what")

    def __init__(self, decoder: Decoder[Any], deadline: float, what: str) -> None:
        self.decoder = decoder
        self.deadline = deadline
        self.what = what


class Sleep:
    """Action: pause for ``seconds``."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class ReadTimeout(Exception):
    """Thrown into an operation when a :class:`Read` reaches its deadline."""

    def __init__(self, read: Read) -> None:
        super().__init__(read.what)
        self.read = read


class Session:
    """Per-connection protocol state shared by the operations.

    ``where`` names the store in messages; ``extended`` is True once the server negotiated
    rdzv's extensions; ``io_timeout`` bounds replies that come at once; ``token`` is the
    shared secret to authenticate with (None: none); ``authenticating`` is True while the
    handshake's authentication exchange runs (a connection lost then is an auth failure).
    """

    __slots__ = (
        "authenticating",
        "extended",
        "io_timeout",
        "read_only",
        "tls",
        "token",
        "version",
        "where",
    )

    def __init__(
        self, where: str, io_timeout: float, token: bytes | None = None, tls: bool = False
    ) -> None:
        self.where = where
        self.io_timeout = io_timeout
        self.token = token
        self.tls = tls
        self.extended = False
        self.authenticating = False
        self.version = 0
        self.read_only = False  # the server said it refuses writes (HELLO_READ_ONLY)

    def io(self, what: str, decoder: Decoder[Any]) -> Read:
        return Read(decoder, time.monotonic() + self.io_timeout, what)


#: Receive sizes of one ``recv`` (bytes): at least the first, at most the second, whatever
#: length a reply announces (a lying length costs no memory before its bytes arrive).
RECV_MIN = 256 * 1024
RECV_MAX = 16 * 1024 * 1024


def recv_size(missing: int) -> int:
    """How much to ask ``recv`` for when ``missing`` more bytes complete a reply."""
    return min(max(RECV_MIN, missing), RECV_MAX)


def io_timeout_for(store_timeout: float) -> float:
    """The reply deadline used with a given store timeout (see :data:`MIN_IO_TIMEOUT`)."""
    return max(store_timeout, MIN_IO_TIMEOUT)


#: The jitter's own generator: the process-wide ``random`` state, which training code seeds
#: for reproducibility, is never consumed by the store (nor by its background reconnects).
_JITTER = random.Random()


def backoff_delays() -> Iterator[float]:
    """Connect retry delays: exponential with +-50 % jitter, capped (seconds)."""
    delay = BACKOFF_INITIAL
    while True:
        yield delay * _JITTER.uniform(0.5, 1.5)
        delay = min(delay * BACKOFF_FACTOR, BACKOFF_CAP)


def wire_key(key: str) -> bytes:
    """The key a torch client puts on the wire for user key ``key``: ``"/" + key``, UTF-8
    (surrogate escapes, as :func:`user_key` makes them, become the raw bytes they stand for)."""
    return KEY_PREFIX + key.encode("utf-8", "surrogateescape")


def user_key(raw: bytes) -> str | None:
    """The user key behind a wire key, or None for internal keys (no ``/`` prefix). Bytes
    that are not UTF-8 (another client's keys) become surrogate escapes (``"\\udcff"`` for
    ``0xff``, as ``os.fsdecode``), so the key round-trips: :func:`wire_key` of it is ``raw``
    and ``check``, ``get`` and ``delete_key`` find what ``list_keys`` listed."""
    if not raw.startswith(KEY_PREFIX):
        return None
    return raw[1:].decode("utf-8", "surrogateescape")


def describe_error(exc: BaseException) -> str:
    """An exception as text for messages (rdzv's own errors without their class name)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (NetworkError, ProtocolError)):
        return text
    return f"{type(exc).__name__}: {text}"


def failure_reason(s: Session, exc: BaseException) -> str | None:
    """Why ``exc``, raised by an operation, leaves the connection unusable; None when it is
    the operation's own outcome (a timeout on keys, a CounterError...) and the connection is
    intact. Drivers close the connection when this returns a reason."""
    if isinstance(exc, ReadTimeout):
        return (
            f"no reply within {s.io_timeout:g} s while awaiting {exc.read.what}; "
            "the server is alive but silent"
        )
    if isinstance(exc, ProtocolError):
        return str(exc)
    if isinstance(exc, StoreError):
        return None
    if isinstance(exc, OSError):  # NetworkError included
        return describe_error(exc)
    return None


def server_closed(read: Read) -> ConnectionResetError:
    """The error a driver raises when the server closed the connection during ``read``."""
    return ConnectionResetError(
        f"the server closed the connection while we awaited {read.what} "
        "(did it stop? torch servers also close the connection on add() to a "
        "non-integer value and on requests above their size limits)"
    )


def connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` means the connection was reset or closed by the peer (a server
    restart): a reconnecting client may reconnect. A silent server (:class:`ReadTimeout`) or
    a protocol violation are not: they leave the store unusable."""
    return isinstance(exc, ConnectionError) and not isinstance(exc, NetworkError)


def outcome_unknown(s: Session, what: str, reason: str) -> NetworkError:
    """The error of a non-idempotent operation whose connection was lost mid-flight."""
    return NetworkError(
        f"{s.where}: the connection was lost during {what} ({reason}); it may or may not "
        "have been applied, and is not retried because retrying it is not safe (not "
        "idempotent). The store reconnects on its next call; check the state before retrying."
    )


class Unacked:
    """Requests without a reply (SET, MULTI_SET, APPEND, QUEUE_PUSH) sent since the last
    reply on this connection: a durable server may have lost them in a crash, so a
    reconnecting client sends the idempotent ones again (at least once) and reports the
    others (outcome unknown). Bounded: when :meth:`full`, the driver round-trips a PING,
    whose reply acknowledges everything sent before it."""

    MAX_REQUESTS = 1024
    MAX_BYTES = 1 << 20

    __slots__ = ("requests", "size", "unsafe")

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.unsafe: list[str] = []
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.requests)

    def add(self, request: bytes, unsafe: str | None) -> None:
        if unsafe is not None:
            self.unsafe.append(unsafe)
        else:
            self.requests.append(request)
            self.size += len(request)

    def full(self) -> bool:
        n = len(self.requests) + len(self.unsafe)
        return n >= self.MAX_REQUESTS or self.size >= self.MAX_BYTES

    def clear(self) -> None:
        if self.requests or self.unsafe:
            self.requests.clear()
            self.unsafe.clear()
            self.size = 0

    def replay(self) -> bytes:
        """The idempotent requests to send again on a new connection (kept until a reply)."""
        return b"".join(self.requests)

    def settle(
        self, s: Session, dropped: str | None, sent: bytes | None, unsafe: str | None, keep: bool
    ) -> None:
        """Bookkeeping once an operation was performed: raise the outcome-unknown error of
        ``dropped`` requests (see :meth:`drop_unsafe`); a reply (``sent`` is None)
        acknowledges everything sent before; a request without a reply joins the window
        (when ``keep``: the client reconnects)."""
        if dropped is not None:
            raise outcome_unknown(s, dropped, "no reply had confirmed them")
        if sent is None:
            self.clear()
        elif keep:
            self.add(sent, unsafe)

    def drop_unsafe(self) -> str | None:
        """Forget the non-idempotent requests; describe them for an error (None: none)."""
        if not self.unsafe:
            return None
        names = sorted(set(self.unsafe))
        count = len(self.unsafe)
        self.unsafe.clear()
        return f"{count} earlier {'/'.join(names)} request(s)"


def ping(s: Session) -> OpGen[None]:
    """A PING round trip: its reply proves every request sent before it was processed."""
    yield from call(s, wire.encode_ping(0x5A), wire.read_u32, "the reply to PING")


def before_retry(
    s: Session, unacked: Unacked, reconnected: bool, reason: str, exc: BaseException
) -> None:
    """Called when the connection was lost during an operation that may be performed again:
    raise :func:`lost_again` if this operation already reconnected once, else log."""
    if reconnected:
        raise lost_again(s, unacked, reason) from exc
    _log.warning("%s: %s; reconnecting to retry", s.where, reason)


def lost_again(s: Session, unacked: Unacked, reason: str) -> NetworkError:
    """The error when a connection is lost again right after reconnecting for the same
    operation: not a restart but a server that closes the connection on this request (or on
    a replayed one: a limit, a protocol violation). The replay window is dropped (its
    outcome is unknown) so that the next call does not send it again."""
    unacked.clear()
    if s.read_only:
        return NetworkError(
            f"{s.where}: the store is read-only: its server cannot write its journal (a full "
            "disk?; its log says why) and refuses writes, closing the connection on those "
            "of torch's protocol (set, append, multi_set, compare_set, delete_key, "
            f"queue_push ...), which have no error reply ({reason}); the writes sent since "
            "the last reply were dropped, their outcome is unknown; writes are accepted "
            "again once the server can write its journal"
        )
    return NetworkError(
        f"{s.where}: the connection was lost again after reconnecting ({reason}); the server "
        "closes the connection on this request or on the writes sent before it (a request "
        "above its limits, or a write to a store that is read-only because its disk is "
        "full? the server's log says why); those writes were dropped, their outcome is "
        "unknown"
    )


def connect_error(
    endpoint: str, timeout: float, attempts: int, last: BaseException
) -> NetworkError:
    """The error of a connect loop that ran out of time."""
    return NetworkError(
        f"could not connect to the TCPStore server at {endpoint} within "
        f"{'unlimited time' if math.isinf(timeout) else f'{timeout:g} s'} ({attempts} attempts); "
        f"last error: {describe_error(last)}. Is the server running and reachable, and are "
        "the host and port right?"
        + (
            " A TLS server also closes plain connections: connect with tls=."
            if isinstance(last, ConnectionResetError)
            else ""
        )
    )


# --------------------------------------------------------------------------- building blocks


def handshake(s: Session) -> OpGen[None]:
    """VALIDATE + PING (one write); the PING reply tells a torch server (echo) from an rdzv
    server (:data:`~rdzv.wire.RDZV_HELLO` family: extensions on). With a token, EXT_AUTH_BEGIN
    rides in the same write and :func:`authenticate` follows.

    Raises AuthError: the server requires a token and we have none; with a token, the
    server cannot authenticate (torch or an rdzv server without a token: we refuse to talk
    to a server that does not prove it knows the token), or it refused ours.
    """
    hello = wire.encode_validate() + wire.encode_ping(RDZV_PING_NONCE)
    if s.token is not None:
        hello += wire.encode_op(Op.EXT_AUTH_BEGIN)
    # A TLS server that refuses our client certificate closes the connection right after
    # the TLS handshake: from here, a lost connection is a refusal, not a reason to retry.
    s.authenticating = s.token is not None or s.tls
    yield hello
    reply = yield s.io("the reply to PING", wire.read_u32)
    s.authenticating = s.token is not None
    auth_required = False
    if reply == wire.RDZV_REFUSED:
        message = yield s.io("the reason the server refused the connection", wire.read_blob)
        raise ConnectionLimitError(
            f"{s.where} refused the connection: {message.decode('utf-8', 'replace')}"
        )
    if reply == RDZV_PING_NONCE:
        s.extended, s.version, s.read_only = False, 0, False
    elif reply >> 8 == RDZV_HELLO >> 8:
        s.extended, s.version = True, reply & 0x3F
        auth_required = bool(reply & HELLO_AUTH_REQUIRED)
        s.read_only = bool(reply & HELLO_READ_ONLY)
    else:
        raise NetworkError(
            f"ping failed on {s.where}: sent {RDZV_PING_NONCE:#010x}, got {reply:#010x}; "
            "is this a TCPStore server (torch >= 2.5 or rdzv)?"
        )
    if s.token is None:
        if auth_required:
            raise AuthError(
                f"{s.where} requires authentication: pass token= or token_file= (or set "
                f"${auth.TOKEN_ENV}) with the server's shared secret"
            )
        return
    if not s.extended:
        raise AuthError(
            f"{s.where} does not support authentication (a torch server, or an rdzv server "
            "without extensions), but this client has a token; refusing to use a server that "
            "cannot prove it knows the token (drop the token to connect without auth)"
        )
    yield from authenticate(s, s.token)
    s.authenticating = False


def authenticate(s: Session, token: bytes) -> OpGen[None]:
    """The client side of the mutual HMAC exchange (EXT_AUTH_BEGIN already sent): read the
    server's nonce, send our nonce and proof, verify the server's proof."""
    server_nonce = yield from _auth_reply(
        s,
        "the reply to EXT_AUTH_BEGIN",
        wire.AUTH_NONCE_BYTES,
        f"{s.where} does not require authentication ({{}}), but this client has a token; "
        "refusing to use a server that cannot prove it knows the token (start the server "
        "with the same token, or drop the token on this client)",
    )
    client_nonce = auth.new_nonce()
    yield wire.encode_auth_proof(client_nonce, auth.client_proof(token, server_nonce, client_nonce))
    proof = yield from _auth_reply(
        s,
        "the reply to EXT_AUTH_PROOF",
        wire.AUTH_PROOF_BYTES,
        f"{s.where} refused our token ({{}}); check that client and server use the same secret",
    )
    if not auth.verify(auth.server_proof(token, server_nonce, client_nonce), proof):
        raise AuthError(
            f"{s.where} answered with a wrong server proof: it does not know the token "
            "(an impostor, or a different secret); not using it"
        )


def _auth_reply(s: Session, what: str, size: int, refused: str) -> OpGen[bytes]:
    """One reply of the exchange: ``size`` bytes, or the server's AuthError, re-raised with
    ``refused`` (a format string taking the server's message) as its message."""
    status = yield s.io(what, wire.read_u8)
    try:
        value: bytes = yield from _ext_finish(s, status, wire.read_fixed(size), what)
    except AuthError as exc:
        raise AuthError(refused.format(exc)) from None
    return value


def handshake_error(s: Session, exc: BaseException) -> AuthError | ConnectionLimitError | None:
    """The error to raise (not to retry) when connecting failed: the server refused the
    connection over its connection limit (ConnectionLimitError), or, an AuthError, for a
    security reason: a
    TLS failure (certificate not trusted, expired, for another host; our certificate
    refused), or a connection lost during authentication (an older server closes the
    connection on the auth opcodes; ours closes it after a refusal). None: retry."""
    if isinstance(exc, ConnectionLimitError):
        return exc
    if isinstance(exc, ssl.SSLError):
        s.authenticating = False
        return AuthError(
            f"TLS with {s.where} failed: {exc}; check the CA (tls ca=), the server's "
            "certificate (validity, host name vs server_hostname) and, if the server requires "
            "one, the client certificate (tls cert=/key=)"
        )
    if not s.authenticating or isinstance(exc, AuthError):
        return None
    s.authenticating = False
    if s.tls and not s.extended:
        hint = (
            "the TLS server refused our client certificate (it requires one signed by its CA: "
            "tls cert=/key=)"
        )
        if s.token is not None:
            hint += ", or it does not support token authentication"
    else:
        hint = (
            "the server does not support authentication (torch or an older rdzv server) or "
            "refused us"
        )
    return AuthError(
        f"the connection to {s.where} failed during the handshake ({describe_error(exc)}); {hint}"
    )


def call(s: Session, request: bytes, decoder: Decoder[_T], what: str) -> OpGen[_T]:
    """One request, one immediate reply."""
    yield request
    value: _T = yield s.io(what, decoder)
    return value


def _ext_finish(s: Session, status: int, decoder: Decoder[Any] | None, what: str) -> OpGen[Any]:
    if status == EXT_OK:
        if decoder is None:
            return None
        return (yield s.io(what, decoder))
    if status == EXT_ERROR:
        error = yield s.io(what, wire.read_ext_error)
        raise error
    raise ProtocolError(f"unexpected reply byte {status:#04x} from {s.where} to {what}")


def _torch_finish(s: Session, status: int, decoder: Decoder[Any] | None, what: str) -> OpGen[Any]:
    if status != STOP_WAITING[0]:
        raise ProtocolError(f"unexpected reply byte {status:#04x} from {s.where} to {what}")
    return None
    yield  # a generator


def ext_call(s: Session, request: bytes, decoder: Decoder[Any] | None, what: str) -> OpGen[Any]:
    """One extension request, one immediate reply in the EXT_OK / EXT_ERROR envelope."""
    yield request
    status = yield s.io(what, wire.read_u8)
    return (yield from _ext_finish(s, status, decoder, what))


def deferred(
    s: Session,
    request: bytes,
    timeout: float,
    what: str,
    *,
    ext: bool,
    decoder: Decoder[Any] | None = None,
) -> OpGen[tuple[bool, Any]]:
    """A request whose reply comes when keys appear (WAIT, BARRIER, the EXT_*_WAIT ops).

    Returns ``(True, payload)`` once the reply came, ``(False, None)`` if ``timeout`` seconds
    passed first. On expiry it sends CANCEL_WAIT and drains the race: the reply may still
    arrive before the WAIT_CANCELED byte (torch sees ``00 01`` there); then it counts, since
    the keys did arrive. ``timeout == 0`` sends the request and CANCEL_WAIT in one write: the
    answer is exact and nothing blocks (torch's zero-timeout poll is racy).
    """
    finish = _ext_finish if ext else _torch_finish
    if timeout <= 0:
        yield request + _CANCEL
        status = yield s.io(what, wire.read_u8)
        cancelled = False
    else:
        yield request
        deadline = math.inf if math.isinf(timeout) else time.monotonic() + timeout
        try:
            status = yield Read(wire.read_u8, deadline, what)
        except ReadTimeout:
            status = None
        if status is not None:
            return True, (yield from finish(s, status, decoder, what))
        yield _CANCEL
        status = yield s.io("the reply to CANCEL_WAIT", wire.read_u8)
        cancelled = True
    if status == WAIT_CANCELED[0]:
        return False, None
    try:
        value = yield from finish(s, status, decoder, what)
    finally:
        ack = yield s.io("the reply to CANCEL_WAIT", wire.read_u8)
        if ack != WAIT_CANCELED[0]:
            raise ProtocolError(
                f"expected WAIT_CANCELED (0x01) from {s.where} after "
                f"{'a timeout' if cancelled else 'a zero-timeout request'}, got {ack:#04x}"
            )
    return True, value


# --------------------------------------------------------------------------- operations
# Keys arrive as user keys (str); wire_key() adds torch's "/" prefix.


def get(s: Session, key: str, timeout: float) -> OpGen[bytes]:
    """Same semantics as ``Store.get``. torch server: WAIT + GET (as torch's client; a
    non-empty queue of that name counts as present there and yields ``b""``). rdzv server:
    one EXT_GET_WAIT that waits for a value and returns it."""
    k = wire_key(key)
    if s.extended:
        done, value = yield from deferred(
            s, wire.encode_key(Op.EXT_GET_WAIT, k), timeout, f"the value of {key!r}",
            ext=True, decoder=wire.read_blob,
        )  # fmt: skip
    else:
        done, _ = yield from deferred(
            s, wire.encode_keys(Op.WAIT, [k]), timeout, f"key {key!r}", ext=False
        )
        if done:
            value = yield from call(s, wire.encode_key(Op.GET, k), wire.read_blob, "GET")
    if not done:
        raise timeout_error("get", [key], timeout, s.where)
    result: bytes = value
    return result


def multi_get(s: Session, keys: Sequence[str], timeout: float) -> OpGen[list[bytes]]:
    """Same semantics as ``Store.multi_get``: one wait for all keys, one read of all values."""
    wkeys = [wire_key(k) for k in keys]
    decoder = wire.read_blobs(len(wkeys))
    if s.extended:
        done, values = yield from deferred(
            s, wire.encode_keys(Op.EXT_MULTI_GET_WAIT, wkeys), timeout, "the values of keys",
            ext=True, decoder=decoder,
        )  # fmt: skip
    else:
        done, _ = yield from deferred(
            s, wire.encode_keys(Op.WAIT, wkeys), timeout, "keys", ext=False
        )
        if done:
            values = yield from call(s, wire.encode_keys(Op.MULTI_GET, wkeys), decoder, "MULTI_GET")
    if not done:
        raise timeout_error("multi_get", keys, timeout, s.where)
    result: list[bytes] = values
    return result


def wait(s: Session, keys: Sequence[str], timeout: float) -> OpGen[None]:
    """Same semantics as ``Store.wait`` (WAIT, CANCEL_WAIT on timeout)."""
    request = wire.encode_keys(Op.WAIT, [wire_key(k) for k in keys])
    done, _ = yield from deferred(s, request, timeout, "keys", ext=False)
    if not done:
        raise timeout_error("wait", keys, timeout, s.where)


def add(s: Session, key: bytes, amount: int) -> OpGen[int]:
    """ADD on wire key ``key``. rdzv server: EXT_ADD, so a non-integer value raises
    CounterError and the connection stays usable; torch server: ADD (it closes the
    connection instead)."""
    if s.extended:
        value: int = yield from ext_call(
            s, wire.encode_key_int(Op.EXT_ADD, key, amount), wire.read_i64, "the reply to ADD"
        )
        return value
    return (yield from call(s, wire.encode_key_int(Op.ADD, key, amount), wire.read_i64, "ADD"))


def compare_set(s: Session, key: str, expected: bytes, desired: bytes) -> OpGen[bytes]:
    request = wire.encode_compare_set(wire_key(key), expected, desired)
    return (yield from call(s, request, wire.read_blob, "the reply to COMPARE_SET"))


def check(s: Session, keys: Sequence[str]) -> OpGen[bool]:
    request = wire.encode_keys(Op.CHECK, [wire_key(k) for k in keys])
    status = yield from call(s, request, wire.read_u8, "the reply to CHECK")
    return bool(status == wire.CHECK_READY[0])


def delete_key(s: Session, key: str) -> OpGen[bool]:
    request = wire.encode_key(Op.DELETE_KEY, wire_key(key))
    return (yield from call(s, request, wire.read_i64, "the reply to DELETE_KEY")) == 1


def num_keys(s: Session) -> OpGen[int]:
    """Every key the server holds, the ``init/`` worker counter included (torch's count:
    GETNUMKEYS on any server)."""
    total = yield from call(
        s, wire.encode_op(Op.GETNUMKEYS), wire.read_i64, "the reply to GETNUMKEYS"
    )
    return int(total)


def list_keys(s: Session) -> OpGen[list[str]]:
    """User keys (``/`` prefix stripped; internal keys such as ``init/`` hidden, as torch)."""
    raw = yield from call(s, wire.encode_op(Op.LIST_KEYS), wire.read_key_list, "LIST_KEYS")
    return [k for k in map(user_key, raw) if k is not None]


def list_key_sizes(s: Session, prefix: str = "") -> OpGen[list[tuple[str, int]]]:
    """``(key, value size in bytes)`` of every user key starting with ``prefix``.
    rdzv server: one EXT_LIST_KEYS; torch server: LIST_KEYS then MULTI_GET."""
    wprefix = wire_key(prefix)
    if s.extended:
        request = wire.encode_key(Op.EXT_LIST_KEYS, wprefix)
        entries = yield from ext_call(s, request, wire.read_key_sizes, "the reply to LIST_KEYS")
        return [(k, n) for raw, n in entries if (k := user_key(raw)) is not None]
    raw = yield from call(s, wire.encode_op(Op.LIST_KEYS), wire.read_key_list, "LIST_KEYS")
    raw = [k for k in raw if k.startswith(wprefix)]
    if not raw:
        return []
    values = yield from call(
        s, wire.encode_keys(Op.MULTI_GET, raw), wire.read_blobs(len(raw)), "MULTI_GET"
    )
    return [(k, len(v)) for r, v in zip(raw, values, strict=True) if (k := user_key(r))]


def queue_pop(s: Session, key: str, timeout: float | None) -> OpGen[bytes]:
    """Same semantics as ``Store.queue_pop``; ``timeout=None`` is ``block=False``.

    rdzv server: EXT_QUEUE_POP_WAIT pops atomically when an item arrives. torch server:
    WAIT + QUEUE_POP like torch's client; when the WAIT was satisfied by a value of the same
    name (torch's WAIT does not tell queues from values) it retries until the deadline.
    """
    k = wire_key(key)
    pop = wire.encode_key(Op.QUEUE_POP, k)
    if timeout is None:
        value = yield from call(s, pop, wire.read_queue_pop, "the reply to QUEUE_POP")
        if value is None:
            raise wire.queue_empty_error(key, s.where)
        result: bytes = value
        return result
    if s.extended:
        done, value = yield from deferred(
            s, wire.encode_key(Op.EXT_QUEUE_POP_WAIT, k), timeout, f"an item of queue {key!r}",
            ext=True, decoder=wire.read_blob,
        )  # fmt: skip
        if not done:
            raise timeout_error("queue_pop", [key], timeout, s.where)
        return value  # type: ignore[no-any-return]
    deadline = time.monotonic() + timeout
    delays = backoff_delays()
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        done, _ = yield from deferred(
            s, wire.encode_keys(Op.WAIT, [k]), remaining, f"queue {key!r}", ext=False
        )
        if done:
            value = yield from call(s, pop, wire.read_queue_pop, "the reply to QUEUE_POP")
            if value is not None:
                return value
        remaining = deadline - time.monotonic()
        if not done or remaining <= 0:
            raise timeout_error("queue_pop", [key], timeout, s.where)
        yield Sleep(min(next(delays), remaining))


def queue_len(s: Session, key: str) -> OpGen[int]:
    request = wire.encode_key(Op.QUEUE_LEN, wire_key(key))
    return (yield from call(s, request, wire.read_i64, "the reply to QUEUE_LEN"))


def barrier(s: Session, key: str, world_size: int, timeout: float) -> OpGen[None]:
    """Server-side barrier (torch's BARRIER; EXT_BARRIER on an rdzv server, which reports a
    non-integer counter as CounterError instead of closing the connection)."""
    op = Op.EXT_BARRIER if s.extended else Op.BARRIER
    request = wire.encode_key_int(op, wire_key(key), world_size)
    done, _ = yield from deferred(s, request, timeout, f"barrier {key!r}", ext=s.extended)
    if not done:
        raise timeout_error("barrier", [key], timeout, s.where)


def _need_extensions(s: Session, what: str) -> None:
    if not s.extended:
        raise StoreError(
            f"{what} needs rdzv's protocol extensions, but {s.where} is a torch TCPStore "
            "server (or an rdzv server with extensions disabled)"
        )


def set_ephemeral(s: Session, key: str, value: bytes) -> OpGen[None]:
    """Set ``key``; the server deletes it when this connection closes (rdzv servers only)."""
    _need_extensions(s, "set_ephemeral")
    request = wire.encode_set(wire_key(key), value, Op.EXT_SET_EPHEMERAL)
    yield from ext_call(s, request, None, "the reply to SET_EPHEMERAL")


def lease_ms(ttl: float) -> int:
    """``ttl`` seconds (checked by :func:`~rdzv.store.base.check_ttl`: at most one year,
    :data:`rdzv.wire.MAX_LEASE_MS`) as the whole milliseconds SET_LEASE carries, rounded
    up (at least 1)."""
    return max(1, math.ceil(ttl * 1000))


def set_lease(s: Session, key: str, value: bytes, ttl_ms: int) -> OpGen[None]:
    """Set ``key``; the server deletes it ``ttl_ms`` milliseconds later unless set again
    (rdzv servers only)."""
    _need_extensions(s, "set_lease")
    request = wire.encode_set_lease(wire_key(key), value, ttl_ms)
    yield from ext_call(s, request, None, "the reply to SET_LEASE")


def register_worker(s: Session) -> OpGen[int]:
    """``world_size`` bookkeeping: ADD ``init/`` +1 (the unprefixed key torch uses)."""
    return (yield from add(s, INIT_KEY, 1))


def wait_for_workers(s: Session, world_size: int, timeout: float) -> OpGen[None]:
    """The master's wait until ``init/`` reaches ``world_size`` (torch polls every 10 ms too:
    torch clients only ADD, nothing to be woken by)."""
    start = time.monotonic()
    request = wire.encode_key(Op.GET, INIT_KEY)
    while True:
        yield request
        raw = yield s.io(f"the value of {INIT_KEY!r}", wire.read_blob)
        joined = int(raw) if raw.strip().lstrip(b"-").isdigit() else 0
        if joined >= world_size:
            return
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise StoreTimeoutError(
                f"Timed out after {int(elapsed)} seconds waiting for clients. "
                f"{joined}/{world_size} clients joined. ({s.where}; every rank must create "
                "its TCPStore with the same world_size before the timeout)"
            )
        yield Sleep(min(WORKER_POLL_INTERVAL, max(0.0, timeout - elapsed)))


# --------------------------------------------------------------------------- the client core
# The connection's life, written once for both drivers: connect with back-off, handshake,
# perform an operation, and after a lost connection reconnect, replay and perform it again.


class Recv:
    """Action: receive up to ``size`` bytes before the monotonic time ``deadline``. Result:
    the bytes, ``b""`` when the peer closed the connection, None when the deadline passed
    first (a deadline already past: None without receiving)."""

    __slots__ = ("deadline", "size")

    def __init__(self, size: int, deadline: float) -> None:
        self.size = size
        self.deadline = deadline


class Connect:
    """Action: replace the connection by a new one to ``(host, port)``, TCP_NODELAY and
    TLS (the driver's context) included, within ``timeout`` seconds (result: None). Errors
    (OSError, TimeoutError, ssl.SSLError) are thrown into the core."""

    __slots__ = ("host", "port", "timeout")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout


class Close:
    """Action: close the connection if one is open (result: None; never raises)."""

    __slots__ = ()


CLOSE = Close()


class Done:
    """What :func:`resume` returns when the core generator returned ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def resume(core: OpGen[Any], value: Any, error: Exception | None) -> Any:
    """A driver's step: send ``value`` (the last action's result) into ``core``, or throw
    ``error`` (its failure); return the next action, or :class:`Done` with the result."""
    try:
        return core.send(value) if error is None else core.throw(error)
    except StopIteration as stop:
        return Done(stop.value)


class ClientCore:
    """One client connection's state and rules, sans I/O: its generators yield the actions
    ``bytes`` (send), :class:`Recv`, :class:`Sleep`, :class:`Connect` and :class:`Close`
    to a driver that performs them and throws I/O errors back in.

    Args:
        host, port: where to connect (wildcards already mapped to loopback).
        endpoint: ``host:port`` as messages show it.
        where: the store as messages name it (its repr).
        timeout: the store timeout, seconds: the connect deadline, the reconnect deadline.
        token, tls: as :class:`Session`.
        reconnect: reconnect after the server closed or reset the connection.

    States: connected (``connected``); lost, reconnectable on the next operation (``lost``);
    broken, every operation raises NetworkError (``broken`` says why); interrupted
    (``interrupted``, set from any thread: every operation raises a copy of it).
    """

    __slots__ = (
        "broken",
        "connected",
        "endpoint",
        "host",
        "interrupted",
        "lost",
        "port",
        "rbuf",
        "reconnect",
        "session",
        "timeout",
        "unacked",
    )

    def __init__(
        self,
        host: str,
        port: int,
        endpoint: str,
        where: str,
        timeout: float,
        token: bytes | None,
        tls: bool,
        reconnect: bool,
    ) -> None:
        self.host = host
        self.port = port
        self.endpoint = endpoint
        self.timeout = timeout
        self.reconnect = reconnect
        self.session = Session(where, io_timeout_for(timeout), token, tls)
        self.unacked = Unacked()
        self.rbuf = wire.ReplyBuffer()
        self.connected = False
        self.lost = False
        self.broken: str | None = None
        self.interrupted: RdzvError | None = None

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self.session.io_timeout = io_timeout_for(timeout)

    def closed(self) -> None:
        """The driver closed the connection on the user's request: no reconnecting."""
        self.connected = self.lost = False
        self.broken = "the store was closed"

    # ------------------------------------------------------------------ generators
    def start(self, workers: int | None, master: bool) -> OpGen[None]:
        """What torch's constructor does: connect; with ``workers`` (a world size, > 0; None:
        no worker counting) add 1 to the worker count, and as the ``master`` wait until
        ``workers`` stores have (:func:`wait_for_workers`)."""
        if self.broken is not None:
            raise NetworkError(f"{self.session.where} cannot be used: {self.broken}")
        yield from self.connect(self.timeout)
        s = self.session
        if workers is not None and workers > 0:
            yield from self.run(lambda: register_worker(s), "add to the worker count")
            if master:
                yield from self.run(lambda: wait_for_workers(s, workers, self.timeout))

    def connect(self, timeout: float) -> OpGen[None]:
        """Connect and handshake, retrying with back-off (:func:`backoff_delays`) within
        ``timeout`` seconds. Raises :func:`handshake_error`'s errors at once, and
        :func:`connect_error` when out of time."""
        deadline = Deadline(timeout)
        delays = backoff_delays()
        attempts = 0
        while True:
            attempts += 1
            try:
                limit = deadline.remaining()
                limit = min(limit, MIN_IO_TIMEOUT) if limit > 0 else 1.0
                yield Connect(self.host, self.port, limit)
                self.connected, self.lost, self.broken = True, False, None
                self.rbuf.clear()
                yield from self.perform(handshake(self.session))
                return
            except (OSError, NetworkError, ProtocolError, ReadTimeout) as exc:
                self.connected = False
                yield CLOSE
                fatal = handshake_error(self.session, exc)
                if fatal is not None:
                    raise fatal from exc
                last: BaseException = exc
            remaining = deadline.remaining()
            if remaining <= 0:
                raise connect_error(self.endpoint, timeout, attempts, last) from last
            yield Sleep(min(next(delays), remaining))

    def run(
        self,
        make: Callable[[], OpGen[_T]] | None,
        unsafe: str | None = None,
        sent: bytes | None = None,
    ) -> OpGen[_T]:
        """Perform the operation ``make()`` builds (drivers serialise the calls).

        When the connection is lost (and ``reconnect``): reconnect within the store timeout,
        send again the idempotent requests that no reply acknowledged (:class:`Unacked`),
        and perform the operation again, unless ``unsafe`` names it (not idempotent): then
        raise NetworkError saying its outcome is unknown (:func:`outcome_unknown`); lost
        again at once: :func:`lost_again`. ``sent``: a request without a reply (it joins
        the replay window); ``make`` None: sending it is the whole operation (result None).
        """
        recovery: Deadline | None = None
        unacked = self.unacked
        s = self.session
        dropped: str | None = None
        while True:
            if self.interrupted is not None:
                yield from self.fail(str(self.interrupted))
                raise copy.copy(self.interrupted)
            fresh = False
            if not self.connected:
                if not (self.lost and self.reconnect):  # lost: reconnectable once allowed
                    raise NetworkError(f"{s.where} cannot be used: {self.broken}")
                recovery = recovery or Deadline(self.timeout)
                yield from self.connect(recovery.remaining())  # NetworkError when out of time
                _log.info("%s: reconnected", s.where)
                fresh = True
                dropped = unacked.drop_unsafe() or dropped
            try:
                if fresh and unacked:
                    yield unacked.replay()
                if dropped is not None or (sent is not None and unacked.full()):
                    yield from self.perform(ping(s))  # acknowledges what came before
                    unacked.clear()
                if dropped is None:
                    if make is None:
                        yield sent  # the whole operation: a request without a reply
                        result = cast(_T, None)
                    else:
                        result = yield from self.perform(make())
            except Exception as exc:
                reason = failure_reason(s, exc)
                if reason is None:
                    raise
                if self.interrupted is not None:
                    continue  # the loop's head raises with the interruption's reason
                error = yield from self.fail(reason, self.reconnect and connection_lost(exc))
                if not self.lost:
                    raise error from exc
                if unsafe is not None and dropped is None:
                    raise outcome_unknown(s, unsafe, reason) from exc
                before_retry(s, unacked, recovery is not None, reason, exc)
                continue
            unacked.settle(s, dropped, sent, unsafe, self.reconnect)
            return result

    def fail(self, reason: str, lost: bool = False) -> OpGen[NetworkError]:
        """Close the connection: ``lost`` (reconnect on the next operation) or broken."""
        yield CLOSE
        self.connected, self.lost = False, lost
        self.broken = f"the connection failed earlier: {reason}"
        return NetworkError(
            f"{self.session.where}: {reason}; this store object is no longer usable"
        )

    def perform(self, op: OpGen[_T]) -> OpGen[_T]:
        """Run the operation ``op``: its ``bytes`` and :class:`Sleep` go to the driver, its
        :class:`Read` are decoded from the reply buffer, filled by :class:`Recv` actions.
        I/O errors end ``op`` (they are not thrown into it); a :class:`ReadTimeout` is."""
        buf = self.rbuf
        value: Any = None
        error: ReadTimeout | None = None
        while True:
            try:
                action = op.send(value) if error is None else op.throw(error)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            value = error = None
            if action.__class__ is Read:
                need = 1  # an empty buffer decodes nothing: receive first
                if len(buf):
                    try:
                        value = buf.read(action.decoder)
                        continue
                    except wire.NeedData as short:
                        need = short.need
                try:
                    value = yield from self._fill(action, need)
                except ReadTimeout as exc:
                    error = exc
            else:
                yield action

    def _fill(self, read: Read, need: int) -> OpGen[Any]:
        """Receive until ``read`` decodes (``need``: the buffered length it needs so far)."""
        buf = self.rbuf
        while True:
            while len(buf) < need:
                data = yield Recv(recv_size(need - len(buf)), read.deadline)
                if data is None:
                    raise ReadTimeout(read)
                if not data:
                    raise server_closed(read)
                buf.feed(data)
            try:
                return buf.read(read.decoder)
            except wire.NeedData as short:
                need = short.need
