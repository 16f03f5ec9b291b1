"""The restart rules: which restarts charge the budget, and their metrics labels."""

from __future__ import annotations

from rdzv.launcher.failures import FailureRecord
from rdzv.launcher.restart_policy import (
    RestartBudget,
    for_failure,
    for_lost_node,
    for_membership_change,
    for_peer_restart,
    for_rendezvous_retry,
)


def _record(kind: str) -> FailureRecord:
    return FailureRecord(kind=kind, node_rank=1, host="h")  # type: ignore[arg-type]


def test_failures_and_hangs_charge_the_budget_until_it_is_spent() -> None:
    budget = RestartBudget(2)
    assert budget.charge(for_failure("worker exited", _record("exit")))
    assert budget.charge(for_failure("worker hung", _record("hang")))
    assert (budget.used, budget.remaining) == (2, 0)
    assert not budget.charge(for_failure("worker killed", _record("signal")))
    assert budget.used == 2


def test_lost_nodes_and_membership_changes_are_free() -> None:
    budget = RestartBudget(0)
    for restart in (
        for_lost_node(3, _record("lost")),
        for_failure("peer's cause", _record("lost")),
        for_membership_change(),
        for_peer_restart(),
        for_rendezvous_retry("exchange timed out"),
    ):
        assert not restart.failure
        assert budget.charge(restart)
    assert budget.used == 0


def test_labels() -> None:
    assert for_failure("x", _record("exit")).label == "worker_failure"
    assert for_failure("x", _record("signal")).label == "worker_failure"
    assert for_failure("x", _record("hang")).label == "hang"
    assert for_lost_node(2, _record("lost")).label == "peer_lost"
    assert for_lost_node(2, _record("lost")).reason == "node 2 was lost"
    assert for_membership_change().label == "scale_up"
    assert for_peer_restart().label == "peer_restart"
