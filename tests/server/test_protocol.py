"""The server on the wire: torch's replies byte for byte, deferred replies, extensions."""

from __future__ import annotations

import struct

import pytest

from rdzv import wire
from rdzv.server import ServerThread
from rdzv.wire import Op
from tests.server.helpers import Raw, eventually

I64 = struct.Struct("<q").pack

# (request, reply) pairs replayed on one connection; replies are those of torch's libuv
# server (tcpstore-protocol.md section 6.B), except where rdzv's semantics are documented
# to differ (none in this sequence).
LIBUV_SEQUENCE = [
    ("0defbeadde", "efbeadde"),
    ("0102000000000000002f61010000000000000031", ""),
    ("0302000000000000002f61", "010000000000000031"),
    ("0308000000000000002f6d697373696e67", "0000000000000000"),
    ("0402000000000000002f6e0700000000000000", "0700000000000000"),
    ("0402000000000000002f6ef6ffffffffffffff", "fdffffffffffffff"),
    ("0302000000000000002f6e", "02000000000000002d33"),
    ("0402000000000000002f610100000000000000", "0200000000000000"),
    ("0202000000000000002f630000000000000000010000000000000078", "010000000000000078"),
    ("0203000000000000002f6332010000000000000065010000000000000064", "010000000000000065"),
    ("05010000000000000003000000000000002f6332", "01"),
    ("0202000000000000002f63010000000000000078010000000000000079", "010000000000000079"),
    ("0202000000000000002f6301000000000000007801000000000000007a", "010000000000000079"),
    ("0202000000000000002f630000000000000000010000000000000077", "010000000000000079"),
    ("05020000000000000002000000000000002f6102000000000000002f6e", "00"),
    ("05020000000000000002000000000000002f6103000000000000002f7a7a", "01"),
    ("050000000000000000", "00"),
    ("06010000000000000002000000000000002f61", "00"),
    ("060000000000000000", "00"),
    ("07", "0300000000000000"),
    ("0802000000000000002f61", "0100000000000000"),
    ("0802000000000000002f61", "0000000000000000"),
    ("0903000000000000002f617002000000000000006162", ""),
    ("0903000000000000002f617002000000000000006364", ""),
    ("0303000000000000002f6170", "040000000000000061626364"),
    (
        "0b020000000000000003000000000000002f6d3101000000000000007803000000000000002f6d32"
        "0200000000000000797a",
        "",
    ),
    (
        "0a020000000000000003000000000000002f6d3103000000000000002f6d32",
        "0100000000000000780200000000000000797a",
    ),
    ("0c", "01"),
    ("1204000000000000002f6261720100000000000000", "00"),
    ("0304000000000000002f626172", "010000000000000031"),
    ("07", "0600000000000000"),
    ("0e02000000000000002f71010000000000000061", ""),
    ("0e02000000000000002f7102000000000000006263", ""),
    ("1002000000000000002f71", "0200000000000000"),
    ("05010000000000000002000000000000002f71", "00"),
    ("07", "0600000000000000"),  # queues are not keys (torch said 8 after two more sets)
    ("0f02000000000000002f71", "0200000000000000010000000000000061"),
    ("0f02000000000000002f71", "010000000000000002000000000000006263"),
    ("0f02000000000000002f71", "0000000000000000"),
    ("1003000000000000002f6e71", "0000000000000000"),
    (
        "0a020000000000000003000000000000002f6d3105000000000000002f6e6f7065",
        "0100000000000000780000000000000000",
    ),
    # pipelined SET + GET + PING in one write
    (
        "0102000000000000002f70020000000000000070700302000000000000002f700d07000000",
        "0200000000000000707007000000",
    ),
]


