"""Distributed data parallel (DDP) from torchrun's environment, and the batch split it needs.

Launch any script that calls ``ddpm_lib.train.train`` with, e.g.::

    torchrun --standalone --nproc_per_node 4 my_train.py

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` then starts the
process group (NCCL on CUDA, gloo on the CPU). Without them everything runs in one process.

**Same result for any number of ranks.** Every rank draws the SAME global batch (indices,
timesteps, noise, label-dropout mask) from identically seeded generators, and keeps only
its own contiguous slice (:func:`shard`). DDP averages the gradients of the W equal
slices, which is the gradient of the global batch's mean loss, so a run on W ranks matches
a single process with the same ``batch_size`` up to floating-point summation order.

**No DistributedSampler.** The usual recipe, a ``DataLoader`` per rank with a
``DistributedSampler``, pads the data to a multiple of W by repeating examples and ends each
epoch with a short or dropped batch, so what a run sees depends on W; and the sampler's
position inside an epoch is in no checkpoint, so a resumed run restarts its epoch. Here the
index stream of ``ddpm_lib.train.BatchStream`` (seeded ``randperm`` passes that batches run
across, checkpointed as a generator state and a position) is drawn identically on every rank
and sharded, for tensors and map-style Datasets alike: the same global batches whatever W,
and an exact resume.

**Rank 0 writes.** Logs, sample grids, checkpoints, ``run.json`` and printed messages come
from rank 0 only (:attr:`DistInfo.is_main`, or :func:`is_main_process` before set-up).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "setup", "teardown", "shard", "mean_across_ranks", "is_main_process"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size``, its ``device``, and whether
    :func:`setup` started the process group (and :func:`teardown` should end it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, samples and checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): from the process group once started,
    else from torchrun's ``RANK`` (so a launcher can decide before :func:`setup`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def setup(device: str | None = None) -> DistInfo:
    """Read torchrun's variables, start the process group if WORLD_SIZE > 1, pick the device.

    ``device=None`` means CUDA when available (``cuda:LOCAL_RANK`` under DDP), else the CPU.
    """
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if world_size > 1 and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"RANK/WORLD_SIZE ({rank}/{world_size}) disagree with the process group "
                         f"({dist.get_rank()}/{dist.get_world_size()})")
    return DistInfo(rank, world_size, local_rank, dev, owns)


def teardown(info: DistInfo) -> None:
    """End the process group if :func:`setup` started it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(x: Tensor, info: DistInfo) -> Tensor:
    """This rank's contiguous slice of a global batch (its first dimension must divide evenly)."""
    if x.shape[0] % info.world_size:
        raise ValueError(f"a global batch of {x.shape[0]} does not split over {info.world_size} ranks")
    size = x.shape[0] // info.world_size
    return x[info.rank * size : (info.rank + 1) * size]


def mean_across_ranks(x: Tensor, info: DistInfo) -> Tensor:
    """The mean of ``x`` over ranks (``x`` itself in a single process)."""
    if info.world_size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world_size
