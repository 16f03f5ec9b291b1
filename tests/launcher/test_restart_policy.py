"""The restart rules: which restarts charge the budget, and their metrics labels."""

from __future__ import annotations

from rdzv.launcher import restart_policy as policy
from rdzv.launcher.failures import FailureRecord


def _record(kind: str) -> FailureRecord:
    return FailureRecord(kind=kind, node_rank=1, host="h")  # type: ignore[arg-type]


def test_failures_and_hangs_charge_the_budget_until_it_is_spent() -> None:
    budget = policy.RestartBudget(2)
    assert budget.charge(policy.for_failure("worker exited", _record("exit")))
    assert budget.charge(policy.for_failure("worker hung", _record("hang")))
    assert (budget.used, budget.remaining) == (2, 0)
    assert not budget.charge(policy.for_failure("worker killed", _record("signal")))
    assert budget.used == 2


def test_lost_nodes_and_membership_changes_are_free() -> None:
    budget = policy.RestartBudget(0)
    for restart in (
        policy.for_lost_node(3, _record("lost")),
        policy.for_failure("peer's cause", _record("lost")),
        policy.for_membership_change(),
        policy.for_peer_restart(),
        policy.for_rendezvous_retry("exchange timed out"),
    ):
        assert not restart.failure
        assert budget.charge(restart)
    assert budget.used == 0


def test_labels() -> None:
    assert policy.for_failure("x", _record("exit")).label == "worker_failure"
    assert policy.for_failure("x", _record("signal")).label == "worker_failure"
    assert policy.for_failure("x", _record("hang")).label == "hang"
    assert policy.for_lost_node(2, _record("lost")).label == "peer_lost"
    assert policy.for_lost_node(2, _record("lost")).reason == "node 2 was lost"
    assert policy.for_membership_change().label == "scale_up"
    assert policy.for_peer_restart().label == "peer_restart"
