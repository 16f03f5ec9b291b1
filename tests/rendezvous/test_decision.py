"""The decision core of the dynamic rendezvous, without a store, a socket, a thread or a clock.

Each node is a :class:`RendezvousCore` program; :class:`World` answers its operations from a
dict with torch's store semantics and a virtual clock, and runs several nodes in turns (a
node blocked on a missing key waits until another node writes it, or until the clock reaches
its timeout). Every outcome is therefore deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from rdzv.errors import (
    RendezvousClosedError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StoreTimeoutError,
)
from rdzv.rendezvous.decision import (
    LOOKOUT_BLOCK,
    Bootstrap,
    CleanUp,
    Completed,
    Record,
    RendezvousCore,
    RendezvousSettings,
    RendezvousTimeout,
    Track,
)
from rdzv.rendezvous.liveness import HeartbeatLiveness
from rdzv.rendezvous.ops import (
    Add,
    Check,
    CompareSet,
    DeleteKey,
    Effect,
    Get,
    MultiGet,
    MultiSet,
    Now,
    Op,
    Program,
    Set,
    Wait,
)
from rdzv.rendezvous.state import SEAL, RunKeys, SizeRecord

INTERVAL = 1.0
ATTEMPTS = 2
EXPIRY = INTERVAL * ATTEMPTS


def settings(min_nodes: int, max_nodes: int, join: float = 60.0, last_call: float = 5.0) -> Any:
    return RendezvousSettings(
        "job",
        min_nodes,
        max_nodes,
        RendezvousTimeout(join=join, last_call=last_call),
        timedelta(seconds=INTERVAL),
        ATTEMPTS,
    )


def core(index: int, s: RendezvousSettings) -> RendezvousCore:
    return RendezvousCore(
        s,
        RunKeys("rdzv/job/"),
        HeartbeatLiveness(INTERVAL, ATTEMPTS),
        addr=f"10.0.0.{index + 1}",
        pid=100,
        local_id=index,
        nonce=f"n{index}",
    )


@dataclass
class Node:
    program: Program[Any]
    #: What to send next (value), or throw (error).
    value: Any = None
    error: Exception | None = None
    #: The operation the node is blocked on, with the clock time it gives up.
    blocked: Op | None = None
    until: float = 0.0
    done: bool = False
    result: Any = None
    raised: Exception | None = None
    effects: list[Effect] = field(default_factory=list)


class World:
    """A dict with torch's store semantics, a virtual clock, and nodes taking turns."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.clock = 1000.0
        self.ops: list[Op] = []
        #: Store operations per node index, and the operations themselves.
        self.by_node: dict[int, int] = {}
        self.trace: dict[int, list[Op]] = {}
        self.beating: dict[int, str | None] = {}

    # ---- the store, as torch defines it
    def perform(self, op: Op) -> Any:
        self.ops.append(op)
        d = self.data
        if isinstance(op, Add):
            value = int(d.get(op.key, b"0")) + op.amount
            d[op.key] = str(value).encode()
            return value
        if isinstance(op, CompareSet):
            current = d.get(op.key)
            if current is None:
                if op.expected == b"":
                    d[op.key] = op.desired
                    return op.desired
                return op.expected
            if current == op.expected:
                d[op.key] = op.desired
                return op.desired
            return current
        if isinstance(op, Check):
            return all(k in d for k in op.keys)
        if isinstance(op, MultiGet):
            return [d[k] for k in op.keys]
        if isinstance(op, MultiSet):
            d.update(zip(op.keys, op.values, strict=True))
            return None
        if isinstance(op, Set):
            d[op.key] = op.value
            return None
        if isinstance(op, DeleteKey):
            return d.pop(op.key, None) is not None
        if isinstance(op, Get):
            return d[op.key]
        if isinstance(op, Wait):
            return None
        raise AssertionError(f"unexpected operation {op!r}")

    @staticmethod
    def waits_on(op: Op) -> list[str] | None:
        if isinstance(op, Get):
            return [op.key]
        if isinstance(op, (Wait, MultiGet)):
            return op.keys
        return None

    # ---- running nodes
    def step(self, node: Node, index: int) -> bool:
        """Advance ``node`` until it blocks or ends; True if it did anything."""
        progressed = False
        while not node.done:
            if node.blocked is not None:
                keys = self.waits_on(node.blocked)
                assert keys is not None
                if not all(k in self.data for k in keys):
                    return progressed
                self.trace.setdefault(index, []).append(node.blocked)
                node.value, node.blocked = self.perform(node.blocked), None
                self.by_node[index] = self.by_node.get(index, 0) + 1
            try:
                if node.error is not None:
                    error, node.error = node.error, None
                    op = node.program.throw(error)
                else:
                    op = node.program.send(node.value)
            except StopIteration as stop:
                node.done, node.result = True, stop.value
                return True
            except Exception as exc:
                node.done, node.raised = True, exc
                return True
            progressed = True
            node.value = None
            if isinstance(op, Now):
                node.value = self.clock
            elif isinstance(op, Effect):
                node.effects.append(op)
                if isinstance(op, Track):
                    self.beating[index] = op.key
                elif isinstance(op, Bootstrap):
                    node.value = ("boot", 1)
            elif (keys := self.waits_on(op)) is not None and not all(k in self.data for k in keys):
                timeout = op.timeout if isinstance(op, (Get, Wait, MultiGet)) else None
                node.blocked = op
                node.until = self.clock + (3600.0 if timeout is None else timeout)
            else:
                self.trace.setdefault(index, []).append(op)
                node.value = self.perform(op)
                self.by_node[index] = self.by_node.get(index, 0) + 1
        return progressed

    def beat(self, dead: set[int]) -> None:
        """Every live node's keep-alive (what the executor's timer does)."""
        for index, key in self.beating.items():
            if key is not None and index not in dead and key in self.data:
                value = self.data[key]
                if value.isdigit():
                    self.data[key] = str(int(value) + 1).encode()

    def run(
        self, nodes: list[Node], dead: frozenset[int] = frozenset(), horizon: float = 600.0
    ) -> None:
        """Run ``nodes`` until all are done (nodes in ``dead`` stop at once); the clock jumps
        to the earliest timeout when everyone is blocked, beating every INTERVAL."""
        end = self.clock + horizon
        next_beat = self.clock + INTERVAL
        while not all(n.done or i in dead for i, n in enumerate(nodes)):
            assert self.clock < end, "the nodes did not finish"
            if any(self.step(n, i) for i, n in enumerate(nodes) if i not in dead and not n.done):
                continue
            waiting = [n for i, n in enumerate(nodes) if i not in dead and not n.done]
            first = min(n.until for n in waiting)
            if next_beat <= first:
                self.clock = next_beat
                next_beat += INTERVAL
                self.beat(dead)
                continue
            self.clock = first
            for n in waiting:
                if n.until <= self.clock and n.blocked is not None:
                    keys = self.waits_on(n.blocked)
                    n.blocked, n.error = None, StoreTimeoutError(f"timeout waiting for {keys}")


