"""The launcher's restart policy: when the worker group restarts, and what it costs.

Every restart goes through a new rendezvous. The rules (same budget semantics as torchrun's
``--max-restarts``):

* **failure** — a local worker ended non-zero or was killed, or another node published such a
  root cause: restart, charging one restart of the budget; with none left the job fails.
* **hang** — a worker stopped beating for ``hang_timeout``: its stacks are dumped, then as a
  failure (one restart charged).
* **lost node** — the watched peer node stopped beating: restart *without* charging the
  budget (the node, not the job, failed); a root cause of kind ``lost`` from another node is
  free too.
* **membership change** — nodes are waiting to join while no local worker has finished yet
  (scale up), or another node asked for a restart without a root cause: restart, free.
* **rendezvous retry** — the rank exchange after a rendezvous failed (a node vanished right
  after it): rendezvous again, free, at most :data:`MAX_RENDEZVOUS_RETRIES` times in a row.

An agent raises :class:`Restart` (built by the functions below) from its monitoring loop and
charges :class:`RestartBudget` where it catches it.
"""

from __future__ import annotations

from rdzv.launcher.failures import FailureRecord

__all__ = [
    "MAX_RENDEZVOUS_RETRIES",
    "Restart",
    "RestartBudget",
    "for_failure",
    "for_lost_node",
    "for_membership_change",
    "for_peer_restart",
    "for_rendezvous_retry",
]

#: Consecutive rendezvous rounds whose rank exchange failed before the agent gives up.
MAX_RENDEZVOUS_RETRIES = 3


class Restart(Exception):
    """The worker group must be restarted after a new rendezvous.

    ``reason``: text for the log; ``failure``: whether it charges the budget; ``cause``: the
    root cause of a failure (here or on another node), None for a free restart without one;
    ``label``: the metrics label (worker_failure, hang, peer_lost, scale_up, peer_restart,
    rendezvous).
    """

    def __init__(
        self, reason: str, *, failure: bool, label: str, cause: FailureRecord | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure
        self.label = label
        self.cause = cause


def for_failure(reason: str, cause: FailureRecord) -> Restart:
    """A root cause (a worker failure or hang here, or any cause another node published):
    charged unless the cause is a lost node."""
    label = {"hang": "hang", "lost": "peer_lost"}.get(cause.kind, "worker_failure")
    return Restart(reason, failure=cause.kind != "lost", label=label, cause=cause)


def for_lost_node(node: int, cause: FailureRecord) -> Restart:
    """The watched peer ``node`` stopped beating (``cause``: the record announced for it)."""
    return for_failure(f"node {node} was lost", cause)


def for_membership_change() -> Restart:
    """Nodes are waiting to join: restart to admit them (free)."""
    return Restart("new nodes are waiting to join", failure=False, label="scale_up")


def for_peer_restart() -> Restart:
    """Another node restarts the group without a root cause (free)."""
    return Restart("another node restarts the group", failure=False, label="peer_restart")


def for_rendezvous_retry(reason: str) -> Restart:
    """The exchange after a rendezvous failed: rendezvous again (free, bounded by
    :data:`MAX_RENDEZVOUS_RETRIES`)."""
    return Restart(reason, failure=False, label="rendezvous")


class RestartBudget:
    """The restarts a job may use (``max_restarts``, torchrun's ``--max-restarts``)."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.remaining = max_restarts

    @property
    def used(self) -> int:
        """Restarts used so far (``TORCHELASTIC_RESTART_COUNT``)."""
        return self.max_restarts - self.remaining

    def charge(self, restart: Restart) -> bool:
        """Account for ``restart``: True if the group may restart, False when it is a
        failure and no restart is left (the job fails)."""
        if not restart.failure:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True