def test_replays_torch_libuv_replies(server: ServerThread) -> None:
    c = Raw(server.port)
    for request, reply in LIBUV_SEQUENCE:
        c.send(request)
        expected = bytes.fromhex(reply)
        if expected:
            assert c.recv_exact(len(expected)).hex() == reply, request
    c.ping()
    raw = c.call("11", 8)
    count = struct.unpack("<q", raw)[0]
    keys = []
    for _ in range(count):
        n = struct.unpack("<Q", c.recv_exact(8))[0]
        keys.append(c.recv_exact(n))
    assert sorted(keys) == sorted([b"/n", b"/c", b"/ap", b"/m1", b"/m2", b"/bar", b"/p"])


def test_set_split_in_three_writes(server: ServerThread) -> None:
    c = Raw(server.port)
    frame = bytes.fromhex("0106000000000000002f73706c69740300000000000000737373")
    for part in (frame[:3], frame[3:17], frame[17:]):
        c.send(part)
    assert c.call("0306000000000000002f73706c6974", 11).hex() == "0300000000000000737373"


def test_validate_and_ping_coalesced(server: ServerThread) -> None:
    c = Raw(server.port, validate=False)
    assert c.call("00cef7853c0d09000000", 4).hex() == "09000000"


def test_fragmented_validate_is_accepted(server: ServerThread) -> None:
    # torch's libuv server closes here (an accident); rdzv tolerates fragmentation.
    c = Raw(server.port, validate=False)
    c.send("00ce")
    c.send("f785")
    c.send("3c")
    assert c.call("0d09000000", 4).hex() == "09000000"


@pytest.mark.parametrize(
    "first",
    ["0d01000000", "010b000000000000002f6e6f76616c6964617465010000000000000031", "0078563412"],
    ids=["ping-first", "set-first", "bad-magic"],
)
def test_connection_without_valid_handshake_is_closed(server: ServerThread, first: str) -> None:
    c = Raw(server.port, validate=False)
    c.send(first)
    c.assert_closed()
    other = Raw(server.port)
    assert other.call(wire.encode_keys(Op.CHECK, [b"/novalidate"]), 1) == b"\x01"


def test_wait_is_deferred_until_all_keys_exist(server: ServerThread) -> None:
    waiter, writer = Raw(server.port), Raw(server.port)
    waiter.send(wire.encode_keys(Op.WAIT, [b"/w1", b"/w2"]))
    waiter.ping()  # the WAIT reply is not due yet: the echo comes first
    writer.send(wire.encode_set(b"/w1", b"x"))
    writer.ping()
    waiter.ping()
    writer.send(wire.encode_key_int(Op.ADD, b"/w2", 1))
    assert writer.recv_exact(8) == I64(1)
    assert waiter.recv_exact(1) == b"\x00"


@pytest.mark.parametrize(
    ("write", "reply_len"),
    [
        (wire.encode_set(b"/wk", b"v"), 0),
        (wire.encode_set(b"/wk", b"v", Op.APPEND), 0),
        (wire.encode_multi_set([b"/wk"], [b"v"]), 0),
        (wire.encode_compare_set(b"/wk", b"", b"v"), 9),
        (wire.encode_set(b"/wk", b"v", Op.QUEUE_PUSH), 0),
        (wire.encode_key_int(Op.BARRIER, b"/wk", 1), 1),
    ],
    ids=["set", "append", "multi_set", "compare_set", "queue_push", "barrier"],
)
def test_writes_wake_a_waiter(server: ServerThread, write: bytes, reply_len: int) -> None:
    waiter, writer = Raw(server.port), Raw(server.port)
    waiter.send(wire.encode_keys(Op.WAIT, [b"/wk"]))
    waiter.ping()
    writer.call(write, reply_len)
    assert waiter.recv_exact(1) == b"\x00"


def test_failed_compare_set_and_delete_wake_nobody(server: ServerThread) -> None:
    waiter, writer = Raw(server.port), Raw(server.port)
    waiter.send(wire.encode_keys(Op.WAIT, [b"/wk"]))
    writer.call(wire.encode_compare_set(b"/wk", b"zz", b"v"), 10)
    writer.call(wire.encode_key(Op.DELETE_KEY, b"/wk"), 8)
    waiter.ping()  # nothing arrived before the echo
    assert waiter.call("0c", 1) == b"\x01"


