"""Unrolled GAN on a 2-D mixture of Gaussians (Metz et al., 2017, Sec. 3.1 and App. A), several seeds at once.

    python examples/gan/mixture.py --K 10 --unroll-lr 1e-3 --seeds 0-4 --steps 5000

writes ``metrics.json``, ``metrics.csv``, ``density.png`` (rows = seeds, columns = training steps, last column the
data; all three at every evaluation) and ``checkpoint.pt`` (at every evaluation and every --checkpoint-every
iterations) to ``--out``; ``--resume`` continues a killed run with identical results. One run writes to a folder
at a time; a NaN or infinity in a loss, parameter or Adam state stops the run naming its iteration and seed
(exit code 3).

    torchrun --nproc_per_node 2 examples/gan/mixture.py ...     # data-parallel: the same numbers (docs/distributed.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lib import cli, parallel, runs
from lib.cli import MAX_SEEDS, HelpFormatter, add_threads_flag, parse_seeds
from lib.data import DATASETS
from lib.runs import CHECKPOINT
from lib.training import (
    DEFAULT_CHECKPOINT_EVERY,
    LOSSES,
    SIZE_FLAGS,
    UNROLL_BATCHES,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    run_name,
)

# ---- configuration: App. A unless a flag says otherwise ----
DEFAULTS = TrainConfig()
DEFAULT_SEEDS = "0-4"
DEFAULT_OUT = "runs/mixture"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    d = DEFAULTS
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="the 2-D mixture")
    p.add_argument("--weight-std", type=cli.nonnegative_float, default=d.weight_std,
                   help="std of the non-uniform mode weights (0 = uniform; the PyTorch port's prior_std)")
    p.add_argument("--weight-seed", type=cli.seed, default=d.weight_seed, help="seed of the mode-weight draw")
    p.add_argument("--K", type=SIZE_FLAGS["K"], default=d.K, help="unrolled discriminator steps")
    p.add_argument("--stop-grad", action="store_true", help="first term of Eq. 12 only (App. B.2)")
    p.add_argument("--average-over-steps", action="store_true",
                   help="G's loss averaged over the K unrolled discriminators (App. B.2)")
    p.add_argument("--unroll-batches", choices=UNROLL_BATCHES, default=d.unroll_batches,
                   help="look-ahead steps on the current minibatch, or on fresh ones")
    p.add_argument("--control", action="store_true",
                   help="compute-matched control: K+1 committed D steps per G step (the K extra at the "
                        "--unroll-lr), no unrolling")
    p.add_argument("--g-steps", type=SIZE_FLAGS["g_steps"], default=d.g_steps,
                   help="generator updates per discriminator update")
    p.add_argument("--steps", type=int, default=d.steps, help="training iterations (one D + g-steps G updates)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help=f"e.g. 0-9 or 0,3,7: trained together (vmapped), at most {MAX_SEEDS}")
    p.add_argument("--d-lr", type=cli.learning_rate, default=d.d_lr,
                   help="discriminator Adam learning rate (App. A)")
    p.add_argument("--g-lr", type=cli.learning_rate, default=d.g_lr, help="generator Adam learning rate (App. A)")
    p.add_argument("--unroll-lr", type=cli.learning_rate, default=None,
                   help="learning rate of the K look-ahead Adam steps (default: --d-lr)")
    p.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1 of both players (App. A)")
    p.add_argument("--activation", choices=("relu", "tanh"), default=d.activation, help="generator activation")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="saturating: G minimises -L_D (App. A); nonsaturating: -log D(G(z))")
    p.add_argument("--batch", type=SIZE_FLAGS["batch"], default=d.batch, help="minibatch size (App. A)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="iterations between evaluations (metrics, density.png and a checkpoint)")
    p.add_argument("--eval-samples", type=SIZE_FLAGS["eval_samples"], default=d.eval_samples,
                   help="generator samples per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help="iterations between checkpoints besides those at evaluations (what a kill can lose)")
    p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT}/<settings>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (the same settings; --steps may grow)")
    add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse and validate every flag; any problem is an argparse error before any work starts. Nothing is written:
    the output folder is checked when :func:`main` takes it (:func:`runs.claim`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        cfg = TrainConfig(dataset=args.dataset, weight_std=args.weight_std, weight_seed=args.weight_seed, K=args.K,
                          stop_grad=args.stop_grad, average_over_steps=args.average_over_steps,
                          unroll_batches=args.unroll_batches, control=args.control, g_steps=args.g_steps,
                          steps=args.steps, d_lr=args.d_lr, g_lr=args.g_lr, unroll_lr=args.unroll_lr,
                          beta1=args.beta1, activation=args.activation, loss=args.loss, batch=args.batch,
                          eval_every=args.eval_every, eval_samples=args.eval_samples)
        cfg.validate()
        if args.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / run_name(cfg)
    return args, cfg, seeds, out


def summarize(records: List[Dict], step: int, n_modes: int) -> str:
    """The last evaluation, strict modes and HQ first: a diffuse cloud covers every mode by the lenient count."""
    rows = [r for r in records if r["step"] == step]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines = [f"step {step}, mean over {len(rows)} seeds: {mean('modes_strict'):.2f} of {n_modes} modes (strict), "
             f"{100 * mean('hq'):.1f}% high-quality samples, reverse KL {mean('reverse_kl'):.3f} (lenient modes "
             f"{mean('modes'):.2f}, energy distance {mean('energy'):.4f})"]
    lines += [f"  seed {r['seed']}: {r['modes_strict']} strict modes, {100 * r['hq']:.1f}% HQ, reverse KL "
              f"{r['reverse_kl']:.3f} (lenient {r['modes']})" for r in rows]
    lines.append("strict: a mode counts if it gets at least 1% of the high-quality samples its weight predicts; "
                 "high-quality (HQ): within 3 std of a mode. A ring learned is all modes strict with many HQ "
                 "samples; a diffuse cloud covers all modes leniently with almost no HQ samples.")
    return "\n".join(lines)


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg, seeds, out = parse_args(argv)
    ranks = parallel.from_environment(cfg.batch)  # None without torchrun
    # The checkpoint is read and checked (a throwaway Trainer) before claim stores the settings: a refused resume
    # changes nothing.
    check = (lambda: Trainer(cfg, seeds, out_dir=out, resume=True)) if args.resume else None
    with parallel.claim(out, ranks, resume=args.resume, settings={**dataclasses.asdict(cfg), "seeds": seeds},
                        may_change=("steps",), validate=check):
        torch.set_num_threads(args.threads)
        trainer = Trainer(cfg, seeds, out_dir=out, resume=args.resume, progress=not args.no_progress,
                          checkpoint_every=args.checkpoint_every, parallel=ranks)
        print(f"{out}: {dataclasses.asdict(cfg)} seeds {seeds}", file=sys.stderr)
        try:
            records = trainer.run()
        except TrainingDiverged as error:
            print(f"error: {error} (see {out})", file=sys.stderr)
            return 3
    print(summarize(records, trainer.step, trainer.mixture.n_modes))
    print(f"outputs in {out}: metrics.json, metrics.csv, density.png, {CHECKPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
