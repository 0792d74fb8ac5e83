"""Where a run computes: the device it asks for, and for data-parallel runs the process group torchrun or a submitit
job describes, this rank's device and share of a batch, sums over ranks.

A single process (no WORLD_SIZE above 1 in the environment) has no process group: every function here then
answers for a world of one, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from snn_train.errors import ConfigError
from snn_train.launch import several_processes

T = TypeVar("T")


def resolve_device(device: str, key: str = "train.device") -> torch.device:
    """``auto`` is cuda when a GPU is present, else cpu; anything else must exist on this machine (else ConfigError)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key}={device} is not a device; use auto, cpu or cuda[:N]") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={device} is not supported; use auto, cpu or cuda[:N]")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device} but no CUDA GPU is available; use {key}=cpu or auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={device} but only {torch.cuda.device_count()} GPU(s) are present")
    return resolved


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group for the time of the block, when the environment asks for more than one process.

    gloo carries CPU tensors, nccl CUDA ones; a CUDA process takes its node's LOCAL_RANK-th GPU (the only one it
    sees, if SLURM gives each task one). Inside an existing group (the CLI opens one before Hydra starts) it does
    nothing.
    """
    if dist.is_initialized() or not several_processes():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(0 if torch.cuda.device_count() == 1 else int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the single process): the one that writes the run's files."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device this rank computes on: its own GPU (chosen by process_group) when ``device`` is CUDA."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped to all-reduce (average) its gradients over the ranks in backward; ``model`` itself alone."""
    return nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model


def shard(n: int) -> slice:
    """This rank's contiguous part of a batch of ``n`` samples; the parts' sizes differ by at most one."""
    return slice(n * rank() // world_size(), n * (rank() + 1) // world_size())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over the ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' ``value``s, so every rank takes the same decision."""
    if not dist.is_initialized():
        return value
    values = torch.tensor([value])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return int(values.item())


def from_rank_0(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank is here (after rank 0 wrote a checkpoint, so none stops before it is on disk)."""
    if dist.is_initialized():
        dist.barrier()