def test_cancel_wait_and_the_late_reply_race(server: ServerThread) -> None:
    c, writer = Raw(server.port), Raw(server.port)
    assert c.call("0c", 1) == b"\x01"  # nothing pending
    c.send(wire.encode_keys(Op.WAIT, [b"/never"]))
    assert c.call("0c", 1) == b"\x01"
    c.send(wire.encode_keys(Op.WAIT, [b"/race"]))
    c.ping()
    writer.send(wire.encode_set(b"/race", b"1"))
    writer.ping()
    # The STOP_WAITING was sent before the cancel arrived: the client reads 00 then 01.
    assert c.call("0c", 2) == b"\x00\x01"
    c.ping()


def test_waiters_of_a_cancelled_wait_are_gone(server: ServerThread) -> None:
    c = Raw(server.port)
    c.send(wire.encode_keys(Op.WAIT, [b"/a", b"/b"]))
    c.ping()
    assert server.call(lambda s: s.engine.num_waiters()) == 1
    c.call("0c", 1)
    assert server.call(lambda s: s.engine.num_waiters()) == 0


def test_queue_push_wakes_exactly_one_waiter(server: ServerThread) -> None:
    first, second, pusher = Raw(server.port), Raw(server.port), Raw(server.port)
    for c in (first, second):
        c.send(wire.encode_keys(Op.WAIT, [b"/qq"]))
        c.ping()
    pusher.send(wire.encode_set(b"/qq", b"1", Op.QUEUE_PUSH))
    pusher.ping()
    assert first.recv_exact(1) == b"\x00"
    second.ping()  # still waiting: the echo, not a STOP_WAITING
    assert second.call("0c", 1) == b"\x01"


def test_barrier_releases_all_arrivals(server: ServerThread) -> None:
    a, b = Raw(server.port), Raw(server.port)
    barrier = wire.encode_key_int(Op.BARRIER, b"/B", 2)
    a.send(barrier)
    a.ping()
    b.send(barrier)
    assert b.recv_exact(1) == b"\x00"
    assert a.recv_exact(1) == b"\x00"
    assert a.call(wire.encode_key(Op.GET, b"/B"), 9).hex() == "010000000000000032"


