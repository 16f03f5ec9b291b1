"""The sans-I/O TCPStore codec: torch's bytes, incremental parsing, limits, negotiation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdzv import wire
from rdzv.errors import CounterError, ProtocolError, StoreError
from rdzv.wire import Limits, NeedData, Op, ReplyBuffer, RequestParser

VALIDATE = bytes.fromhex("00cef7853c")
U64 = struct.Struct("<Q").pack


def parse_all(data: bytes, **kwargs: object) -> list[wire.Request]:
    parser = RequestParser(**kwargs)  # type: ignore[arg-type]
    out = parser.receive(data)
    assert parser.error is None, parser.error
    return out


# --------------------------------------------------------------------------- torch's bytes
# Requests captured from the torch 2.13 client (tcpstore-protocol.md section 6.A).
TORCH_FRAMES = [
    ("0103000000000000002f6b3102000000000000007631", wire.Set(b"/k1", b"v1")),
    ("06010000000000000003000000000000002f6b31", wire.Wait([b"/k1"])),
    ("0303000000000000002f6b31", wire.Get(b"/k1")),
    ("0404000000000000002f636e74feffffffffffffff", wire.Add(b"/cnt", -2)),
    (
        "0203000000000000002f637303000000000000006e657705000000000000006e65776572",
        wire.CompareSet(b"/cs", b"new", b"newer"),
    ),
    (
        "05020000000000000003000000000000002f6b3104000000000000002f636e74",
        wire.Check([b"/k1", b"/cnt"]),
    ),
    ("050000000000000000", wire.Check([])),
    ("0803000000000000002f6b31", wire.DeleteKey(b"/k1")),
    ("07", wire.GetNumKeys()),
    ("0903000000000000002f617002000000000000006162", wire.Append(b"/ap", b"ab")),
    (
        "0b020000000000000003000000000000002f6d3101000000000000007803000000000000002f6d32"
        "0200000000000000797a",
        wire.MultiSet([b"/m1", b"/m2"], [b"x", b"yz"]),
    ),
    (
        "0a020000000000000003000000000000002f6d3103000000000000002f6d32",
        wire.MultiGet([b"/m1", b"/m2"]),
    ),
    ("0c", wire.CancelWait()),
    ("0d92120000", wire.Ping(0x1292)),
    ("0e02000000000000002f71010000000000000061", wire.QueuePush(b"/q", b"a")),
    ("0f02000000000000002f71", wire.QueuePop(b"/q")),
    ("1002000000000000002f71", wire.QueueLen(b"/q")),
    ("11", wire.ListKeys()),
    ("1203000000000000002f62310100000000000000", wire.Barrier(b"/b1", 1)),
    ("040500000000000000696e69742f0100000000000000", wire.Add(b"init/", 1)),
]


@pytest.mark.parametrize(("hexdata", "expected"), TORCH_FRAMES)
def test_parses_torch_client_frames(hexdata: str, expected: wire.Request) -> None:
    assert parse_all(VALIDATE + bytes.fromhex(hexdata)) == [
        wire.Validate(wire.VALIDATE_MAGIC),
        expected,
    ]


@pytest.mark.parametrize(("hexdata", "expected"), TORCH_FRAMES)
def test_client_encoders_match_torch_bytes(hexdata: str, expected: wire.Request) -> None:
    assert _encode(expected) == bytes.fromhex(hexdata)


def _encode(req: wire.Request) -> bytes:
    """Encode a request with the client-side encoders."""
    if isinstance(req, (wire.Set, wire.Append, wire.QueuePush, wire.ExtSetEphemeral)):
        return wire.encode_set(req.key, req.value, req.op)
    if isinstance(req, (wire.Get, wire.DeleteKey, wire.QueuePop, wire.QueueLen)):
        return wire.encode_key(req.op, req.key)
    if isinstance(req, (wire.ExtGetWait, wire.ExtQueuePopWait)):
        return wire.encode_key(req.op, req.key)
    if isinstance(req, (wire.ExtListKeys, wire.ExtNumKeys)):
        return wire.encode_key(req.op, req.prefix)
    if isinstance(req, (wire.Add, wire.ExtAdd)):
        return wire.encode_key_int(req.op, req.key, req.amount)
    if isinstance(req, (wire.Barrier, wire.ExtBarrier)):
        return wire.encode_key_int(req.op, req.key, req.world_size)
    if isinstance(req, wire.CompareSet):
        return wire.encode_compare_set(req.key, req.expected, req.desired)
    if isinstance(req, (wire.Check, wire.Wait, wire.MultiGet, wire.ExtMultiGetWait)):
        return wire.encode_keys(req.op, req.keys)
    if isinstance(req, wire.MultiSet):
        return wire.encode_multi_set(req.keys, req.values)
    if isinstance(req, wire.Ping):
        return wire.encode_ping(req.nonce)
    if isinstance(req, wire.ExtSetLease):
        return wire.encode_set_lease(req.key, req.value, req.ttl_ms)
    return wire.encode_op(req.op)


# --------------------------------------------------------------------------- fragmentation
keys = st.binary(max_size=40)
values = st.binary(max_size=300)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
key_lists = st.lists(keys, max_size=6)

torch_requests = st.one_of(
    st.builds(wire.Set, keys, values),
    st.builds(wire.CompareSet, keys, values, values),
    st.builds(wire.Get, keys),
    st.builds(wire.Add, keys, int64),
    st.builds(wire.Check, key_lists),
    st.builds(wire.Wait, key_lists),
    st.just(wire.GetNumKeys()),
    st.builds(wire.DeleteKey, keys),
    st.builds(wire.Append, keys, values),
    st.builds(wire.MultiGet, key_lists),
    st.lists(st.tuples(keys, values), max_size=5).map(
        lambda kv: wire.MultiSet([k for k, _ in kv], [v for _, v in kv])
    ),
    st.just(wire.CancelWait()),
    st.builds(wire.Ping, st.integers(0, 2**22)),
    st.builds(wire.QueuePush, keys, values),
    st.builds(wire.QueuePop, keys),
    st.builds(wire.QueueLen, keys),
    st.just(wire.ListKeys()),
    st.builds(wire.Barrier, keys, int64),
)
ext_requests = st.one_of(
    torch_requests,
    st.builds(wire.ExtAdd, keys, int64),
    st.builds(wire.ExtBarrier, keys, int64),
    st.builds(wire.ExtGetWait, keys),
    st.builds(wire.ExtMultiGetWait, key_lists),
    st.builds(wire.ExtQueuePopWait, keys),
    st.builds(wire.ExtListKeys, keys),
    st.builds(wire.ExtNumKeys, keys),
    st.builds(wire.ExtSetEphemeral, keys, values),
    st.builds(wire.ExtSetLease, keys, values, int64),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, start = [], 0
    for p in points:
        chunks.append(data[start:p])
        start = p
    chunks.append(data[start:])
    return chunks


@settings(max_examples=300, deadline=None)
@given(st.lists(torch_requests, max_size=12), st.lists(st.integers(0, 10**6), max_size=30))
def test_any_split_or_coalescing_yields_the_same_requests(
    requests: list[wire.Request], cuts: list[int]
) -> None:
    data = VALIDATE + b"".join(_encode(r) for r in requests)
    parser = RequestParser()
    out: list[wire.Request] = []
    for chunk in _split(data, cuts):
        out += parser.receive(chunk)
    assert parser.error is None
    assert out[1:] == requests
    assert parser.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(ext_requests, max_size=10), st.lists(st.integers(0, 10**6), max_size=20))
def test_extension_requests_after_negotiation_any_split(
    requests: list[wire.Request], cuts: list[int]
) -> None:
    hello = wire.encode_ping(wire.RDZV_PING_NONCE)
    data = VALIDATE + hello + b"".join(_encode(r) for r in requests)
    parser = RequestParser()
    out: list[wire.Request] = []
    for chunk in _split(data, cuts):
        out += parser.receive(chunk)
    assert parser.error is None
    assert parser.extended
    assert out[2:] == requests


def test_byte_by_byte_multi_set_resumes_without_reparsing() -> None:
    n = 2000
    req = wire.MultiSet([b"k%d" % i for i in range(n)], [b"v" * (i % 7) for i in range(n)])
    data = VALIDATE + _encode(req) + wire.encode_op(Op.GETNUMKEYS)
    parser = RequestParser()
    out: list[wire.Request] = []
    for i in range(len(data)):
        out += parser.receive(data[i : i + 1])
        # Only the unparsed tail is buffered: less than one key/value pair (8+5+8+6 bytes).
        assert parser.buffered < 8 + 5 + 8 + 6
    assert out[1:] == [req, wire.GetNumKeys()]


def test_requests_before_a_violation_are_returned() -> None:
    parser = RequestParser()
    out = parser.receive(VALIDATE + _encode(wire.Set(b"/a", b"1")) + b"\x63" + b"junk")
    assert out[1:] == [wire.Set(b"/a", b"1")]
    assert isinstance(parser.error, ProtocolError)
    assert "unknown opcode 0x63" in str(parser.error)
    with pytest.raises(ProtocolError):
        parser.receive(b"\x07")


# --------------------------------------------------------------------------- handshake
def test_first_request_must_be_validate() -> None:
    parser = RequestParser()
    assert parser.receive(bytes.fromhex("0d01000000")) == []
    assert parser.error is not None
    assert "first request must be VALIDATE" in str(parser.error)


def test_wrong_magic_is_refused() -> None:
    parser = RequestParser()
    parser.receive(bytes.fromhex("0078563412"))
    assert parser.error is not None
    assert "0x12345678" in str(parser.error)


def test_fragmented_validate_is_tolerated() -> None:
    parser = RequestParser()
    assert parser.receive(VALIDATE[:2]) == []
    assert parser.receive(VALIDATE[2:4]) == []
    assert parser.receive(VALIDATE[4:] + bytes.fromhex("0d05000000")) == [
        wire.Validate(wire.VALIDATE_MAGIC),
        wire.Ping(5),
    ]
    assert parser.error is None


def test_second_validate_is_refused() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + VALIDATE)
    assert parser.error is not None
    assert "VALIDATE sent twice" in str(parser.error)


def test_validate_can_be_made_optional() -> None:
    assert parse_all(b"\x07", require_validate=False) == [wire.GetNumKeys()]


def test_extension_opcode_needs_negotiation() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + wire.encode_key(Op.EXT_GET_WAIT, b"/k"))
    assert parser.error is not None
    assert "without negotiating" in str(parser.error)


def test_torch_pid_nonce_does_not_negotiate() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + wire.encode_ping(2**22 - 1))
    assert not parser.extended
    assert wire.reply_ping(2**22 - 1, parser.extended) == struct.pack("<I", 2**22 - 1)


def test_rdzv_nonce_negotiates_and_gets_hello() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + wire.encode_ping(wire.RDZV_PING_NONCE))
    assert parser.extended
    reply = struct.unpack("<I", wire.reply_ping(wire.RDZV_PING_NONCE, True))[0]
    assert reply != wire.RDZV_PING_NONCE
    assert reply >> 8 == wire.RDZV_HELLO >> 8


def test_server_with_extensions_disabled_echoes_rdzv_nonce() -> None:
    parser = RequestParser(allow_extensions=False)
    parser.receive(VALIDATE + wire.encode_ping(wire.RDZV_PING_NONCE))
    assert not parser.extended
    assert wire.reply_ping(wire.RDZV_PING_NONCE, parser.extended) == struct.pack(
        "<I", wire.RDZV_PING_NONCE
    )


# --------------------------------------------------------------------------- limits
def _header_only(op: int, length: int) -> bytes:
    return bytes((op,)) + U64(length)


@pytest.mark.parametrize("length", [8193, 2**63, 2**64 - 1])
def test_oversized_key_is_refused_from_its_length_alone(length: int) -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + _header_only(Op.SET, length))  # no key bytes follow
    assert parser.error is not None
    assert f"key of {length} bytes exceeds the limit of 8192" in str(parser.error)


def test_key_at_the_limit_is_accepted() -> None:
    key = b"k" * 8192
    assert parse_all(VALIDATE + _encode(wire.Get(key)))[1] == wire.Get(key)


def test_oversized_value_is_refused_before_it_arrives() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + _header_only(Op.SET, 2) + b"/k" + U64(8 * 2**20 + 1))
    assert parser.error is not None
    assert "value of 8388609 bytes" in str(parser.error)
    assert parser.buffered == 0


def test_value_at_the_limit_is_accepted() -> None:
    value = b"v" * (8 * 2**20)
    assert parse_all(VALIDATE + _encode(wire.Set(b"/k", value)))[1] == wire.Set(b"/k", value)


def test_key_count_limit() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + bytes.fromhex("060100020000000000"))  # WAIT, 131073 keys
    assert parser.error is not None
    assert "131073 keys exceeds the limit of 131072" in str(parser.error)
    ok = RequestParser()
    ok.receive(VALIDATE + bytes((Op.WAIT,)) + U64(131072))
    assert ok.error is None


def test_request_size_limit_over_many_keys() -> None:
    parser = RequestParser(Limits(max_request_bytes=1000))
    req = wire.MultiSet([b"k%d" % i for i in range(100)], [b"x" * 20] * 100)
    parser.receive(VALIDATE + _encode(req))
    assert parser.error is not None
    assert "request size limit" in str(parser.error)


def test_custom_limits() -> None:
    parser = RequestParser(Limits(max_key_bytes=4))
    parser.receive(VALIDATE + _encode(wire.Get(b"/abcd")))
    assert parser.error is not None
    assert "limit of 4 bytes" in str(parser.error)


# --------------------------------------------------------------------------- replies
def test_reply_encoders_match_torch_server_bytes() -> None:
    # Replies of torch's libuv server (tcpstore-protocol.md section 6.B).
    assert wire.reply_blob(b"1") == bytes.fromhex("010000000000000031")
    assert wire.reply_i64(-3) == bytes.fromhex("fdffffffffffffff")
    assert wire.reply_blobs([b"x", b"yz"]) == bytes.fromhex(
        "0100000000000000780200000000000000797a"
    )
    assert wire.reply_queue_pop(b"a", 2) == bytes.fromhex("0200000000000000010000000000000061")
    assert wire.reply_queue_pop(None, 0) == bytes.fromhex("0000000000000000")
    assert wire.reply_key_list([b"/m2", b"/m1"]) == bytes.fromhex(
        "020000000000000003000000000000002f6d3203000000000000002f6d31"
    )
    assert wire.reply_ping(0xDEADBEEF, False) == bytes.fromhex("efbeadde")


@settings(max_examples=100, deadline=None)
@given(st.lists(values, max_size=8), st.lists(st.integers(0, 10**5), max_size=10))
def test_reply_buffer_decodes_split_replies(blobs: list[bytes], cuts: list[int]) -> None:
    data = wire.reply_key_list(blobs) + wire.reply_i64(-7) + b"\x01"
    buf = ReplyBuffer()
    decoded: list[object] = []
    decoders = [wire.read_key_list, wire.read_i64, wire.read_u8]
    for chunk in _split(data, cuts):
        buf.feed(chunk)
        while decoders:
            try:
                decoded.append(buf.read(decoders[0]))
            except NeedData as short:
                assert short.need > len(buf)
                break
            decoders.pop(0)
    assert decoded == [blobs, -7, 1]
    assert len(buf) == 0


def test_ext_error_round_trip() -> None:
    data = wire.reply_ext_error(wire.ErrorCode.COUNTER, "add: not an integer")
    buf = ReplyBuffer()
    buf.feed(data)
    assert buf.read(wire.read_u8) == wire.EXT_ERROR
    error = buf.read(wire.read_ext_error)
    assert isinstance(error, CounterError)
    assert str(error) == "add: not an integer"
    assert isinstance(wire.error_from_code(99, "x"), StoreError)
    assert isinstance(wire.error_from_code(wire.ErrorCode.VALUE, "x"), ValueError)


def test_hostile_reply_length_is_a_protocol_error() -> None:
    buf = ReplyBuffer()
    buf.feed(U64(2**63))
    with pytest.raises(ProtocolError, match="blob length"):
        buf.read(wire.read_blob)


def test_unknown_opcode_message_names_the_ranges_of_op() -> None:
    parser = RequestParser()
    parser.receive(VALIDATE + b"\x63")
    torch_last = max(op for op in Op if op < Op.EXT_ADD)
    assert f"torch 2.13 uses 0x00-{torch_last:#04x}" in str(parser.error)
    assert f"rdzv extensions {Op.EXT_ADD:#04x}-{max(Op):#04x}" in str(parser.error)


def test_key_sizes_are_unsigned() -> None:
    """EXT_LIST_KEYS sizes are u64: one above the i64 range decodes as itself."""
    payload = wire.reply_key_sizes([(b"k", 2**63 + 5)])
    assert wire.read_key_sizes(payload, 0) == ([(b"k", 2**63 + 5)], len(payload))
