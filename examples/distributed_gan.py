"""A data-parallel unrolled GAN on a 2-D ring of 8 Gaussians: the recipe of docs/distributed.md.

    torchrun --nproc_per_node 2 examples/distributed_gan.py      # two processes (gloo on CPU)
    python examples/distributed_gan.py                           # one process, the same numbers

Each rank takes its shard of the global batch (``--batch``). The discriminator's committed step and its K
unrolled steps average their gradient across ranks (``unroll.distributed.all_reduce_mean``), so every rank holds
the same discriminator, the one a single process would get on the whole batch; the generator's gradient is
averaged after ``backward`` (``unroll.distributed.all_reduce_grads_``). Every rank draws the same global batch
from the shared seed and keeps its slice (a real data set would use ``DistributedSampler``), so the printed
numbers match a one-process run at the same ``--batch`` and ``--seed`` up to float summation order.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import unroll

RING_MODES, RING_RADIUS, RING_STD = 8, 2.0, 0.02  # Metz et al. (2017), App. A


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="generator steps")
    parser.add_argument("--batch", type=int, default=256, help="global batch, split evenly across ranks")
    parser.add_argument("--K", type=int, default=5, help="unrolled discriminator steps")
    parser.add_argument("--hidden", type=int, default=64,
                        help="width of both players' hidden layers (the paper's App. A: 128)")
    parser.add_argument("--latent", type=int, default=16, help="generator input size (the paper's App. A: 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both players")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--log-every", type=int, default=100)
    return parser.parse_args()


def init_distributed(device: str) -> Tuple[int, int, torch.device]:
    """Join the job torchrun started, or form a one-process group when run with plain ``python``."""
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ:  # set by torchrun, with WORLD_SIZE, MASTER_ADDR and MASTER_PORT
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def sample_ring(n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    angles = torch.randint(RING_MODES, (n,), generator=generator) * (2 * math.pi / RING_MODES)
    centers = RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return (centers + RING_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).to(dtype)


def ring_quality(samples: Tensor) -> Tuple[int, float]:
    """(modes with a sample within 3 std of their center, fraction of samples within 3 std of a center)."""
    angles = torch.arange(RING_MODES, dtype=samples.dtype, device=samples.device) * (2 * math.pi / RING_MODES)
    centers = RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    distance, nearest = torch.cdist(samples, centers).min(dim=1)
    good = distance < 3 * RING_STD
    return int(nearest[good].unique().numel()), float(good.double().mean())


def mlp(sizes: Tuple[int, ...]) -> nn.Sequential:
    layers = [m for i in range(len(sizes) - 1) for m in (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rank, world, device = init_distributed(args.device)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must split evenly across {world} ranks")
    torch.manual_seed(args.seed)  # the same initial players on every rank
    G = mlp((args.latent, args.hidden, args.hidden, 2)).to(device, dtype)
    D = mlp((2, args.hidden, 1)).to(device, dtype)

    def d_loss(d_params: Dict[str, Tensor], real: Tensor, fake: Tensor) -> Tensor:
        logits = functional_call(D, d_params, (torch.cat([real, fake]),)).squeeze(-1)
        return F.softplus(-logits[: len(real)]).mean() + F.softplus(logits[len(real):]).mean()

    # The distributed part: one transform for D's committed and unrolled steps, G's gradient averaged after.
    mean = unroll.distributed.all_reduce_mean()
    d_opt = unroll.adam(args.lr, betas=(0.5, 0.999))
    d_step = unroll.train_step(d_loss, optimizer=d_opt, transform_grads=mean)
    surrogate = unroll.surrogate_loss(d_loss, args.K, optimizer=d_opt, transform_grads=mean)
    d_params = {name: p.detach() for name, p in D.named_parameters()}
    d_state = d_opt.init(d_params)
    g_opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))

    data = torch.Generator().manual_seed(args.seed + 1)  # the same global batches on every rank
    started: Optional[Tuple[float, float]] = None
    for step in range(1, args.steps + 1):
        real = sample_ring(args.batch, data, dtype).chunk(world)[rank].to(device)
        z = torch.randn(args.batch, args.latent, generator=data, dtype=torch.float64).chunk(world)[rank]
        z = z.to(device, dtype)
        if step == 1:
            unroll.distributed.check_same_shapes((real, z))  # equal shards: the mean of means is the global mean
        d_params, d_state, d_value = d_step(d_params, d_state, real, G(z).detach())
        g_loss = surrogate(d_params, d_state, real, G(z))  # -L_D at theta_D^K (zero-sum game)
        g_opt.zero_grad()
        g_loss.backward()
        unroll.distributed.all_reduce_grads_(G.parameters())
        g_opt.step()
        if step == 10:  # time from here: the first steps pay for one-off allocations and the shape checks
            started = (time.perf_counter(), time.process_time())
        if step % args.log_every == 0 or step == args.steps:
            losses = torch.stack([d_value, g_loss.detach()])
            dist.all_reduce(losses)  # the global batch's losses: the mean over equal shards
            losses /= world
            if rank == 0:
                print(f"step {step:5d}  L_D {losses[0]:.6f}  f_K {losses[1]:.6f}", flush=True)
    if rank == 0:
        with torch.no_grad():
            fake = G(torch.randn(2500, args.latent, generator=torch.Generator().manual_seed(args.seed + 2),
                                 dtype=torch.float64).to(device, dtype))
        modes, quality = ring_quality(fake.double())
        print(f"modes within 3 std: {modes}/{RING_MODES}, samples within 3 std: {quality:.4f}")
        if started is not None and args.steps > 10:
            # Wall time is what a run takes; CPU time (of rank 0's process, all its threads) is the work, which a
            # machine shared with other jobs inflates less.
            wall, cpu = ((now - then) / (args.steps - 10) * 1e3
                         for now, then in zip((time.perf_counter(), time.process_time()), started))
            print(f"{world} process(es), {args.threads} thread(s) each: {wall:.2f} ms per iteration, rank 0's CPU "
                  f"time {cpu:.2f} ms per iteration (means over steps 11-{args.steps})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