def join(
    world: World, cores: list[RendezvousCore], dead: frozenset[int] = frozenset()
) -> list[Node]:
    nodes = [Node(c.next_rendezvous(("boot", 1) if i == 0 else None)) for i, c in enumerate(cores)]
    world.run(nodes, dead)
    return nodes


def test_a_full_round_completes_with_distinct_ranks_and_constant_ops_per_node() -> None:
    s = settings(4, 4)
    world = World()
    cores = [core(i, s) for i in range(4)]
    nodes = join(world, cores)
    assert all(n.raised is None for n in nodes), [n.raised for n in nodes]
    results: list[Completed] = [n.result for n in nodes]
    assert sorted(r.rank for r in results) == [0, 1, 2, 3]
    assert {r.world_size for r in results} == {4}
    # Ranks follow torch's order (sorted by address on a first round): 10.0.0.1 is rank 0.
    assert results[0].rank == 0
    assert world.data["rdzv/job/round"] == b"1"
    assert int(world.data["rdzv/job/r0/joined"]) == SEAL + 4
    # Each node's heartbeat key was tracked, and the round is O(1) store operations per node.
    assert all(any(isinstance(e, Track) and e.key for e in n.effects) for n in nodes)
    assert len(world.ops) <= 4 * 4 + 12


def test_a_late_node_joins_the_next_round() -> None:
    s = settings(2, 2)
    world = World()
    cores = [core(i, s) for i in range(3)]
    first = join(world, cores[:2])
    assert sorted(n.result.rank for n in first) == [0, 1]
    # The third node arrives after round 0 closed: it takes a slot of round 1 and waits.
    late = Node(cores[2].next_rendezvous(None))
    assert world.step(late, 2)
    assert not late.done and isinstance(late.blocked, Get)
    assert late.blocked.key.startswith("rdzv/job/r1/")
    assert world.data["rdzv/job/r1/joined"] == b"1"


