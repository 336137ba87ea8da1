"""Running on several processes (Lightning DDP over torch.distributed): eval shards, buffer sync, a file lock.

Evaluation under DDP must see every user exactly once. Lightning's default `DistributedSampler` pads an
eval set by repeating samples so that every rank gets as many, which counts some users twice; instead
each rank gets a contiguous, unshuffled, unpadded slice (`EvalShardSampler`) and the metric states are
summed across ranks before computing (`RankingEvaluator` / `all_reduce_evaluators`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed; (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of range(n); shares differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es)")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return rank * n // world_size, (rank + 1) * n // world_size


class EvalShardSampler(DistributedSampler):
    """Rank's contiguous slice of the dataset, in order, never padded: over all ranks, each index once.

    It subclasses `DistributedSampler` only so that Lightning keeps it (Lightning replaces any other
    sampler of a distributed run with a padding one when `use_distributed_sampler` is on).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.start, self.stop = shard_bounds(len(dataset), rank, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def broadcast_running_stats(module: nn.Module, src: int = 0) -> int:
    """Copies the normalisation running statistics (BatchNorm) of rank `src` to every rank; returns how
    many tensors were sent. Each training forward updates them from the rank's own batch, so they drift
    apart; DDP re-syncs them only inside its wrapper's forward, and an evaluation computes the catalogue's
    vectors before any such forward. With rank src's statistics every rank evaluates the model that rank
    src checkpoints. A no-op (nothing sent) outside a multi-process run."""
    if not is_distributed():
        return 0
    sent = 0
    for layer in module.modules():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buffer = getattr(layer, name, None)
            if isinstance(buffer, torch.Tensor):
                dist.broadcast(buffer, src=src)
                sent += 1
    return sent


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed): processes started together (torchrun,
    SLURM) take turns, e.g. to prepare a dataset once instead of all at the same time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
