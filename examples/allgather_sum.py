"""All-gather and sum over ranks through the launcher's store, in pure Python.

Run it with::

    rdzv run --standalone --nproc-per-node 4 examples/allgather_sum.py

Every worker connects to the store the agent hosts (``rdzv.connect()``, scoped to this
attempt of the job), publishes who it is, gathers everyone's entry, adds its rank to a shared
counter, and rank 0 prints the result.
"""

from __future__ import annotations

import json
import os
import socket

import rdzv


def main() -> None:
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    store = rdzv.connect(timeout=60)

    # All-gather: each rank publishes one value; get() waits until a key is set.
    me = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}
    store.set(f"hello/{rank}", json.dumps(me))
    gathered = [json.loads(v) for v in store.multi_get([f"hello/{r}" for r in range(world_size)])]

    # Sum: an atomic counter, then a barrier so that every rank has added before reading.
    store.add("rank_sum", rank)
    store.barrier("summed", world_size)
    total = int(store.get("rank_sum"))

    if rank == 0:
        print(
            f"all-gather over {world_size} ranks: "
            + ", ".join(f"rank {g['rank']} pid {g['pid']}" for g in gathered)
        )
        expected = world_size * (world_size - 1) // 2
        print(f"sum of ranks: {total} (expected {expected})")
    assert [g["rank"] for g in gathered] == list(range(world_size))
    assert total == world_size * (world_size - 1) // 2


if __name__ == "__main__":
    main()
