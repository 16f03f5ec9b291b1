"""Sans-I/O codec of the TCPStore wire protocol (torch 2.13), plus rdzv's negotiated extensions.

Like h11, nothing here touches a socket: the server feeds received bytes to a
:class:`RequestParser` and gets typed requests back; it encodes replies with the ``reply_*``
functions. The client encodes requests with the ``encode_*`` functions and decodes replies
incrementally with a :class:`ReplyBuffer` and the ``read_*`` decoders.

The protocol (see ``docs/protocol.md``): a request is one opcode byte and opcode-specific
fields; integers are little-endian; a blob is a u64 length and that many bytes. Replies carry
no opcode; their shape follows from the request. Frames may be split or coalesced anywhere.

Limits are checked as soon as a length or a count is read, before anything is allocated or
awaited, so a hostile ``2**63`` length costs nothing. The defaults are those of torch's libuv
server (the default torch server since 2.4), so anything torch accepts, rdzv accepts.

Extensions (opcodes ``0x80`` and up, which torch does not use) are only parsed on a connection
that negotiated them: the rdzv client's PING carries :data:`RDZV_PING_NONCE`, a value no torch
client sends (torch sends its pid, and Linux pids are below ``2**22``). A torch server echoes
the nonce; an rdzv server answers :data:`RDZV_HELLO` instead. A torch client never negotiates,
so it never sees an extension byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from rdzv.errors import (
    AuthError,
    CounterError,
    ProtocolError,
    QueueEmptyError,
    StoreError,
)

__all__ = [
    "CHECK_NOT_READY",
    "CHECK_READY",
    "DEFAULT_LIMITS",
    "EXTENSION_BASE",
    "EXT_ERROR",
    "EXT_OK",
    "EXT_VERSION",
    "HELLO_AUTH_REQUIRED",
    "HELLO_READ_ONLY",
    "INIT_KEY",
    "KEY_PREFIX",
    "MAX_LEASE_MS",
    "RDZV_HELLO",
    "RDZV_PING_NONCE",
    "RDZV_REFUSED",
    "STOP_WAITING",
    "VALIDATE_MAGIC",
    "WAIT_CANCELED",
    "ErrorCode",
    "Limits",
    "NeedData",
    "Op",
    "ReplyBuffer",
    "Request",
    "RequestParser",
    "is_extension",
]

# --------------------------------------------------------------------------- constants

#: First request of every connection: opcode 0 + this u32. torch's ``validationMagicNumber``
#: in TCPStore.cpp (added with VALIDATE in pytorch#107607).
VALIDATE_MAGIC = 0x3C85F7CE

#: Prefix the torch client puts before every user key (TCPStore.cpp ``keyPrefix_``).
KEY_PREFIX = b"/"
#: The worker-counter key of ``world_size``/``wait_for_workers`` (torch's ``initKey_``); the
#: only key the torch client sends without :data:`KEY_PREFIX`.
INIT_KEY = b"init/"

#: PING nonce by which an rdzv client asks for extensions: ``b"vzdr"``, >= 2**22 so it can
#: never be a Linux pid (``PID_MAX_LIMIT`` is 2**22 on 64-bit), which is what torch sends.
RDZV_PING_NONCE = 0x72647A76
#: Version of the extension set this module speaks.
EXT_VERSION = 1
#: What an rdzv server answers to :data:`RDZV_PING_NONCE`: ``0x72647Axx``, ``xx`` the
#: extension version (never ``0x76``, so it always differs from the echo a torch server sends).
RDZV_HELLO = 0x72647A00 | EXT_VERSION
#: What an rdzv server answers to :data:`RDZV_PING_NONCE` on a connection it refuses (over its
#: connection limit), followed by a u64-length message saying which limit and what raises it;
#: then it closes the connection. Outside the HELLO family, so an older client reports a
#: failed PING rather than misreading it.
RDZV_REFUSED = 0x72647BFF
#: Flag bit of the HELLO's low byte: this server requires this connection to authenticate
#: (EXT_AUTH_BEGIN / EXT_AUTH_PROOF) before anything else. The version is ``low & 0x3F``.
HELLO_AUTH_REQUIRED = 0x80
#: Flag bit of the HELLO's low byte: the server refuses writes for now (its durable journal
#: cannot be written: a full disk); a write in torch's protocol closes the connection.
HELLO_READ_ONLY = 0x40
#: Sizes of the fixed fields of the authentication exchange (see :mod:`rdzv.auth`).
AUTH_NONCE_BYTES = 32
AUTH_PROOF_BYTES = 32

# One-byte replies (torch's CheckResponseType and WaitResponseType).
CHECK_READY = b"\x00"
CHECK_NOT_READY = b"\x01"
STOP_WAITING = b"\x00"
WAIT_CANCELED = b"\x01"
# First byte of every extension reply: success (payload follows) or error (ErrorCode + blob).
# 0x01 is skipped on purpose: after a CANCEL_WAIT the client reads either a late reply
# (0x00 / 0x02 ...) or the WAIT_CANCELED byte, and the three must be distinguishable.
EXT_OK = 0x00
EXT_ERROR = 0x02


class Op(IntEnum):
    """Request opcodes. 0-18 are torch 2.13's ``QueryType`` (TCPStoreBackend.hpp); 0x80 and
    up are rdzv extensions, accepted only after negotiation (see the module docstring)."""

    VALIDATE = 0
    SET = 1
    COMPARE_SET = 2
    GET = 3
    ADD = 4
    CHECK = 5
    WAIT = 6
    GETNUMKEYS = 7
    DELETE_KEY = 8
    APPEND = 9
    MULTI_GET = 10
    MULTI_SET = 11
    CANCEL_WAIT = 12
    PING = 13
    QUEUE_PUSH = 14
    QUEUE_POP = 15
    QUEUE_LEN = 16
    LIST_KEYS = 17
    BARRIER = 18
    # ---- rdzv extensions (docs/protocol.md)
    EXT_ADD = 0x80
    EXT_BARRIER = 0x81
    EXT_GET_WAIT = 0x82
    EXT_MULTI_GET_WAIT = 0x83
    EXT_QUEUE_POP_WAIT = 0x84
    EXT_LIST_KEYS = 0x85
    EXT_NUM_KEYS = 0x86
    EXT_SET_EPHEMERAL = 0x87
    EXT_SET_LEASE = 0x88
    EXT_AUTH_BEGIN = 0x89
    EXT_AUTH_PROOF = 0x8A


#: First opcode of rdzv's extensions; torch's opcodes are all below it.
EXTENSION_BASE = 0x80


def is_extension(op: int) -> bool:
    """Whether opcode ``op`` is in rdzv's extension range (its replies start with
    :data:`EXT_OK` or :data:`EXT_ERROR`; sent only after negotiation)."""
    return op >= EXTENSION_BASE


# The opcode ranges, as error messages name them ("0x00-0x12"), derived from Op.
_TORCH_OPS = f"{min(Op):#04x}-{max(op for op in Op if not is_extension(op)):#04x}"
_EXT_OPS = f"{EXTENSION_BASE:#04x}-{max(Op):#04x}"


class ErrorCode(IntEnum):
    """Error kinds carried by an extension error reply; the client maps them to exceptions."""

    STORE = 1  #: StoreError: any other failure
    COUNTER = 2  #: CounterError: add/barrier on a non-integer or overflowing value
    VALUE = 3  #: ValueError: an argument the server refuses (e.g. world_size < 1)
    AUTH = 4  #: AuthError: authentication refused (wrong proof, no token configured)


_ERROR_CLASSES: dict[int, type[Exception]] = {
    ErrorCode.STORE: StoreError,
    ErrorCode.COUNTER: CounterError,
    ErrorCode.VALUE: ValueError,
    ErrorCode.AUTH: AuthError,
}


def error_code_for(exc: BaseException) -> ErrorCode:
    """The :class:`ErrorCode` that carries ``exc`` to an rdzv client."""
    if isinstance(exc, CounterError):
        return ErrorCode.COUNTER
    if isinstance(exc, AuthError):
        return ErrorCode.AUTH
    if isinstance(exc, ValueError):
        return ErrorCode.VALUE
    return ErrorCode.STORE


def error_from_code(code: int, message: str) -> Exception:
    """Rebuild the exception an rdzv server reported (unknown codes become StoreError)."""
    return _ERROR_CLASSES.get(code, StoreError)(message)


@dataclass(frozen=True)
class Limits:
    """Hard limits on what one request may carry; exceeding one is a protocol violation.

    Defaults are torch's libuv server limits (TCPStoreLibUvBackend.cpp ``MAX_KEY_LEN``,
    ``MAX_STRING_LEN``, ``MAX_KEY_COUNT``; verified: 8192-byte key, 8 MiB value and
    131072-key WAIT accepted, one more refused). ``max_request_bytes`` bounds the sum over a
    multi-key request, which torch leaves unbounded (131072 x 8 MiB).
    """

    max_key_bytes: int = 8192
    max_value_bytes: int = 8 * 1024 * 1024
    max_keys: int = 128 * 1024
    max_request_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_key_bytes", "max_value_bytes", "max_keys", "max_request_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits: {name} must be an integer >= 1, got {value!r}")


DEFAULT_LIMITS = Limits()

#: Longest lease EXT_SET_LEASE accepts, milliseconds (one year): a key that should live
#: longer is a plain SET. Clients refuse more before sending; the server replies an error.
MAX_LEASE_MS = 365 * 24 * 3600 * 1000

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_I64_MIN = -(2**63)

# --------------------------------------------------------------------------- requests


class Request:
    """Base of the typed requests produced by :class:`RequestParser`."""

    __slots__ = ()
    op: Op


#: What follows the opcode in a request frame, by opcode (see :func:`_request`).
_FRAMES: dict[Op, tuple[type[Request], str]] = {}


def _request(op: Op, frame: str | None = None) -> Callable[[type[_R]], type[_R]]:
    """Declare the decorated class as the request of opcode ``op`` and how its frame is
    parsed: ``"key"`` (one key blob), ``"key+value"`` (key and value blobs), ``"key+i64"``
    (key blob and an i64), ``"keys"`` (u64 count and key blobs; MULTI_SET: key and value
    blobs), ``"none"`` (nothing), or the name of a :class:`RequestParser` method for any
    other layout. None: not parsed from the tables (VALIDATE, which only opens a
    connection). The parser tables are built from these declarations, so adding an opcode
    to the codec is declaring its request here (and its reply encoder and decoder below)."""

    def deco(cls: type[_R]) -> type[_R]:
        cls.op = op
        if frame is not None:
            _FRAMES[op] = (cls, frame)
        return cls

    return deco


_R = TypeVar("_R", bound=Request)


@_request(Op.VALIDATE)
@dataclass(slots=True)
class Validate(Request):
    magic: int


@_request(Op.SET, "key+value")
@dataclass(slots=True)
class Set(Request):
    key: bytes
    value: bytes


@_request(Op.COMPARE_SET, "_p_compare_set")
@dataclass(slots=True)
class CompareSet(Request):
    key: bytes
    expected: bytes
    desired: bytes


@_request(Op.GET, "key")
@dataclass(slots=True)
class Get(Request):
    key: bytes


@_request(Op.ADD, "key+i64")
@dataclass(slots=True)
class Add(Request):
    key: bytes
    amount: int


@_request(Op.CHECK, "keys")
@dataclass(slots=True)
class Check(Request):
    keys: list[bytes]


@_request(Op.WAIT, "keys")
@dataclass(slots=True)
class Wait(Request):
    keys: list[bytes]


@_request(Op.GETNUMKEYS, "none")
@dataclass(slots=True)
class GetNumKeys(Request):
    pass


@_request(Op.DELETE_KEY, "key")
@dataclass(slots=True)
class DeleteKey(Request):
    key: bytes


@_request(Op.APPEND, "key+value")
@dataclass(slots=True)
class Append(Request):
    key: bytes
    value: bytes


@_request(Op.MULTI_GET, "keys")
@dataclass(slots=True)
class MultiGet(Request):
    keys: list[bytes]


@_request(Op.MULTI_SET, "keys")
@dataclass(slots=True)
class MultiSet(Request):
    keys: list[bytes]
    values: list[bytes]


@_request(Op.CANCEL_WAIT, "none")
@dataclass(slots=True)
class CancelWait(Request):
    pass


@_request(Op.PING, "_p_ping")
@dataclass(slots=True)
class Ping(Request):
    nonce: int


@_request(Op.QUEUE_PUSH, "key+value")
@dataclass(slots=True)
class QueuePush(Request):
    key: bytes
    value: bytes


@_request(Op.QUEUE_POP, "key")
@dataclass(slots=True)
class QueuePop(Request):
    key: bytes


@_request(Op.QUEUE_LEN, "key")
@dataclass(slots=True)
class QueueLen(Request):
    key: bytes


@_request(Op.LIST_KEYS, "none")
@dataclass(slots=True)
class ListKeys(Request):
    pass


@_request(Op.BARRIER, "key+i64")
@dataclass(slots=True)
class Barrier(Request):
    key: bytes
    world_size: int


@_request(Op.EXT_ADD, "key+i64")
@dataclass(slots=True)
class ExtAdd(Request):
    key: bytes
    amount: int


@_request(Op.EXT_BARRIER, "key+i64")
@dataclass(slots=True)
class ExtBarrier(Request):
    key: bytes
    world_size: int


@_request(Op.EXT_GET_WAIT, "key")
@dataclass(slots=True)
class ExtGetWait(Request):
    key: bytes


@_request(Op.EXT_MULTI_GET_WAIT, "keys")
@dataclass(slots=True)
class ExtMultiGetWait(Request):
    keys: list[bytes]


@_request(Op.EXT_QUEUE_POP_WAIT, "key")
@dataclass(slots=True)
class ExtQueuePopWait(Request):
    key: bytes


@_request(Op.EXT_LIST_KEYS, "key")
@dataclass(slots=True)
class ExtListKeys(Request):
    prefix: bytes


@_request(Op.EXT_NUM_KEYS, "key")
@dataclass(slots=True)
class ExtNumKeys(Request):
    prefix: bytes


@_request(Op.EXT_SET_EPHEMERAL, "key+value")
@dataclass(slots=True)
class ExtSetEphemeral(Request):
    key: bytes
    value: bytes


@_request(Op.EXT_SET_LEASE, "_p_set_lease")
@dataclass(slots=True)
class ExtSetLease(Request):
    key: bytes
    value: bytes
    ttl_ms: int


@_request(Op.EXT_AUTH_BEGIN, "none")
@dataclass(slots=True)
class ExtAuthBegin(Request):
    pass


@_request(Op.EXT_AUTH_PROOF, "_p_auth_proof")
@dataclass(slots=True)
class ExtAuthProof(Request):
    client_nonce: bytes
    proof: bytes


# --------------------------------------------------------------------------- parsing


class NeedData(Exception):
    """Raised by decoders when the buffer ends before the frame does.

    ``need`` is the buffer length (absolute index) required before trying again; ``keep`` is
    where the unconsumed bytes start (-1: at the start of the current frame).
    """

    __slots__ = ("keep", "need")

    def __init__(self, need: int, keep: int = -1) -> None:
        self.need = need
        self.keep = keep


def _show(key: bytes) -> str:
    return repr(key[:64]) + ("..." if len(key) > 64 else "")


class _ListState:
    """Progress through a multi-key request whose frame is split across reads."""

    __slots__ = ("keys", "n", "op", "size", "values")

    def __init__(self, op: Op, n: int) -> None:
        self.op = op
        self.n = n
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.size = 9


_Parse = Callable[["RequestParser", bytes, int, int], tuple[Request, int]]


class RequestParser:
    """Server side: bytes in, typed requests out.

    ``receive(data)`` returns every request completed by ``data`` (possibly none). A
    protocol violation (bad first request, unknown opcode, a limit exceeded) sets
    :attr:`error` to a :class:`~rdzv.errors.ProtocolError` whose message names the violation;
    the requests decoded before it are still returned. After an error, the connection must be
    closed: ``receive`` raises the error again.

    Args:
        limits: the :class:`Limits` to enforce.
        require_validate: the first request must be VALIDATE with :data:`VALIDATE_MAGIC`
            (torch servers require it); fragmentation of that first request is tolerated.
        allow_extensions: accept the extension opcodes after an rdzv PING negotiated them.
    """

    __slots__ = (
        "_limits",
        "_list",
        "_need",
        "_pending",
        "_table",
        "allow_extensions",
        "error",
        "extended",
        "validated",
    )

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        require_validate: bool = True,
        allow_extensions: bool = True,
    ) -> None:
        self._limits = limits
        self._pending = bytearray()
        self._need = 0
        self._list: _ListState | None = None
        self.allow_extensions = allow_extensions
        self.validated = not require_validate
        self.extended = False
        self.error: ProtocolError | None = None
        self._table: Sequence[_Parse | None] = _TORCH_TABLE

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete request."""
        return len(self._pending)

    @property
    def partial_bytes(self) -> int:
        """Bytes this parser holds for the request in progress: the unparsed tail plus the
        keys and values of a multi-key request decoded so far (0 between requests)."""
        held = len(self._pending)
        if self._list is not None:
            held += self._list.size
        return held

    @property
    def idle(self) -> bool:
        """Validated, no error, and between requests (nothing partial buffered): the next
        byte received starts a new request."""
        return self._need == 0 and self.validated and self.error is None

    def receive(self, data: bytes | memoryview) -> list[Request]:
        """Feed ``data``; return the requests it completed, in order."""
        if self.error is not None:
            raise self.error
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return []
            buf = bytes(pending)
            pending.clear()
        else:
            if data.__class__ is not bytes:
                data = bytes(data)
            if len(data) < self._need:
                pending += data
                return []
            buf = data
        end = len(buf)
        pos = 0
        out: list[Request] = []
        try:
            if self._list is not None:
                req, pos = self._list_items(buf, 0, end)
                out.append(req)
            if not self.validated and pos < end:
                req, pos = self._validate(buf, pos, end)
                out.append(req)
            while pos < end:
                parse = self._table[buf[pos]]
                if parse is None:
                    raise self._unknown(buf[pos])
                req, pos = parse(self, buf, pos + 1, end)
                out.append(req)
        except NeedData as short:
            keep = pos if short.keep < 0 else short.keep
            pending += memoryview(buf)[keep:]
            self._need = short.need - keep
        except ProtocolError as exc:
            self.error = exc
        else:
            self._need = 0
        return out

    def _unknown(self, op: int) -> ProtocolError:
        if is_extension(op) and op in Op._value2member_map_:
            return ProtocolError(
                f"extension opcode {op:#04x} ({Op(op).name}) sent without negotiating "
                "extensions (PING with the rdzv nonce)"
            )
        if op == Op.VALIDATE:
            return ProtocolError("VALIDATE sent twice; it is only allowed as the first request")
        return ProtocolError(
            f"unknown opcode {op:#04x}; torch 2.13 uses {_TORCH_OPS}, rdzv extensions {_EXT_OPS}"
        )

    def _validate(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        op = buf[pos]
        if op != Op.VALIDATE:
            raise ProtocolError(
                f"the first request must be VALIDATE (0x00), got opcode {op:#04x}; "
                "is this a TCPStore client?"
            )
        if pos + 5 > end:
            raise NeedData(pos + 5)
        (magic,) = _U32.unpack_from(buf, pos + 1)
        if magic != VALIDATE_MAGIC:
            raise ProtocolError(
                f"VALIDATE carried magic {magic:#010x}, expected {VALIDATE_MAGIC:#010x}"
            )
        self.validated = True
        return Validate(magic), pos + 5

    # ------------------------------------------------------------------ field readers
    # Kept small and inlined in the per-shape parsers below, which run once per request.

    def _blob(self, buf: bytes, pos: int, end: int, limit: int, what: str) -> tuple[bytes, int]:
        stop = pos + 8
        if stop > end:
            raise NeedData(stop)
        n = _U64_FROM(buf, pos)[0]
        if n > limit:
            raise _too_big(what, n, limit)
        stop += n
        if stop > end:
            raise NeedData(stop)
        return buf[pos + 8 : stop], stop

    def _p_compare_set(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        limits = self._limits
        key, pos = self._blob(buf, pos, end, limits.max_key_bytes, "key")
        expected, pos = self._blob(buf, pos, end, limits.max_value_bytes, "value")
        desired, pos = self._blob(buf, pos, end, limits.max_value_bytes, "value")
        return CompareSet(key, expected, desired), pos

    def _p_set_lease(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        limits = self._limits
        key, pos = self._blob(buf, pos, end, limits.max_key_bytes, "key")
        value, pos = self._blob(buf, pos, end, limits.max_value_bytes, "value")
        if pos + 8 > end:
            raise NeedData(pos + 8)
        return ExtSetLease(key, value, _I64_FROM(buf, pos)[0]), pos + 8

    def _p_auth_proof(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        mid = pos + AUTH_NONCE_BYTES
        stop = mid + AUTH_PROOF_BYTES
        if stop > end:
            raise NeedData(stop)
        return ExtAuthProof(buf[pos:mid], buf[mid:stop]), stop

    def _p_ping(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        stop = pos + 4
        if stop > end:
            raise NeedData(stop)
        (nonce,) = _U32.unpack_from(buf, pos)
        if nonce == RDZV_PING_NONCE and self.allow_extensions and not self.extended:
            self.extended = True
            self._table = _EXT_TABLE
        return Ping(nonce), stop

    def _p_list(self, op: Op, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        stop = pos + 8
        if stop > end:
            raise NeedData(stop)
        n = _U64_FROM(buf, pos)[0]
        limits = self._limits
        if n > limits.max_keys:
            raise ProtocolError(
                f"{op.name} with {n} keys exceeds the limit of {limits.max_keys} keys"
            )
        if n <= 16 and op != Op.MULTI_SET:
            # Fast path for the usual few keys all present in the buffer.
            max_key = limits.max_key_bytes
            keys = []
            for _ in range(n):
                key_start = stop + 8
                if key_start > end:
                    break
                size = _U64_FROM(buf, stop)[0]
                if size > max_key:
                    raise _too_big("key", size, max_key)
                stop = key_start + size
                if stop > end:
                    break
                keys.append(buf[key_start:stop])
            else:
                return _LIST_CLASSES[op](keys), stop
            stop = pos + 8
        self._list = _ListState(op, n)
        return self._list_items(buf, stop, end)

    def _list_items(self, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        state = self._list
        assert state is not None
        keys = state.keys
        values = state.values
        with_values = state.op == Op.MULTI_SET
        limits = self._limits
        max_key = limits.max_key_bytes
        max_value = limits.max_value_bytes
        limit = limits.max_request_bytes
        blob = self._blob
        start = pos
        try:
            for _ in range(state.n - len(keys)):
                start = pos
                key, pos = blob(buf, pos, end, max_key, "key")
                if with_values:
                    value, pos = blob(buf, pos, end, max_value, "value")
                    values.append(value)
                keys.append(key)
                state.size += pos - start
                if state.size > limit:
                    raise ProtocolError(
                        f"{state.op.name} request of more than {limit} bytes exceeds the "
                        "request size limit"
                    )
        except NeedData as short:
            raise NeedData(short.need, start) from None
        self._list = None
        op = state.op
        if op == Op.MULTI_SET:
            return MultiSet(keys, values), pos
        return _LIST_CLASSES[op](keys), pos


def _too_big(what: str, n: int, limit: int) -> ProtocolError:
    return ProtocolError(f"{what} of {n} bytes exceeds the limit of {limit} bytes")


_U64_FROM = _U64.unpack_from
_I64_FROM = _I64.unpack_from

_LIST_CLASSES: dict[Op, Callable[[list[bytes]], Request]] = {
    op: cls for op, (cls, frame) in _FRAMES.items() if frame == "keys" and op != Op.MULTI_SET
}

# Per-shape parsers: ``(parser, buf, pos, end) -> (request, end of frame)``; ``pos`` is just
# past the opcode. Each is one function with the field reads inlined (this runs for every
# request the server receives).


_KEY_ONLY, _KEY_VALUE, _KEY_INT = range(3)


def _key_parser(cls: Callable[..., Request], tail: int = _KEY_ONLY) -> _Parse:
    """A parser of ``key`` [+ ``value`` blob | + i64] frames building ``cls``."""

    def parse(self: RequestParser, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        start = pos + 8
        if start > end:
            raise NeedData(start)
        n = _U64_FROM(buf, pos)[0]
        limits = self._limits
        if n > limits.max_key_bytes:
            raise _too_big("key", n, limits.max_key_bytes)
        key_end = start + n
        if tail == _KEY_ONLY:
            if key_end > end:
                raise NeedData(key_end)
            return cls(buf[start:key_end]), key_end
        stop = key_end + 8
        if stop > end:
            raise NeedData(stop)
        if tail == _KEY_INT:
            return cls(buf[start:key_end], _I64_FROM(buf, key_end)[0]), stop
        n = _U64_FROM(buf, key_end)[0]
        if n > limits.max_value_bytes:
            raise _too_big("value", n, limits.max_value_bytes)
        value_end = stop + n
        if value_end > end:
            raise NeedData(value_end)
        return cls(buf[start:key_end], buf[stop:value_end]), value_end

    return parse


def _list_parser(op: Op) -> _Parse:
    def parse(self: RequestParser, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        return self._p_list(op, buf, pos, end)

    return parse


def _fixed(req: Request) -> _Parse:
    # Requests without fields carry no state: one shared instance each.
    def parse(self: RequestParser, buf: bytes, pos: int, end: int) -> tuple[Request, int]:
        return req, pos

    return parse


def _parser_of(op: Op, cls: type[Request], frame: str) -> _Parse:
    if frame == "key":
        return _key_parser(cls)
    if frame == "key+value":
        return _key_parser(cls, _KEY_VALUE)
    if frame == "key+i64":
        return _key_parser(cls, _KEY_INT)
    if frame == "keys":
        return _list_parser(op)
    if frame == "none":
        return _fixed(cls())
    parse: _Parse = getattr(RequestParser, frame)
    return parse


def _build_tables() -> tuple[list[_Parse | None], list[_Parse | None]]:
    """The parser tables by opcode byte: torch's opcodes (before negotiation), and torch's
    plus the extensions (after), from the :func:`_request` declarations."""
    torch: list[_Parse | None] = [None] * 256
    ext: list[_Parse | None] = [None] * 256
    for op, (cls, frame) in _FRAMES.items():
        parse = _parser_of(op, cls, frame)
        ext[op] = parse
        if not is_extension(op):
            torch[op] = parse
    return torch, ext


_TORCH_TABLE, _EXT_TABLE = _build_tables()

# --------------------------------------------------------------------------- reply encoders
# Server side. Names follow the reply shapes of docs/protocol.md.

_U64_PACK = _U64.pack
_I64_PACK = _I64.pack


def reply_blob(value: bytes) -> bytes:
    """A blob reply (GET, COMPARE_SET): u64 length + bytes."""
    return _U64_PACK(len(value)) + value


#: ``reply_i64(value) -> bytes``: an i64 reply (ADD, GETNUMKEYS, DELETE_KEY, QUEUE_LEN).
#: The struct's own ``pack``: the server calls it on every such reply.
reply_i64: Callable[[int], bytes] = _I64_PACK


def reply_blobs(values: Sequence[bytes]) -> bytes:
    """Several blobs back to back (MULTI_GET)."""
    parts: list[bytes] = []
    for v in values:
        parts.append(_U64_PACK(len(v)))
        parts.append(v)
    return b"".join(parts)


def reply_key_list(keys: Sequence[bytes]) -> bytes:
    """LIST_KEYS: i64 count, then that many blobs."""
    return _I64_PACK(len(keys)) + reply_blobs(keys)


def reply_queue_pop(value: bytes | None, length_before: int) -> bytes:
    """QUEUE_POP: i64 length before the pop, then the popped blob iff it was > 0."""
    if value is None:
        return _I64_PACK(0)
    return _I64_PACK(length_before) + _U64_PACK(len(value)) + value


def reply_ping(
    nonce: int, extended: bool, auth_required: bool = False, read_only: bool = False
) -> bytes:
    """PING: the nonce echoed; :data:`RDZV_HELLO` when it negotiated the extensions (with
    :data:`HELLO_AUTH_REQUIRED` set when the connection must authenticate first, and
    :data:`HELLO_READ_ONLY` when the server refuses writes for now)."""
    if extended and nonce == RDZV_PING_NONCE:
        flags = (HELLO_AUTH_REQUIRED if auth_required else 0) | (
            HELLO_READ_ONLY if read_only else 0
        )
        return _U32.pack(RDZV_HELLO | flags)
    return _U32.pack(nonce)


def reply_ext_ok(payload: bytes = b"") -> bytes:
    """An extension success reply: :data:`EXT_OK` then the op's payload."""
    return b"\x00" + payload


def reply_refused(message: str) -> bytes:
    """The answer to an rdzv PING on a refused connection: :data:`RDZV_REFUSED` + message blob."""
    return _U32.pack(RDZV_REFUSED) + reply_blob(message.encode("utf-8", "replace"))


def reply_ext_error(code: ErrorCode, message: str) -> bytes:
    """An extension error reply: :data:`EXT_ERROR`, u8 :class:`ErrorCode`, message blob."""
    text = message.encode("utf-8", "replace")
    return bytes((EXT_ERROR, code)) + _U64_PACK(len(text)) + text


def reply_key_sizes(entries: Sequence[tuple[bytes, int]]) -> bytes:
    """EXT_LIST_KEYS payload: i64 count, then per key a blob and its value size as u64."""
    parts = [_I64_PACK(len(entries))]
    for key, size in entries:
        parts.append(_U64_PACK(len(key)))
        parts.append(key)
        parts.append(_U64_PACK(size))
    return b"".join(parts)


# --------------------------------------------------------------------------- request encoders
# Client side. Each returns the complete frame; send it in one write (torch's libuv server
# closes a connection whose VALIDATE arrives in pieces).


def _blob(data: bytes) -> bytes:
    return _U64_PACK(len(data)) + data


def _keys(keys: Sequence[bytes]) -> bytes:
    return _U64_PACK(len(keys)) + b"".join(_U64_PACK(len(k)) + k for k in keys)


def encode_validate() -> bytes:
    return bytes((Op.VALIDATE,)) + _U32.pack(VALIDATE_MAGIC)


def encode_ping(nonce: int) -> bytes:
    return bytes((Op.PING,)) + _U32.pack(nonce)


def encode_set(key: bytes, value: bytes, op: Op = Op.SET) -> bytes:
    """SET, APPEND, QUEUE_PUSH, EXT_SET_EPHEMERAL: opcode, key blob, value blob."""
    return b"".join((bytes((op,)), _U64_PACK(len(key)), key, _U64_PACK(len(value)), value))


def encode_key(op: Op, key: bytes) -> bytes:
    """GET, DELETE_KEY, QUEUE_POP, QUEUE_LEN, EXT_GET_WAIT, ...: opcode and one key blob."""
    return bytes((op,)) + _U64_PACK(len(key)) + key


def encode_key_int(op: Op, key: bytes, value: int) -> bytes:
    """ADD, BARRIER and their extension twins: opcode, key blob, i64."""
    return bytes((op,)) + _U64_PACK(len(key)) + key + _I64_PACK(value)


def encode_compare_set(key: bytes, expected: bytes, desired: bytes) -> bytes:
    return bytes((Op.COMPARE_SET,)) + _blob(key) + _blob(expected) + _blob(desired)


def encode_keys(op: Op, keys: Sequence[bytes]) -> bytes:
    """CHECK, WAIT, MULTI_GET, EXT_MULTI_GET_WAIT: opcode, u64 count, key blobs."""
    return bytes((op,)) + _keys(keys)


def encode_multi_set(keys: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    if len(keys) != len(values):
        raise ValueError(f"multi_set: got {len(keys)} keys but {len(values)} values")
    parts = [bytes((Op.MULTI_SET,)), _U64_PACK(len(keys))]
    for k, v in zip(keys, values, strict=True):
        parts += (_U64_PACK(len(k)), k, _U64_PACK(len(v)), v)
    return b"".join(parts)


def encode_set_lease(key: bytes, value: bytes, ttl_ms: int) -> bytes:
    return bytes((Op.EXT_SET_LEASE,)) + _blob(key) + _blob(value) + _I64_PACK(ttl_ms)


def encode_auth_proof(client_nonce: bytes, proof: bytes) -> bytes:
    """EXT_AUTH_PROOF: the client's 32-byte nonce and 32-byte HMAC proof."""
    if len(client_nonce) != AUTH_NONCE_BYTES or len(proof) != AUTH_PROOF_BYTES:
        raise ValueError("EXT_AUTH_PROOF takes a 32-byte nonce and a 32-byte proof")
    return bytes((Op.EXT_AUTH_PROOF,)) + client_nonce + proof


def read_fixed(size: int) -> Decoder[bytes]:
    """Exactly ``size`` raw bytes (the nonce and proof of the authentication exchange)."""

    def decode(buf: bytes | bytearray, pos: int) -> tuple[bytes, int]:
        stop = pos + size
        if stop > len(buf):
            raise NeedData(stop)
        return bytes(buf[pos:stop]), stop

    return decode


def encode_op(op: Op) -> bytes:
    """Requests without fields: GETNUMKEYS, CANCEL_WAIT, LIST_KEYS."""
    return bytes((op,))


# --------------------------------------------------------------------------- reply decoding

_T = TypeVar("_T")
#: A reply decoder: ``(buffer, position) -> (value, new position)``; raises :class:`NeedData`
#: when the buffer is too short.
Decoder = Callable[[bytes | bytearray, int], tuple[_T, int]]


def read_u8(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise NeedData(pos + 1)
    return buf[pos], pos + 1


def read_u32(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    stop = pos + 4
    if stop > len(buf):
        raise NeedData(stop)
    return _U32.unpack_from(buf, pos)[0], stop


def read_i64(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    stop = pos + 8
    if stop > len(buf):
        raise NeedData(stop)
    return _I64.unpack_from(buf, pos)[0], stop


def read_u64(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    stop = pos + 8
    if stop > len(buf):
        raise NeedData(stop)
    return _U64.unpack_from(buf, pos)[0], stop


def read_blob(buf: bytes | bytearray, pos: int) -> tuple[bytes, int]:
    stop = pos + 8
    if stop > len(buf):
        raise NeedData(stop)
    (n,) = _U64.unpack_from(buf, pos)
    if n >= 2**62:
        raise ProtocolError(f"the server sent a blob length of {n} bytes; not a TCPStore server?")
    stop += n
    if stop > len(buf):
        raise NeedData(stop)
    return bytes(buf[pos + 8 : stop]), stop


def read_blobs(count: int) -> Decoder[list[bytes]]:
    """``count`` blobs back to back (MULTI_GET)."""

    def decode(buf: bytes | bytearray, pos: int) -> tuple[list[bytes], int]:
        out = []
        for _ in range(count):
            value, pos = read_blob(buf, pos)
            out.append(value)
        return out, pos

    return decode


def read_key_list(buf: bytes | bytearray, pos: int) -> tuple[list[bytes], int]:
    """LIST_KEYS: i64 count + blobs."""
    n, pos = read_i64(buf, pos)
    if not 0 <= n < 2**40:
        raise ProtocolError(f"the server announced {n} keys; not a TCPStore server?")
    return read_blobs(n)(buf, pos)


def read_key_sizes(buf: bytes | bytearray, pos: int) -> tuple[list[tuple[bytes, int]], int]:
    """EXT_LIST_KEYS payload: i64 count + (blob, u64 size) pairs."""
    n, pos = read_i64(buf, pos)
    if not 0 <= n < 2**40:
        raise ProtocolError(f"the server announced {n} keys; not a TCPStore server?")
    out = []
    for _ in range(n):
        key, pos = read_blob(buf, pos)
        size, pos = read_u64(buf, pos)
        out.append((key, size))
    return out, pos


def read_queue_pop(buf: bytes | bytearray, pos: int) -> tuple[bytes | None, int]:
    """QUEUE_POP: ``None`` for an empty queue, else the popped value."""
    n, pos = read_i64(buf, pos)
    if n <= 0:
        return None, pos
    return read_blob(buf, pos)


def read_ext_error(buf: bytes | bytearray, pos: int) -> tuple[Exception, int]:
    """The body of an extension error reply (after the :data:`EXT_ERROR` byte)."""
    code, pos = read_u8(buf, pos)
    message, pos = read_blob(buf, pos)
    return error_from_code(code, message.decode("utf-8", "replace")), pos


def queue_empty_error(key: str, where: str) -> QueueEmptyError:
    return QueueEmptyError(f"queue_pop: queue {key!r} is empty on {where}")


class ReplyBuffer:
    """Client side: accumulates received bytes and decodes replies from them in order.

    ``feed(data)`` appends; ``read(decoder)`` returns the next decoded value and consumes it,
    or raises :class:`NeedData` (nothing consumed) with the total buffered length needed.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        buf += data

    def read(self, decoder: Decoder[_T]) -> _T:
        try:
            value, pos = decoder(self._buf, self._pos)
        except NeedData as short:
            raise NeedData(short.need - self._pos) from None
        self._pos = pos
        if pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif pos > 65536:
            del self._buf[:pos]
            self._pos = 0
        return value

    def clear(self) -> None:
        self._buf.clear()
        self._pos = 0
