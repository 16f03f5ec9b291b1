"""The dynamic rendezvous across real processes: SIGKILLed nodes, skewed clocks."""

from __future__ import annotations

import time
from typing import Any

from tests.rendezvous.conftest import Backend, ProcNode, eventually

INTERVAL = 0.2
ATTEMPTS = 3
EXPIRY = INTERVAL * ATTEMPTS


def config(backend: Backend, index: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "store": backend.spec,
        "run_id": "job",
        "min": 2,
        "max": 3,
        "interval": INTERVAL,
        "attempts": ATTEMPTS,
        "last_call": 0.3,
        "local_addr": f"127.0.0.{index + 1}",
    }
    base.update(extra)
    return base


def start(backend: Backend, nodes: list[ProcNode], count: int, **extra: Any) -> list[ProcNode]:
    new = [ProcNode(config(backend, len(nodes) + i, **extra)) for i in range(count)]
    nodes.extend(new)
    return new


def declared_dead(node: ProcNode) -> list[dict[str, Any]]:
    return [m for m in node.log if m["event"] == "rdzv" and "declared dead" in m["message"]]


def test_killed_member_is_detected_and_excluded(
    process_backend: Backend, proc_nodes: list[ProcNode]
) -> None:
    nodes = start(process_backend, proc_nodes, 3)
    for node in nodes:
        node.send("join")
    ranks = [node.expect("joined") for node in nodes]
    assert {r["world"] for r in ranks} == {3}
    victim = next(n for n, r in zip(nodes, ranks, strict=True) if r["rank"] == 1)
    victim.kill()  # SIGKILL: no goodbye, its heartbeats just stop
    killed_at = time.monotonic()
    survivors = [n for n in nodes if n is not victim]
    for node in survivors:
        node.send("join")
    again = [node.expect("joined", "error") for node in survivors]
    assert [r["event"] for r in again] == ["joined", "joined"], again
    assert {r["world"] for r in again} == {2}
    assert sorted(r["rank"] for r in again) == [0, 1]
    deaths = [m for node in survivors for m in declared_dead(node)]
    assert len(deaths) == 1, deaths  # declared exactly once
    detected_after = deaths[0]["t"] - killed_at
    # Its last heartbeat was at most one interval before the kill.
    assert EXPIRY - INTERVAL <= detected_after <= EXPIRY + INTERVAL + 1.0, detected_after


def test_killed_pending_node_is_excluded(
    process_backend: Backend, proc_nodes: list[ProcNode]
) -> None:
    first, victim = start(process_backend, proc_nodes, 2, max=4, last_call=2.0)
    first.send("join")
    victim.send("join")
    eventually(
        lambda: process_backend.admin.check(["rdzv/job/r0/hb/1", "rdzv/job/r0/hb/2"]),
        what="two slots taken",
    )
    victim.kill()
    (last,) = start(process_backend, proc_nodes, 1, max=4, last_call=2.0)
    last.send("join")
    results = [first.expect("joined", "error"), last.expect("joined", "error")]
    assert [r["event"] for r in results] == ["joined", "joined"], results
    assert {r["world"] for r in results} == {2}


def test_skewed_clocks_do_not_matter(process_backend: Backend, proc_nodes: list[ProcNode]) -> None:
    # One node's wall clock is 10 minutes ahead and its monotonic clock a million seconds
    # ahead; another's are behind. torch compares wall-clock heartbeat stamps and would see
    # the late one as dead (and the early one as alive forever).
    skewed = [{"time": 600, "monotonic": 1e6}, {"time": -600, "monotonic": -1e5}, {}]
    nodes = [
        ProcNode(config(process_backend, i, skew=skew, last_call=0.3))
        for i, skew in enumerate(skewed)
    ]
    proc_nodes.extend(nodes)
    for node in nodes:
        node.send("join")
    assert {node.expect("joined")["world"] for node in nodes} == {3}
    # The two skewed nodes come back for round 1; the third keeps running round 0 for many
    # heartbeat expiries: it must not be declared dead, so round 1 waits for it.
    for node in nodes[:2]:
        node.send("join")
    time.sleep(4 * EXPIRY)
    assert not declared_dead(nodes[0]) and not declared_dead(nodes[1])
    nodes[2].send("join")
    assert {node.expect("joined")["world"] for node in nodes} == {3}
    assert not any(declared_dead(n) for n in nodes)
