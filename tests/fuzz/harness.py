"""Fuzzing harness shared by the bounded tests (tests/fuzz/test_fuzz.py) and the long run
(``python -m tests.fuzz.run --examples N``): byte streams built from valid requests and
replies, mutated (bit flips, insertions, truncation, random garbage) and split anywhere.

Properties checked:

* codec: ``RequestParser.receive`` and the client's ``ReplyBuffer`` + reply decoders raise
  nothing but the documented :class:`~rdzv.wire.NeedData` / :class:`~rdzv.errors.ProtocolError`
  (a decoded extension error is returned, not raised), and the bytes they hold stay within
  the stream they were fed;
* live server: after any stream on one connection, the server still answers another client
  at once, has reported no unexpected exception on its loop, and holds no waiter,
  connection or bound key of the fuzzing connection once it is closed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from typing import Any

from hypothesis import strategies as st

from rdzv import wire
from rdzv.errors import ProtocolError
from rdzv.server import ServerThread
from rdzv.wire import Op

_keys = st.binary(min_size=0, max_size=12).map(lambda k: b"/" + k)
_values = st.binary(max_size=40)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _requests() -> st.SearchStrategy[bytes]:
    key_ops = [Op.GET, Op.DELETE_KEY, Op.QUEUE_POP, Op.QUEUE_LEN, Op.EXT_GET_WAIT,
               Op.EXT_QUEUE_POP_WAIT, Op.EXT_LIST_KEYS, Op.EXT_NUM_KEYS]  # fmt: skip
    list_ops = [Op.CHECK, Op.WAIT, Op.MULTI_GET, Op.EXT_MULTI_GET_WAIT]
    set_ops = [Op.SET, Op.APPEND, Op.QUEUE_PUSH, Op.EXT_SET_EPHEMERAL]
    return st.one_of(
        st.builds(wire.encode_set, _keys, _values, st.sampled_from(set_ops)),
        st.builds(wire.encode_key, st.sampled_from(key_ops), _keys),
        st.builds(wire.encode_keys, st.sampled_from(list_ops), st.lists(_keys, max_size=4)),
        st.builds(wire.encode_key_int, st.sampled_from([Op.ADD, Op.EXT_ADD]), _keys, _ints),
        st.builds(
            wire.encode_key_int,
            st.sampled_from([Op.BARRIER, Op.EXT_BARRIER]),
            _keys,
            st.integers(-2, 3),
        ),
        st.builds(wire.encode_compare_set, _keys, _values, _values),
        st.builds(
            lambda k, v: wire.encode_multi_set(k, v[: len(k)] + [b""] * (len(k) - len(v))),
            st.lists(_keys, max_size=4),
            st.lists(_values, max_size=4),
        ),
        st.builds(wire.encode_set_lease, _keys, _values, st.integers(-5, 50)),
        st.sampled_from([Op.GETNUMKEYS, Op.CANCEL_WAIT, Op.LIST_KEYS]).map(wire.encode_op),
        st.sampled_from([wire.RDZV_PING_NONCE, 7]).map(wire.encode_ping),
        st.binary(min_size=1, max_size=16),  # garbage
    )


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, byte in edits:
        if not out and kind != 1:
            continue
        at = where % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] ^= 1 << (byte % 8)  # bit flip
        elif kind == 1:
            out[at:at] = bytes((byte,))  # insertion
        elif kind == 2:
            del out[at : at + 1 + byte % 8]  # deletion
        elif kind == 3 and at < len(out):
            out[at] = byte  # overwrite (e.g. a length byte)
    return bytes(out)


_edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)), max_size=6
)


@st.composite
def request_streams(draw: Any) -> tuple[bytes, list[int]]:
    """(stream, split points): VALIDATE (usually), requests, then mutations."""
    parts = [wire.encode_validate()] if draw(st.integers(0, 9)) else []
    parts += draw(st.lists(_requests(), max_size=12))
    stream = _mutate(b"".join(parts), draw(_edits))
    cuts = sorted(draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=8)))
    return stream, cuts


def chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


_replies = st.one_of(
    st.builds(wire.reply_blob, _values),
    st.builds(wire.reply_i64, _ints),
    st.builds(wire.reply_blobs, st.lists(_values, max_size=4)),
    st.builds(wire.reply_key_list, st.lists(_keys, max_size=4)),
    st.builds(wire.reply_queue_pop, st.none() | _values, st.integers(0, 3)),
    st.builds(wire.reply_ext_error, st.sampled_from(list(wire.ErrorCode)), st.text(max_size=20)),
    st.builds(wire.reply_key_sizes, st.lists(st.tuples(_keys, st.integers(0, 99)), max_size=3)),
    st.binary(min_size=1, max_size=16),
)

DECODERS: list[wire.Decoder[Any]] = [
    wire.read_u8, wire.read_u32, wire.read_i64, wire.read_blob, wire.read_blobs(3),
    wire.read_key_list, wire.read_key_sizes, wire.read_queue_pop, wire.read_ext_error,
]  # fmt: skip


@st.composite
def reply_streams(draw: Any) -> tuple[bytes, list[int], list[int]]:
    """(stream, split points, decoder indexes to apply in order)."""
    stream = _mutate(b"".join(draw(st.lists(_replies, max_size=8))), draw(_edits))
    cuts = sorted(draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=6)))
    order = draw(st.lists(st.integers(0, len(DECODERS) - 1), min_size=1, max_size=10))
    return stream, cuts, order


# --------------------------------------------------------------------------- properties


def check_request_parser(stream: bytes, cuts: list[int], extensions: bool = True) -> None:
    parser = wire.RequestParser(allow_extensions=extensions)
    fed = 0
    for piece in chunks(stream, cuts):
        fed += len(piece)
        try:
            parser.receive(piece)
        except ProtocolError:
            assert parser.error is not None  # raised again after an error: documented
            return
        if parser.error is not None:
            return
        assert parser.buffered <= fed


def check_reply_decoders(stream: bytes, cuts: list[int], order: list[int]) -> None:
    buf = wire.ReplyBuffer()
    pieces = chunks(stream, cuts)
    fed = 0
    for index in order:
        decoder = DECODERS[index]
        while True:
            try:
                buf.read(decoder)
                break
            except wire.NeedData as short:
                assert short.need > len(buf)
                if not pieces:
                    return
                piece = pieces.pop(0)
                fed += len(piece)
                buf.feed(piece)
            except ProtocolError:
                return
        assert len(buf) <= fed


class LiveServer:
    """A server thread whose loop records every exception it reports."""

    def __init__(self) -> None:
        self.thread = ServerThread("127.0.0.1", 0).start()
        self.port = self.thread.port
        self.errors: list[dict[str, Any]] = []

        def install(_: Any) -> None:
            asyncio.get_running_loop().set_exception_handler(
                lambda loop, context: self.errors.append(context)
            )

        self.thread.call(install)
        self.probe = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.probe.sendall(wire.encode_validate())

    def feed(self, stream: bytes, cuts: list[int], check: bool = True) -> None:
        """Send ``stream`` in pieces on a new connection, read what comes back, close;
        then (``check``) verify the server is intact."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for piece in chunks(stream, cuts):
                try:
                    sock.sendall(piece)
                except OSError:
                    break  # the server closed this connection: a protocol violation
            sock.settimeout(0.0)
            try:
                while sock.recv(65536):
                    pass
            except (BlockingIOError, OSError):
                pass
        if check:
            self.check()

    def check(self) -> None:
        # Another client is served at once (a PING round trip on the long-lived probe).
        self.probe.sendall(wire.encode_ping(0x1234))
        start = time.monotonic()
        assert self.probe.recv(4) == wire.reply_ping(0x1234, False)
        assert time.monotonic() - start < 5
        assert not self.errors, self.errors
        # Nothing of the closed connection is left (waiters, ephemeral keys, connection).
        deadline = time.monotonic() + 5
        while True:
            state = self.thread.call(
                lambda s: (s.num_connections, s.engine.num_waiters(), len(s.engine.bound_keys()))
            )
            if state[0] == 1 and state[1] == 0:
                break
            assert time.monotonic() < deadline, f"leaked: {state}"
            time.sleep(0.001)

    def reset(self) -> None:
        """Empty the store (keeps memory bounded over a long run)."""
        self.thread.call(lambda s: [s.engine.delete_key(k) for k in s.engine.list_keys()])

    def close(self) -> None:
        self.probe.close()
        self.thread.stop()


