"""Corrupt and hostile values in the rendezvous state: RendezvousStateError, nothing executed."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdzv.errors import RendezvousStateError
from rdzv.rendezvous.liveness import HeartbeatLiveness, Status
from rdzv.rendezvous.state import (
    MAX_RECORD_BYTES,
    MasterRecord,
    NodeDesc,
    RankRecord,
    SizeRecord,
    assign_ranks,
    choose_members,
)
from tests.rendezvous.conftest import Backend, Join, eventually, make_handler


class _Touch:
    """Unpickling this creates a file: what an attacker would store instead of a pickle of
    torch's rendezvous state."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.fixture
def payload(tmp_path: Path) -> tuple[bytes, Path]:
    target = tmp_path / "pwned"
    raw = pickle.dumps(_Touch(target))
    pickle.loads(raw)  # the payload works when unpickled ...
    assert target.exists()
    target.unlink()  # ... and the rendezvous must never do that
    return raw, target


HOSTILE = {
    "pickle": None,  # filled from the fixture
    "not json": b"\x00\xff garbage",
    "wrong type": b"[1, 2, 3]",
    "huge": b"[" + b"1," * (MAX_RECORD_BYTES // 2) + b"1]",
    "nan": b'{"rank": NaN, "world_size": 2, "master": null}',
}


def _value(kind: str, payload: tuple[bytes, Path]) -> bytes:
    return payload[0] if kind == "pickle" else HOSTILE[kind]  # type: ignore[return-value]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_rank_record(backend: Backend, payload: tuple[bytes, Path], kind: str) -> None:
    h = make_handler(backend.connect(), 2, 2)
    join = Join(h)
    eventually(lambda: backend.admin.check(["rdzv/job/r0/hb/1"]), what="the node's slot")
    backend.admin.set("rdzv/job/r0/rank/1", _value(kind, payload))
    _, exc = join.outcome()
    assert isinstance(exc, RendezvousStateError), exc
    assert "rdzv/job/r0/rank/1" in str(exc)
    assert not payload[1].exists()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_size_record(backend: Backend, payload: tuple[bytes, Path], kind: str) -> None:
    backend.admin.set("rdzv/job/r0/size", _value(kind, payload))
    with pytest.raises(RendezvousStateError, match="rdzv/job/r0/size"):
        make_handler(backend.connect(), 1, 1).next_rendezvous()
    assert not payload[1].exists()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_node_descriptor(backend: Backend, payload: tuple[bytes, Path], kind: str) -> None:
    first = Join(make_handler(backend.connect(), 2, 2, index=0))
    eventually(lambda: backend.admin.check(["rdzv/job/r0/hb/1"]), what="the first slot")
    backend.admin.set("rdzv/job/r0/node/1", _value(kind, payload))
    with pytest.raises(RendezvousStateError, match="rdzv/job/r0/node/1"):
        make_handler(backend.connect(), 2, 2, index=1).next_rendezvous()
    assert not payload[1].exists()
    first.handler.set_closed()


@pytest.mark.parametrize("kind", ["pickle", "not json", "wrong type"])
def test_hostile_heartbeat(backend: Backend, payload: tuple[bytes, Path], kind: str) -> None:
    hs = [make_handler(backend.connect(), 3, 3, index=i) for i in range(2)]
    joins = [Join(h) for h in hs]
    eventually(lambda: backend.admin.check(["rdzv/job/r0/hb/2"]), what="the second slot")
    backend.admin.set("rdzv/job/r0/hb/2", _value(kind, payload))
    # The node in slot 1 watches slot 2 and finds the value.
    eventually(lambda: any(j.done() for j in joins), what="a node to fail")
    (failed,) = [j for j in joins if j.done()]
    assert failed.handler._pending is not None and failed.handler._pending.slot == 1
    _, exc = failed.outcome()
    assert isinstance(exc, RendezvousStateError), exc
    assert "rdzv/job/r0/hb/2" in str(exc)
    assert not payload[1].exists()
    hs[0].set_closed()


def test_hostile_round_counter(backend: Backend, payload: tuple[bytes, Path]) -> None:
    backend.admin.set("rdzv/job/round", payload[0])
    with pytest.raises(RendezvousStateError, match="not an integer"):
        make_handler(backend.connect(), 1, 1).next_rendezvous()
    assert not payload[1].exists()


# ---------------------------------------------------------------------------- codec
def test_records_round_trip() -> None:
    desc = NodeDesc("host-1.example", 42, 3, "abc123", 7, 2, ("10.0.0.1", 29400))
    assert NodeDesc.decode("k", desc.encode()) == desc
    assert repr(desc) == "host-1.example_42_3"
    plain = NodeDesc("h", 1, 0, "n")
    assert NodeDesc.decode("k", plain.encode()) == plain
    size = SizeRecord(5, 3, (2,), (4,), "closer")
    assert SizeRecord.decode("k", size.encode(), max_nodes=3) == size
    assert size.members() == [1, 3, 5]
    assert SizeRecord.decode("k", SizeRecord(closed=True).encode(), 3).closed
    rank = RankRecord(1, 3, ("::1", 5))
    assert RankRecord.decode("k", rank.encode(), 3) == rank
    assert RankRecord.decode("k", RankRecord(late=True).encode(), 3).late
    assert RankRecord.decode("k", RankRecord(closed=True).encode(), 3).closed
    assert MasterRecord.decode("k", MasterRecord("a.b", 1).encode()) == MasterRecord("a.b", 1)


@pytest.mark.parametrize(
    "doc",
    [
        {"rank": 3, "world_size": 3, "master": None},  # rank out of range
        {"rank": 0, "world_size": 4, "master": None},  # world above max_nodes (3)
        {"rank": 0, "world_size": 0, "master": None},
        {"rank": True, "world_size": 2, "master": None},
        {"rank": 0, "world_size": 2, "master": ["h", 70000]},
        {"rank": 0, "world_size": 2, "master": ["bad host name!", 1]},
        {"rank": 0, "world_size": 2, "master": None, "extra": 1},
        {"rank": 0, "world_size": 2},
        {"late": True, "rank": 0},
    ],
)
def test_rank_record_validation(doc: dict[str, Any]) -> None:
    with pytest.raises(RendezvousStateError, match="corrupt or hostile"):
        RankRecord.decode("k", json.dumps(doc).encode(), max_nodes=3)


@pytest.mark.parametrize(
    "doc",
    [
        {"joined": 0, "world_size": 1, "excluded": [], "late": [], "closer": ""},
        {"joined": 2, "world_size": 3, "excluded": [], "late": [], "closer": ""},
        {"joined": 3, "world_size": 3, "excluded": [1], "late": [], "closer": ""},
        {"joined": 3, "world_size": 2, "excluded": [4], "late": [], "closer": ""},
        {"joined": 3, "world_size": 1, "excluded": [1, 1], "late": [], "closer": ""},
        {"joined": 3, "world_size": 1, "excluded": [1], "late": [1], "closer": ""},
        {"joined": 3, "world_size": 1, "excluded": "1", "late": [], "closer": ""},
        {"joined": 3, "world_size": 3, "excluded": [], "late": [], "closer": 5},
        {"joined": 3, "world_size": 3, "excluded": [], "closer": ""},
        {"closed": True, "joined": 1},
    ],
)
def test_size_record_validation(doc: dict[str, Any]) -> None:
    with pytest.raises(RendezvousStateError, match="corrupt or hostile"):
        SizeRecord.decode("k", json.dumps(doc).encode(), max_nodes=3)


def _decode_all(raw: bytes) -> None:
    """Every decoder either returns a record or raises RendezvousStateError."""
    for decode in (
        lambda: NodeDesc.decode("k", raw),
        lambda: SizeRecord.decode("k", raw, 8),
        lambda: RankRecord.decode("k", raw, 8),
        lambda: MasterRecord.decode("k", raw),
    ):
        with contextlib.suppress(RendezvousStateError):
            decode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.from_regex(rb"\{.{0,80}\}", fullmatch=True))
