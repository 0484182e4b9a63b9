"""The plain baseline of bench_group: the digits MLP trained data-parallel by a
hand-written DDP script, started with `torchrun --nproc_per_node N` (Gloo on CPU).

Same network, optimizer, global batch and steps as the ptutils session of bench_group;
each rank trains on its slice of every global batch; the loss is fetched every 10 steps.
No checkpoint, no store: this is what a lab's own script does.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    n, bs, share = x.shape[0], args.batch, args.batch // world
    perm, pos, pending = torch.randperm(n, generator=gen), 0, []
    for step in range(1, args.steps + 1):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos + rank * share:pos + (rank + 1) * share]
        pos += bs
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x.index_select(0, idx)), y.index_select(0, idx))
        loss.backward()
        opt.step()
        pending.append(loss.detach())
        if step % 10 == 0:
            torch.stack(pending).tolist()
            pending.clear()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and os.environ.get("DDP_PLAIN_SAY"):
        print("done")


if __name__ == "__main__":
    main()