# --------------------------------------------------------------------------- fast generator
# Hypothesis spends ~10 ms drawing one stream; the long run uses this plain generator (same
# building blocks, seeded, ~50 µs per stream) for its 100,000s of inputs.


def _random_request(rng: random.Random) -> bytes:
    key = b"/" + rng.randbytes(rng.randint(0, 12))
    value = rng.randbytes(rng.randint(0, 40))
    kind = rng.randrange(10)
    if kind == 0:
        op = rng.choice([Op.SET, Op.APPEND, Op.QUEUE_PUSH, Op.EXT_SET_EPHEMERAL])
        return wire.encode_set(key, value, op)
    if kind == 1:
        ops = [Op.GET, Op.DELETE_KEY, Op.QUEUE_POP, Op.QUEUE_LEN, Op.EXT_GET_WAIT,
               Op.EXT_QUEUE_POP_WAIT, Op.EXT_LIST_KEYS, Op.EXT_NUM_KEYS]  # fmt: skip
        return wire.encode_key(rng.choice(ops), key)
    if kind == 2:
        op = rng.choice([Op.CHECK, Op.WAIT, Op.MULTI_GET, Op.EXT_MULTI_GET_WAIT])
        return wire.encode_keys(op, [key] * rng.randint(0, 4))
    if kind == 3:
        amount = rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randint(-99, 99)])
        return wire.encode_key_int(rng.choice([Op.ADD, Op.EXT_ADD]), key, amount)
    if kind == 4:
        op = rng.choice([Op.BARRIER, Op.EXT_BARRIER])
        return wire.encode_key_int(op, key, rng.randint(-2, 3))
    if kind == 5:
        return wire.encode_compare_set(key, value, rng.randbytes(rng.randint(0, 8)))
    if kind == 6:
        n = rng.randint(0, 4)
        return wire.encode_multi_set([key] * n, [value] * n)
    if kind == 7:
        return wire.encode_set_lease(key, value, rng.randint(-5, 50))
    if kind == 8:
        op = rng.choice([Op.GETNUMKEYS, Op.CANCEL_WAIT, Op.LIST_KEYS])
        return rng.choice([wire.encode_op(op), wire.encode_ping(wire.RDZV_PING_NONCE)])
    return rng.randbytes(rng.randint(1, 16))


def random_request_stream(rng: random.Random) -> tuple[bytes, list[int]]:
    """The plain-random counterpart of :func:`request_streams`."""
    parts = [wire.encode_validate()] if rng.randrange(10) else []
    parts += [_random_request(rng) for _ in range(rng.randint(0, 12))]
    edits = [
        (rng.randrange(4), rng.randrange(2**16), rng.randrange(256))
        for _ in range(rng.randint(0, 6))
    ]
    stream = _mutate(b"".join(parts), edits)
    cuts = sorted(rng.randint(0, max(len(stream), 1)) for _ in range(rng.randint(0, 8)))
    return stream, cuts
