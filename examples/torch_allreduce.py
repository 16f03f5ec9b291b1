"""An unmodified torch script: gloo all_reduce after ``init_process_group("env://")``.

Run it with::

    rdzv run --standalone --nproc-per-node 4 examples/torch_allreduce.py

``rdzv run`` sets torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_USE_AGENT_STORE=True, ...), so torch's ``env://`` rendezvous connects every rank,
as a client, to the TCPStore the agent hosts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo", init_method="env://")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    expected = world_size * (world_size + 1) / 2
    print(f"rank {rank}/{world_size}: all_reduce sum = {tensor.item():g} (expected {expected:g})")
    if tensor.item() != expected:
        raise SystemExit(f"rank {rank}: wrong all_reduce result {tensor.item()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
