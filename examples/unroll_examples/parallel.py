"""Data parallelism for the mixture trainer: ``torchrun --nproc_per_node N`` runs the single-process algorithm.

Every rank draws the same global minibatch from the shared per-seed streams and keeps its slice of the batch
dimension (:meth:`DataParallel.shard`); the discriminator's committed steps and its K unrolled steps average their
gradient over ranks with :func:`unroll.distributed.all_reduce_mean` (so D is the same on every rank and equals the
one-process D on the global batch), the generator's gradient is averaged the same way, and the logged losses too.
So the state, the metrics and a divergence are the same on every rank, and the same as one process's up to float
summation order (docs/distributed.md). Rank 0 alone takes the output folder and writes to it (:func:`claim`).

Without ``torchrun`` (or with one process) :func:`from_environment` returns ``None`` and nothing changes.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import unroll

from . import runs


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the job: ``rank`` of ``world`` ranks, and the gradient mean they share."""

    rank: int
    world: int
    mean: unroll.distributed.AllReduceMean

    @property
    def writes(self) -> bool:
        """Whether this rank writes outputs and checkpoints (rank 0 only)."""
        return self.rank == 0

    def shard(self, tensor: Tensor, dim: int = -2) -> Tensor:
        """This rank's equal slice of ``tensor`` along the batch dimension ``dim`` (``[..., batch, features]``)."""
        return tensor.chunk(self.world, dim=dim)[self.rank]

    def mean_values(self, values: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The mean over ranks of per-rank values of the same shapes (e.g. each rank's loss on its shard)."""
        return unroll.distributed.all_reduce_mean(check_finite=False)({n: v.detach() for n, v in values.items()})


def from_environment(batch: int, device: str = "cpu") -> Optional[DataParallel]:
    """Join the job ``torchrun`` started (gloo on CPU, nccl on CUDA), or ``None`` for a one-process run.

    Raises :class:`runs.RunError` on every rank, before joining, when ``batch`` does not split evenly over the
    ranks (the mean of per-rank means is the global mean only for equal shards). Ranks other than 0 print nothing
    to stdout (their summary would repeat rank 0's); errors still go to stderr.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if batch % world:
        raise runs.RunError(f"--batch {batch} does not split evenly over {world} processes: the mean of per-rank "
                            f"means is the global mean only for equal shards")
    if not dist.is_initialized():
        # A rank that dies (or waits on one that died) raises after the timeout instead of hanging for 30 minutes.
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
        atexit.register(dist.destroy_process_group)
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return DataParallel(rank=rank, world=dist.get_world_size(), mean=unroll.distributed.all_reduce_mean())


@contextlib.contextmanager
def claim(out: Path, parallel: Optional[DataParallel], **kwargs: Any) -> Iterator[Path]:
    """:func:`runs.claim` on rank 0 alone (one writer per folder); every rank gets its outcome.

    Rank 0 takes the lock and checks ``--resume`` and the settings, then tells the other ranks whether it
    succeeded; on failure every rank raises the same :class:`runs.RunError`, so none waits for the others in a
    collective. Without ``parallel`` it is :func:`runs.claim`.
    """
    if parallel is None:
        with runs.claim(out, **kwargs) as folder:
            yield folder
        return
    outcome: list = [None]
    with contextlib.ExitStack() as stack:
        if parallel.writes:
            try:
                stack.enter_context(runs.claim(out, **kwargs))
            except runs.RunError as error:
                outcome[0] = str(error)
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise runs.RunError(outcome[0] if parallel.writes else f"rank 0: {outcome[0]}")
        yield Path(out)


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without it), readable before joining the job."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str, parallel: Optional[DataParallel]) -> str:
    """``--device cuda`` under ``torchrun`` is ``cuda:LOCAL_RANK`` (one GPU per rank, made current for nccl);
    any other device, or a one-process run, is unchanged."""
    if parallel is None or device != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


@contextlib.contextmanager
def rank_zero_first(parallel: Optional[DataParallel]) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and caches a classifier), then the others (which read the cache);
    an error on rank 0 still releases them. Without ``parallel`` it just runs the block."""
    if parallel is None:
        yield
        return
    if not parallel.writes:
        dist.barrier()
        yield
        return
    try:
        yield
    finally:
        dist.barrier()
