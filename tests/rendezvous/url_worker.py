"""A rank of a URL-rendezvous test job: ``python -m tests.rendezvous.url_worker URL RANK WORLD``.

RANK/WORLD of -1 leave them to the URL (or the environment for env://). The rank publishes
its pid, adds its rank to a counter, meets the others at a barrier, reads everything and
prints one JSON line: ``{"rank", "world_size", "pids", "rank_sum", "store"}``.
"""

from __future__ import annotations

import json
import os
import sys

import rdzv


def main(argv: list[str]) -> int:
    url, rank_arg, world_arg = argv[0], int(argv[1]), int(argv[2])
    store, rank, world_size = next(rdzv.rendezvous(url, rank_arg, world_size=world_arg, timeout=60))
    store.set(f"pid/{rank}", str(os.getpid()))
    store.add("rank_sum", rank)
    store.barrier("added", world_size)
    pids = [int(v) for v in store.multi_get([f"pid/{r}" for r in range(world_size)])]
    result = {
        "rank": rank,
        "world_size": world_size,
        "pids": pids,
        "rank_sum": int(store.get("rank_sum")),
        "store": type(store).__name__,
    }
    print(json.dumps(result), flush=True)
    # Rank 0 may host the store: leave only when everyone has read.
    store.barrier("done", world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
