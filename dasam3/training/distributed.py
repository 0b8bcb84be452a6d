"""Process-group setup for `torchrun` (NCCL on GPUs, gloo on CPUs); a no-op in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dasam3._common import resolve_device


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


def init_world(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group `torchrun` describes in the environment, and pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(target)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return world, target


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
