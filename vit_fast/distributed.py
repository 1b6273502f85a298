"""Process-group plumbing for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N -m vit_fast.train ...`` starts N processes and tells each its place
through the environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A process started
without torchrun finds none of these and runs alone, touching no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0  # global rank: 0 .. size - 1
    local_rank: int = 0  # rank on this machine: picks the GPU
    size: int = 1  # number of processes

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes metrics, checkpoints and plots."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def world_from_env(env=None) -> World:
    """The World that torchrun's environment describes (a single process when it is absent)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        world = World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    except ValueError as err:
        raise SystemExit(f"malformed torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE): {err}") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise SystemExit(f"torchrun environment gives rank {world.rank} of world size {world.size}")
    return world


def device_for(world: World, requested: str) -> torch.device:
    """The device this rank trains on: GPU ``LOCAL_RANK`` when CUDA is used, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise SystemExit(
            f"--device {requested}: under torchrun each rank uses GPU LOCAL_RANK; pass --device cuda (or auto, "
            "or cpu) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise SystemExit(
            f"rank {world.rank} has LOCAL_RANK {world.local_rank} but this machine shows "
            f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node"
        )
    return torch.device("cuda", world.local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if not world.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=world.rank, world_size=world.size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all ranks (in place, also returned); the identity for a single process."""
    if world.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not world.is_distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()
