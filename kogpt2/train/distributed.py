"""Running under ``torchrun``: one process per device, gradients averaged by DistributedDataParallel.

Nothing here when ``WORLD_SIZE`` is absent: a plain ``python main.py`` is a world of one and never touches
``torch.distributed``.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_TIMEOUT = timedelta(minutes=10)  # set by join; a dead rank ends the job through torchrun's agent, not this


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes (the values themselves in a world of one)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=_cpu_group())
        return tensor.tolist()

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values, on every rank."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(tensor, src=0, group=_cpu_group())
        return tensor.tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=_cpu_group())
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=_cpu_group())


_CPU_GROUP = None


def _cpu_group():
    """Small bookkeeping collectives go over gloo, whatever backend carries the gradients."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT) if dist.get_backend() != "gloo" \
            else dist.group.WORLD
    return _CPU_GROUP


def join(device_name: str, timeout_minutes: float) -> tuple[World, str]:
    """Join the job torchrun started (NCCL on CUDA, Gloo on CPU) and pick this process's device.

    ``timeout_minutes``: how long a collective waits for the other ranks. Rank 0 alone evaluates, samples and writes
    checkpoints while the others wait, so it must cover a slow disk and a first compile, not just a step. A rank
    that dies still ends the job at once: torchrun's agent stops the others."""
    global _TIMEOUT
    _TIMEOUT = timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return World(), device_name
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        device_name = f"cuda:{world.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=_store(world), rank=world.rank,
                            world_size=world.size, timeout=_TIMEOUT)
    return world, device_name


def _store(world: World) -> dist.Store:
    """torchrun's store, with keys of its own for each elastic restart: a restarted group must not read the
    addresses its dead predecessors published there."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
                          is_master=world.rank == 0 and not agent_hosts_it, timeout=_TIMEOUT)
    return dist.PrefixStore(f"kogpt2/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def leave(world: World) -> None:
    """Free what still holds the process group while the interpreter is whole, then destroy the group. A fused
    AdamW keeps the frames that built it alive, so the trainer and its DistributedDataParallel wrapper sit in a
    reference cycle; freed only at interpreter exit, they made Gloo abort the process ("terminate called without
    an active exception") in about 1 of 10 elastic runs."""
    if world.active and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
