"""Rank assignment across nodes, agreed through the round's store after a rendezvous.

After ``next_rendezvous()`` every agent knows its node rank (``group_rank``) and the number of
nodes (``group_world_size``), but not the other nodes' worker counts or roles. The agents
exchange them in the store of the round (one ``add``, one ``set``, one ``wait`` + ``multi_get``
per agent):

* ``rdzv.agent/ticket``: ``add(1)``; ticket ``t`` gives the generation ``(t - 1) // nodes``,
  so repeated exchanges in a store that outlives the round (the static backend) do not mix;
* ``rdzv.agent/{gen}/node/{group_rank}``: JSON ``{"role", "nproc", "host"}`` of each agent;
* ``rdzv.agent/{gen}/group``: JSON written by node 0: the workers' store address
  (``master_addr``, ``master_port``, ``use_agent_store``) and a fresh ``attempt_id``.

Global ranks: nodes in ``group_rank`` order, each node's workers in local-rank order, so
``RANK = sum(nproc of lower nodes) + LOCAL_RANK``, which is ``group_rank * nproc +
local_rank`` when every node runs the same number of workers (torch's rule when
``TORCH_ELASTIC_WORKER_IDENTICAL=1``). ``ROLE_RANK`` counts the same way over nodes of the
same role; ``ROLE_WORLD_SIZE`` is the number of workers with that role.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from rdzv.errors import RendezvousStateError
from rdzv.store.base import Store

__all__ = ["NAMESPACE", "Assignment", "NodeInfo", "exchange", "new_attempt_id", "status_url_key"]

#: Key namespace of the agents inside the round's store.
NAMESPACE = "rdzv.agent"


@dataclass(frozen=True)
class NodeInfo:
    """What one agent tells the others."""

    role: str
    nproc: int
    host: str
    #: The agent's process id (for messages naming a missing node); None if not told.
    pid: int | None = None

    def encode(self) -> bytes:
        doc = {"role": self.role, "nproc": self.nproc, "host": self.host, "pid": self.pid}
        return json.dumps(doc).encode()

    @staticmethod
    def decode(raw: bytes, group_rank: int) -> NodeInfo:
        try:
            data = json.loads(raw)
            pid = data.get("pid")
            info = NodeInfo(
                str(data["role"]),
                int(data["nproc"]),
                str(data["host"]),
                pid if isinstance(pid, int) else None,
            )
        except (ValueError, KeyError, TypeError):
            raise RendezvousStateError(
                f"the node info of group rank {group_rank} in the round's store is corrupt: "
                f"{raw[:100]!r}"
            ) from None
        if info.nproc < 1:
            raise RendezvousStateError(f"node {group_rank} announced nproc={info.nproc}")
        return info


@dataclass(frozen=True)
class Assignment:
    """The outcome of the exchange, as seen by one node.

    ``rank_base``/``role_rank_base``: global/role rank of this node's local rank 0;
    ``namespace``: this generation's key prefix in the round store (for heartbeats and the
    exit barrier).
    """

    group_rank: int
    group_world_size: int
    rank_base: int
    world_size: int
    role_rank_base: int
    role_world_size: int
    master_addr: str
    master_port: int
    use_agent_store: bool
    attempt_id: str
    namespace: str
    hosts: tuple[str, ...]
    pids: tuple[int | None, ...] = ()


def status_url_key(namespace: str, group_rank: int) -> str:
    """The key (in the round's store) of the status page URL the agent of node
    ``group_rank`` serves (``rdzv run --metrics-port``), read by ``rdzv status --web``."""
    return f"{namespace}/web/{group_rank}"


def new_attempt_id() -> str:
    """A random id of one worker-group incarnation (12 hex digits)."""
    return secrets.token_hex(6)


def exchange(
    store: Store,
    group_rank: int,
    group_world_size: int,
    me: NodeInfo,
    master: tuple[str, int, bool] | None,
    timeout: float,
) -> Assignment:
    """Run the exchange described in the module docstring.

    ``master`` (node 0 only): ``(addr, port, use_agent_store)`` of the workers' store.
    Raises :class:`~rdzv.errors.StoreTimeoutError` if some node does not publish within
    ``timeout`` seconds (it died after the rendezvous), RendezvousStateError on corrupt data,
    ValueError if node 0 has no ``master``.
    """
    ticket = store.add(f"{NAMESPACE}/ticket", 1)
    namespace = f"{NAMESPACE}/{(ticket - 1) // group_world_size}"
    group_key = f"{namespace}/group"
    keys = [f"{namespace}/node/{i}" for i in range(group_world_size)]
    if group_rank == 0:
        if master is None:
            raise ValueError("node 0 must provide the workers' store address")
        addr, port, shared = master
        group = {
            "master_addr": addr,
            "master_port": port,
            "use_agent_store": shared,
            "attempt_id": new_attempt_id(),
        }
        store.multi_set([keys[0], group_key], [me.encode(), json.dumps(group).encode()])
    else:
        store.set(keys[group_rank], me.encode())
    store.wait([*keys, group_key], timeout)
    *raw_nodes, raw_group = store.multi_get([*keys, group_key])
    nodes = [NodeInfo.decode(raw, i) for i, raw in enumerate(raw_nodes)]
    try:
        group_data = json.loads(raw_group)
        addr = str(group_data["master_addr"])
        port = int(group_data["master_port"])
        shared = bool(group_data["use_agent_store"])
        attempt_id = str(group_data["attempt_id"])
    except (ValueError, KeyError, TypeError):
        raise RendezvousStateError(
            f"the group info in the round's store is corrupt: {raw_group[:100]!r}"
        ) from None
    lower = nodes[:group_rank]
    return Assignment(
        group_rank=group_rank,
        group_world_size=group_world_size,
        rank_base=sum(n.nproc for n in lower),
        world_size=sum(n.nproc for n in nodes),
        role_rank_base=sum(n.nproc for n in lower if n.role == me.role),
        role_world_size=sum(n.nproc for n in nodes if n.role == me.role),
        master_addr=addr,
        master_port=port,
        use_agent_store=shared,
        attempt_id=attempt_id,
        namespace=namespace,
        hosts=tuple(n.host for n in nodes),
        pids=tuple(n.pid for n in nodes),
    )
