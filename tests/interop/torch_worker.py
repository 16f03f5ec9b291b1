"""A torch worker process for interop tests.

``python -m tests.interop.torch_worker file PATH RANK WORLD``: an rdzv FileStore wrapped in
TorchStore is the process group's store. ``python -m tests.interop.torch_worker url URL``:
the store of ``rdzv.rendezvous(URL)`` wrapped in TorchStore.
``python -m tests.interop.torch_worker env``: torch's own ``env://`` (as under torchrun).

Each does a gloo all_reduce of ``rank + 1`` and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    mode = argv[0]
    keep = None  # torch keeps only the C++ half of a Python store alive
    if mode == "env":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    else:
        import rdzv
        from rdzv.interop.torch import TorchStore

        if mode == "file":
            path, rank, world = argv[1], int(argv[2]), int(argv[3])
            keep = TorchStore(rdzv.FileStore(path, world, timeout=60))
        else:
            store, rank, world = next(rdzv.rendezvous(argv[1], timeout=60))
            keep = TorchStore(store)
        dist.init_process_group(
            "gloo", store=keep, rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
    tensor = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(tensor)
    result = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "sum": tensor.item(),
        "use_agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"),
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        "group_rank": os.environ.get("GROUP_RANK"),
    }
    print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