def test_join_timeout_leaves_the_round_and_names_the_counts() -> None:
    s = settings(2, 3, join=10.0)
    world = World()
    (node,) = join(world, [core(0, s)])
    assert isinstance(node.raised, RendezvousTimeoutError)
    assert "(0 node(s) waiting" in str(node.raised)  # it left: nobody is waiting
    assert "min_nodes=2" in str(node.raised)
    assert world.data["rdzv/job/r0/hb/1"] == b"left"
    assert world.data["rdzv/job/r0/ngone"] == b"1"
    assert world.clock >= 1000.0 + 10.0


def test_last_call_closes_with_min_nodes_after_the_window() -> None:
    s = settings(2, 4, last_call=3.0)
    world = World()
    nodes = join(world, [core(i, s) for i in range(2)])
    assert sorted(n.result.rank for n in nodes) == [0, 1]
    assert all(n.result.world_size == 2 for n in nodes)
    assert world.clock >= 1000.0 + 3.0  # not before the last call ended


def test_a_dead_node_is_declared_once_and_excluded() -> None:
    # max 4: the round completes when the last call ends; by then the ghost (slot 1: it
    # took its slot, wrote its heartbeat and died) has missed its heartbeats.
    s = settings(2, 4, last_call=3 * EXPIRY)
    world = World()
    cores = [core(i, s) for i in range(3)]
    ghost = Node(cores[1].next_rendezvous(None))
    world.step(ghost, 1)
    assert world.data["rdzv/job/r0/hb/1"] == b"0"
    nodes = [Node(cores[0].next_rendezvous(("boot", 1))), ghost]
    nodes.append(Node(cores[2].next_rendezvous(None)))
    world.run(nodes, dead=frozenset({1}))
    live = [nodes[0], nodes[2]]
    assert all(n.raised is None for n in live), [n.raised for n in live]
    assert sorted(n.result.rank for n in live) == [0, 1]
    assert {n.result.world_size for n in live} == {2}
    assert world.data["rdzv/job/r0/hb/1"].startswith(b"dead:")
    records = [e for n in nodes for e in n.effects if isinstance(e, Record)]
    assert len(records) == 1 and "slot 1 of round 0" in records[0].message
    size = SizeRecord.decode("size", world.data["rdzv/job/r0/size"], 4)
    assert size.world_size == 2 and 1 in size.excluded
    assert world.data["rdzv/job/r0/ngone"] == b"1"


def test_closed_rendezvous_wakes_the_waiting_node() -> None:
    s = settings(2, 2)
    world = World()
    waiter = Node(core(0, s).next_rendezvous(None))
    world.step(waiter, 0)
    assert isinstance(waiter.blocked, Get)
    closer = Node(core(1, s).close())
    world.run([waiter, closer])
    assert closer.raised is None
    assert isinstance(waiter.raised, RendezvousClosedError)
    assert world.data["rdzv/job/r0/hb/1"] == b"left"


