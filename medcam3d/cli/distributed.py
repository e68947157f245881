"""torchrun support: detect the torch.distributed environment, split cases, sync, clean up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group was initialised by us

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None when not under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def setup(device: str) -> Dist:
    """Initialise the process group when launched by torchrun with WORLD_SIZE > 1.

    gloo on CPU; nccl on CUDA (each process on ``cuda:LOCAL_RANK``).
    """
    found = env_world()
    if found is None or found[1] <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank, world, local = found
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local, active=True)


def split(items: list[T], d: Dist) -> list[T]:
    """Item i goes to rank i % world_size (deterministic, balanced within one item)."""
    return [x for i, x in enumerate(items) if i % d.world_size == d.rank]


def barrier(d: Dist) -> None:
    if d.active:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_ok(d: Dist, ok: bool) -> bool:
    """True only if ``ok`` on every rank (used so setup errors on one rank stop all of them)."""
    if not d.active:
        return ok
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast(d: Dist, value: T) -> T:
    """Rank 0's ``value`` on every rank (the value itself when not distributed)."""
    if not d.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
