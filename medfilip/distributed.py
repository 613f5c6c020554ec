"""torchrun/DDP plumbing: who am I, and gathering a global batch's pieces from every rank.

One process is the world of one: every function here is a no-op then, so the training
loop has a single code path on a CPU, one GPU, or ``torchrun --nproc_per_node N``
(multi-node too: torchrun sets the same environment variables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_gather_varlen(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (lengths may differ along dim 0), no gradient."""
    if not world.distributed:
        return [tensor]
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(out, padded.contiguous())
    return [t[:s] for t, s in zip(out, sizes)]


def gather_features(local: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's features (lengths may differ) in rank order.

    As in open_clip's ``gather_features`` (without ``gather_with_grad``): the other ranks'
    pieces carry no gradient; this rank's own piece is put back with its gradient. Each
    rank then computes the loss of the whole global batch; scaling that loss by the world
    size makes DDP's gradient average equal the gradient of the global loss.
    """
    if not world.distributed:
        return local
    pieces = all_gather_varlen(local.detach(), world)
    pieces[world.rank] = local
    return torch.cat(pieces, dim=0)