def test_hostile_rank_record_is_rejected() -> None:
    s = settings(1, 2, last_call=100.0)
    world = World()
    world.data["rdzv/job/r0/rank/1"] = b'{"rank": -5}'
    node = Node(core(0, s).next_rendezvous(None))
    world.run([node])
    assert isinstance(node.raised, RendezvousStateError)
    assert "rdzv/job/r0/rank/1" in str(node.raised)


def test_rank_zero_without_an_offered_endpoint_asks_for_a_bootstrap() -> None:
    s = settings(2, 2)
    world = World()
    cores = [core(i, s) for i in range(2)]
    nodes = [Node(c.next_rendezvous(None)) for c in cores]
    world.run(nodes)
    rank0 = next(n for n in nodes if n.result.rank == 0)
    other = next(n for n in nodes if n.result.rank == 1)
    assert any(isinstance(e, Bootstrap) for e in rank0.effects)
    assert not any(isinstance(e, Bootstrap) for e in other.effects)
    assert rank0.result.master == other.result.master == ("boot", 1)
    assert world.data["rdzv/job/r0/store/MASTER_ADDR"] == b"boot"


def test_third_round_cleans_up_the_first_and_ranks_stay() -> None:
    s = settings(2, 2)
    world = World()
    cores = [core(i, s) for i in range(2)]
    cleanups: list[int] = []
    for number in range(3):
        nodes = [Node(c.next_rendezvous(("boot", 1))) for c in cores]
        world.run(nodes)
        assert all(n.raised is None for n in nodes), [n.raised for n in nodes]
        assert [n.result.keys.number for n in nodes] == [number, number]
        assert [n.result.rank for n in nodes] == [0, 1]
        cleanups += [e.number for n in nodes for e in n.effects if isinstance(e, CleanUp)]
    # Exactly one closer per round; only the round two back is deleted.
    assert cleanups == [0]


@pytest.mark.parametrize("n", [1, 7, 64])
def test_ops_per_node_do_not_grow_with_n(n: int) -> None:
    s = settings(n, n)
    world = World()
    nodes = join(world, [core(i, s) for i in range(n)])
    assert all(node.raised is None for node in nodes)
    assert sorted(node.result.rank for node in nodes) == list(range(n))
    # Four operations per node (round hint, slot, descriptor + heartbeat, rank record) and a
    # constant number for the one closer (snapshot, freeze, seal, publish).
    assert len(world.ops) <= 4 * n + 12


def test_waiting_nodes_far_from_the_monitors_look_less_often() -> None:
    """While a round waits, the slots next in line look at the monitors every interval, the
    ones far up at most every 16 intervals: the waiting costs O(N / 16) store operations per
    interval, not O(N)."""
    n = 80
    s = settings(n + 1, n + 1, join=64 * INTERVAL)
    world = World()
    nodes = [Node(core(i, s).next_rendezvous(("boot", 1) if i == 0 else None)) for i in range(n)]
    world.run(nodes, horizon=100 * INTERVAL)
    assert all(isinstance(node.raised, RendezvousTimeoutError) for node in nodes)
    near, far = world.by_node[3], world.by_node[n - 1]  # slots 4 and 80
    assert near > 3 * far, (near, far)
    # The far node looked a few times in 64 intervals (~4), not 64 times.
    assert far < 64 * 3 / 8


