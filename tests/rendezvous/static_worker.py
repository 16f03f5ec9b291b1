"""A node of a static-rendezvous test job:
``python -m tests.rendezvous.static_worker ENDPOINT RANK NNODES RUN_ID``.

Creates the handler through the registry, completes the rendezvous, publishes its pid in the
round store, adds its rank to a counter, and prints one JSON line with what it saw and the
rendezvous events it recorded.
"""

from __future__ import annotations

import json
import os
import sys

from rdzv import events
from rdzv.rendezvous.api import RendezvousParameters
from rdzv.rendezvous.registry import get_rendezvous_handler


def main(argv: list[str]) -> int:
    endpoint, rank, nnodes, run_id = argv[0], int(argv[1]), int(argv[2]), argv[3]
    recorded: list[events.RdzvEvent] = []
    events.add_callback(lambda e: recorded.append(e) if isinstance(e, events.RdzvEvent) else None)
    params = RendezvousParameters(
        "static", endpoint, run_id, nnodes, nnodes, rank=str(rank), timeout="60"
    )
    handler = get_rendezvous_handler(params)
    info = handler.next_rendezvous()
    store = info.store
    store.set(f"pid/{info.rank}", str(os.getpid()))
    store.add("rank_sum", info.rank)
    store.barrier("added", info.world_size)
    again = handler.next_rendezvous()  # the same round, the same store
    assert info.bootstrap_store_info is not None
    result = {
        "rank": info.rank,
        "world_size": info.world_size,
        "pids": [int(v) for v in store.multi_get([f"pid/{r}" for r in range(nnodes)])],
        "rank_sum": int(again.store.get("rank_sum")),
        "bootstrap": [info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port],
        "events": [[e.name, e.node_state.value, e.rank, e.run_id] for e in recorded],
    }
    print(json.dumps(result), flush=True)
    store.barrier("done", info.world_size)
    return 0 if handler.shutdown() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