def test_any_bytes_decode_or_raise_state_error(raw: bytes) -> None:
    _decode_all(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "rank",
                    "world_size",
                    "master",
                    "addr",
                    "pid",
                    "local_id",
                    "nonce",
                    "prev",
                    "joined",
                    "excluded",
                    "closer",
                    "late",
                    "closed",
                    "port",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_decodes_or_raises_state_error(doc: Any) -> None:
    _decode_all(json.dumps(doc).encode())


def test_members_of_the_previous_round_keep_their_places() -> None:
    spare = NodeDesc("a", 1, 0, "s")  # arrived first
    old = [NodeDesc(f"m{i}", 1, 0, "x", prev_round=6, prev_rank=i) for i in range(3)]
    live = [(1, spare), (2, old[0]), (3, old[1]), (4, old[2])]
    assert choose_members(7, live, 3) == [2, 3, 4]
    assert choose_members(7, live, 4) == [1, 2, 3, 4]
    assert choose_members(8, live, 2) == [1, 2]  # stale history counts for nothing


def test_rank_rule_keeps_survivors_first() -> None:
    old1 = NodeDesc("z-host", 1, 0, "a", prev_round=4, prev_rank=1)
    old0 = NodeDesc("y-host", 1, 0, "b", prev_round=4, prev_rank=0)
    stale = NodeDesc("a-host", 1, 0, "c", prev_round=2, prev_rank=0)
    new = NodeDesc("b-host", 1, 0, "d")
    ordered = assign_ranks(5, [(1, new), (2, old1), (3, stale), (4, old0)])
    assert [slot for slot, _ in ordered] == [4, 2, 3, 1]


def test_heartbeat_liveness_declares_once(backend: Backend) -> None:
    store = backend.admin
    live = HeartbeatLiveness(0.05, 2)
    store.multi_set(["k"], [live.announce("k")[0][1]])
    a, b = live.observer("a"), live.observer("b")
    assert a.observe(store, ["k"]) == {"k": Status.ALIVE}
    assert b.observe(store, ["k"]) == {"k": Status.ALIVE}
    assert live.keep_alive(store, "k")
    deadline = a.next_deadline()
    assert deadline is not None
    eventually(lambda: a.observe(store, ["k"])["k"] is not Status.ALIVE, what="expiry")
    assert store.get("k") == b"dead:a"
    assert b.observe(store, ["k"]) == {"k": Status.GONE}
    assert not live.keep_alive(store, "k")
    assert not live.retire(store, "k")
    # missing keys are waited for, then declared
    assert live.snapshot(store, ["missing"], "c") == [Status.DECLARED]
    assert store.get("missing") == b"dead:c"