def test_add_on_a_non_integer_closes_only_that_connection(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    bad, other = Raw(server.port), Raw(server.port)
    bad.send(wire.encode_set(b"/t", b"abc"))
    bad.send(wire.encode_key_int(Op.ADD, b"/t", 1))
    bad.assert_closed()
    assert other.call(wire.encode_key(Op.GET, b"/t"), 11).hex() == "0300000000000000616263"
    eventually(lambda: "not a base-10 integer" in caplog.text, what="the logged reason")
    assert "closing connection from 127.0.0.1:" in caplog.text


def test_strtoll_parsing_of_counters(server: ServerThread) -> None:
    c = Raw(server.port)
    c.send(wire.encode_set(b"/t2", b"12abc") + wire.encode_set(b"/t3", b" 12"))
    assert c.call(wire.encode_key_int(Op.ADD, b"/t2", 1), 8) == I64(13)
    assert c.call(wire.encode_key_int(Op.ADD, b"/t3", 1), 8) == I64(13)


def test_two_waits_on_one_connection_both_get_replies(server: ServerThread) -> None:
    c, writer = Raw(server.port), Raw(server.port)
    c.send(wire.encode_keys(Op.WAIT, [b"/x1"]) + wire.encode_keys(Op.WAIT, [b"/x2"]))
    c.ping()
    writer.send(wire.encode_multi_set([b"/x1", b"/x2"], [b"1", b"2"]))
    assert c.recv_exact(2) == b"\x00\x00"


def test_own_wait_released_by_own_later_set_keeps_reply_order(server: ServerThread) -> None:
    c = Raw(server.port)
    batch = (
        wire.encode_ping(1)
        + wire.encode_keys(Op.WAIT, [b"/self"])
        + wire.encode_set(b"/self", b"v")
        + wire.encode_key(Op.GET, b"/self")
    )
    assert c.call(batch, 4 + 1 + 9).hex() == "01000000" + "00" + "010000000000000076"


@pytest.mark.parametrize("data_dir", [False, True])
def test_a_ping_reply_keeps_its_place_behind_other_replies(
    tmp_path: object, data_dir: bool
) -> None:
    # PING echoes skip the durable server's hold when nothing of theirs is uncommitted, and
    # the in-memory server gathers a batch's replies: neither may reorder them.
    kwargs = {"data_dir": tmp_path} if data_dir else {}
    server = ServerThread("127.0.0.1", 0, **kwargs).start()
    try:
        c = Raw(server.port)
        c.send(wire.encode_set(b"/k", b"v"))
        batch = wire.encode_op(Op.LIST_KEYS) + wire.encode_ping(7)
        expected = wire.reply_key_list([b"/k"]) + wire.reply_ping(7, False)
        assert c.call(batch, len(expected)) == expected
        c.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- extensions
def test_ext_add_reports_errors_and_keeps_the_connection(server: ServerThread) -> None:
    c = Raw(server.port)
    c.negotiate()
    c.send(wire.encode_set(b"/t", b"abc"))
    c.send(wire.encode_key_int(Op.EXT_ADD, b"/t", 1))
    assert c.recv_exact(2) == bytes((wire.EXT_ERROR, wire.ErrorCode.COUNTER))
    n = struct.unpack("<Q", c.recv_exact(8))[0]
    assert b"not a base-10 integer" in c.recv_exact(n)
    assert c.call(wire.encode_key_int(Op.EXT_ADD, b"/ok", 5), 9) == b"\x00" + I64(5)
    c.ping()


def test_ext_barrier_bad_world_size_is_an_error_reply(server: ServerThread) -> None:
    c = Raw(server.port)
    c.negotiate()
    c.send(wire.encode_key_int(Op.EXT_BARRIER, b"/b", 0))
    assert c.recv_exact(2) == bytes((wire.EXT_ERROR, wire.ErrorCode.VALUE))


def test_ext_get_wait_waits_for_a_value_not_a_queue(server: ServerThread) -> None:
    c, writer = Raw(server.port), Raw(server.port)
    c.negotiate()
    writer.send(wire.encode_set(b"/g", b"item", Op.QUEUE_PUSH))
    c.send(wire.encode_key(Op.EXT_GET_WAIT, b"/g"))
    c.ping()  # a queue of that name does not release it
    writer.send(wire.encode_set(b"/g", b"value"))
    assert c.recv_exact(1 + 8 + 5) == b"\x00" + wire.reply_blob(b"value")


def test_ext_queue_pop_wait_pops_atomically(server: ServerThread) -> None:
    a, b, pusher = Raw(server.port), Raw(server.port), Raw(server.port)
    for c in (a, b):
        c.negotiate()
        c.send(wire.encode_key(Op.EXT_QUEUE_POP_WAIT, b"/jobs"))
        c.ping()
    pusher.send(wire.encode_set(b"/jobs", b"j1", Op.QUEUE_PUSH))
    assert a.recv_exact(11) == b"\x00" + wire.reply_blob(b"j1")
    b.ping()
    pusher.send(wire.encode_set(b"/jobs", b"j2", Op.QUEUE_PUSH))
    assert b.recv_exact(11) == b"\x00" + wire.reply_blob(b"j2")
    assert pusher.call(wire.encode_key(Op.QUEUE_LEN, b"/jobs"), 8) == I64(0)


def test_ext_multi_get_wait(server: ServerThread) -> None:
    c, writer = Raw(server.port), Raw(server.port)
    c.negotiate()
    writer.send(wire.encode_set(b"/m1", b"1"))
    writer.ping()
    c.send(wire.encode_keys(Op.EXT_MULTI_GET_WAIT, [b"/m1", b"/m2"]))
    c.ping()
    writer.send(wire.encode_set(b"/m2", b"22"))
    assert c.recv_exact(1 + 9 + 10) == b"\x00" + wire.reply_blobs([b"1", b"22"])


def test_ext_list_and_count_keys_by_prefix(server: ServerThread) -> None:
    c = Raw(server.port)
    c.negotiate()
    c.send(wire.encode_multi_set([b"/a/1", b"/a/2", b"/b", b"init/"], [b"x", b"yy", b"", b"1"]))
    assert c.call(wire.encode_key(Op.EXT_NUM_KEYS, b"/"), 9) == b"\x00" + I64(3)
    assert c.call(wire.encode_key(Op.EXT_NUM_KEYS, b""), 9) == b"\x00" + I64(4)
    expected = b"\x00" + wire.reply_key_sizes([(b"/a/1", 1), (b"/a/2", 2)])
    assert c.call(wire.encode_key(Op.EXT_LIST_KEYS, b"/a/"), len(expected)) == expected


def test_ephemeral_key_is_deleted_when_its_connection_closes(server: ServerThread) -> None:
    owner, other = Raw(server.port), Raw(server.port)
    owner.negotiate()
    owner.call(wire.encode_set(b"/alive/1", b"x", Op.EXT_SET_EPHEMERAL), 1)
    owner.call(wire.encode_set(b"/alive/2", b"x", Op.EXT_SET_EPHEMERAL), 1)
    other.send(wire.encode_set(b"/alive/2", b"taken over"))  # now an ordinary key
    other.ping()
    owner.close()
    check = wire.encode_keys(Op.CHECK, [b"/alive/1"])
    eventually(lambda: other.call(check, 1) == b"\x01", what="/alive/1 deleted")
    assert other.call(wire.encode_key(Op.GET, b"/alive/2"), 18)[8:] == b"taken over"


def test_lease_expires_unless_renewed(server: ServerThread) -> None:
    c = Raw(server.port)
    c.negotiate()
    c.call(wire.encode_set_lease(b"/lease", b"1", 60_000), 1)
    c.call(wire.encode_set_lease(b"/lease", b"2", 100), 1)  # renewal replaces the TTL
    check = wire.encode_keys(Op.CHECK, [b"/lease"])
    eventually(lambda: c.call(check, 1) == b"\x01", what="lease expired")
    c.call(wire.encode_set_lease(b"/kept", b"1", 100), 1)
    c.send(wire.encode_set(b"/kept", b"plain"))  # a plain write cancels the lease
    c.ping()
    assert server.call(lambda s: s.engine.bound_keys()) == []
    assert c.call(wire.encode_keys(Op.CHECK, [b"/kept"]), 1) == b"\x00"


def test_ext_lease_needs_positive_ttl(server: ServerThread) -> None:
    c = Raw(server.port)
    c.negotiate()
    c.send(wire.encode_set_lease(b"/l", b"1", 0))
    assert c.recv_exact(2) == bytes((wire.EXT_ERROR, wire.ErrorCode.VALUE))


def test_extensions_can_be_disabled() -> None:
    thread = ServerThread("127.0.0.1", 0, allow_extensions=False).start()
    try:
        c = Raw(thread.port)
        assert c.call(wire.encode_ping(wire.RDZV_PING_NONCE), 4) == struct.pack(
            "<I", wire.RDZV_PING_NONCE
        )
        c.send(wire.encode_key(Op.EXT_GET_WAIT, b"/k"))
        c.assert_closed()
    finally:
        thread.stop()