def test_survivors_rejoin_without_reading_the_round_and_lookouts_look_first() -> None:
    """Re-joining after a completed round: a member takes its slot in the next round at once
    (no read of the round counter); the two lowest slots of each block of LOOKOUT_BLOCK
    first read their block's heartbeats (one request, not waiting for missing keys)."""
    n = LOOKOUT_BLOCK + 6
    s = settings(n, n)
    world = World()
    cores = [core(i, s) for i in range(n)]
    first = join(world, cores)
    assert all(node.raised is None for node in first)
    slot_of = {i: node.result.slot for i, node in enumerate(first)}
    world.trace.clear()
    again = join(world, cores)
    assert all(node.raised is None for node in again), [n.raised for n in again]
    assert sorted(node.result.rank for node in again) == list(range(n))
    assert {node.result.keys.number for node in again} == {1}
    for i, ops in world.trace.items():
        slot = slot_of[i]
        if slot in (1, 2, LOOKOUT_BLOCK + 1, LOOKOUT_BLOCK + 2):
            look = ops[0]
            assert isinstance(look, MultiGet) and look.timeout == 0.0, look
            start = slot - (slot - 1) % LOOKOUT_BLOCK
            block = range(start, min(start + LOOKOUT_BLOCK - 1, n) + 1)
            assert look.keys == [f"rdzv/job/r0/hb/{b}" for b in block if b != slot]
            assert ops[1] == Get("rdzv/job/r0/size", 0.0)  # which of them are members
            ops = ops[2:]
        assert ops[0] == Add("rdzv/job/r1/joined", 1), (slot, ops[:3])
    assert not any(op == Add("rdzv/job/round", 0) for ops in world.trace.values() for op in ops)


def test_a_lookout_declares_a_dead_member_one_expiry_after_its_first_look() -> None:
    """The look-out's first look, taken before it re-joins, starts the expiry of a dead
    member: the next round completes one expiry (plus the last call) after it, although the
    other survivors and the monitors of the new round come later."""
    s = settings(3, 4, last_call=0.25)
    world = World()
    cores = [core(i, s) for i in range(4)]
    first = join(world, cores)
    assert all(node.raised is None for node in first)
    by_slot = {node.result.slot: i for i, node in enumerate(first)}
    lookout, victim = by_slot[1], by_slot[4]
    others = [i for i in range(4) if i not in (lookout, victim)]
    # The look-out starts re-joining: its first store operation is the look at its block;
    # it goes on until it holds its slot in round 1.
    program = cores[lookout].next_rendezvous(None)
    t0 = world.clock
    ops: list[Op] = []
    value: Any = None
    while not ops or ops[-1] != Add("rdzv/job/r1/joined", 1):
        op = program.send(value)
        if isinstance(op, Now):
            value = world.clock
        else:
            ops.append(op)
            value = world.perform(op)
    assert isinstance(ops[0], MultiGet) and "rdzv/job/r0/hb/4" in ops[0].keys
    # The victim is dead; the others are still running their round for 1.5 s (beating).
    world.beating[victim] = None
    world.clock += 1.0
    world.beat(frozenset({victim}))
    world.clock += 0.5
    nodes = [Node(c.next_rendezvous(None)) for c in cores]
    nodes[lookout] = Node(program, value=value)
    world.run(nodes, dead=frozenset({victim}))
    done = [nodes[i] for i in (lookout, *others)]
    assert all(n.raised is None for n in done), [n.raised for n in done]
    assert sorted(n.result.rank for n in done) == [0, 1, 2]
    assert {n.result.keys.number for n in done} == {1}
    records = [e for n in nodes for e in n.effects if isinstance(e, Record)]
    assert len(records) == 1 and "slot 4 of round 0" in records[0].message
    assert any(isinstance(e, Record) for e in nodes[lookout].effects)
    assert world.data["rdzv/job/r0/hb/4"].startswith(b"dead:")
    assert world.data["rdzv/job/r0/nvacated"] == b"4"
    # Declared at t0 + EXPIRY, closed after the last call: not 1.5 s later, when the
    # monitors' own first look would have let them declare it.
    assert t0 + EXPIRY <= world.clock <= t0 + EXPIRY + 0.25 + 0.5, world.clock - t0
