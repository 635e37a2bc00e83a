"""Sharding an evaluation across processes started by ``torchrun`` (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Batches are dealt round-robin, so every rank gets a similar share of the work."""
        return batch_index % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def current_shard(device: torch.device) -> Shard:
    """This process's shard; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Shard()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def shard_device(device: torch.device) -> torch.device:
    """On CUDA each local rank takes its own GPU."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def finish(shard: Shard) -> None:
    if shard.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
