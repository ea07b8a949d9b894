"""Unrolled GAN on a 2-D mixture of Gaussians (Metz et al., 2017, Sec. 3.1 and App. A), several seeds at once.

    python examples/gan/mixture.py --K 10 --unroll-lr 1e-3 --seeds 0-4 --steps 5000

writes ``metrics.json``, ``metrics.csv``, ``density.png`` (rows = seeds, columns = training steps, last column the
data) and ``checkpoint.pt`` to ``--out``; ``--resume`` continues a killed run with identical results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from data import DATASETS
from training import CHECKPOINT, LOSSES, UNROLL_BATCHES, TrainConfig, Trainer, TrainingDiverged

# ---- configuration: App. A unless a flag says otherwise ----
DEFAULTS = TrainConfig()
DEFAULT_SEEDS = "0-4"
DEFAULT_OUT = "runs/mixture"


def parse_seeds(text: str) -> List[int]:
    """``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,7"``) -> sorted distinct non-negative seeds."""
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            low, high = int(lo), int(hi)
            if high < low:
                raise ValueError(f"empty seed range {part!r}")
            seeds.extend(range(low, high + 1))
        else:
            seeds.append(int(part))
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--weight-std", type=float, default=d.weight_std,
                   help="std of the non-uniform mode weights (0 = uniform; the PyTorch port's prior_std)")
    p.add_argument("--weight-seed", type=int, default=d.weight_seed, help="seed of the mode-weight draw")
    p.add_argument("--K", type=int, default=d.K, help="unrolled discriminator steps")
    p.add_argument("--stop-grad", action="store_true", help="first term of Eq. 12 only (App. B.2)")
    p.add_argument("--average-over-steps", action="store_true",
                   help="G's loss averaged over the K unrolled discriminators (App. B.2)")
    p.add_argument("--unroll-batches", choices=UNROLL_BATCHES, default=d.unroll_batches,
                   help="look-ahead steps on the current minibatch, or on fresh ones")
    p.add_argument("--control", action="store_true",
                   help="compute-matched control: K+1 committed D steps per G step (the K extra at the "
                        "--unroll-lr), no unrolling")
    p.add_argument("--g-steps", type=int, default=d.g_steps, help="generator updates per discriminator update")
    p.add_argument("--steps", type=int, default=d.steps, help="training iterations (one D + g-steps G updates)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="e.g. 0-9 or 0,3,7 (trained together, vmapped)")
    p.add_argument("--d-lr", type=float, default=d.d_lr)
    p.add_argument("--g-lr", type=float, default=d.g_lr)
    p.add_argument("--unroll-lr", type=float, default=None,
                   help="learning rate of the K look-ahead Adam steps (default: --d-lr)")
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--activation", choices=("relu", "tanh"), default=d.activation, help="generator activation")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="saturating: G minimises -L_D (App. A); nonsaturating: -log D(G(z))")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT}/<settings>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def run_name(cfg: TrainConfig) -> str:
    """A folder name that tells the settings apart."""
    kind = f"control{cfg.K}" if cfg.control else f"K{cfg.K}"
    parts = [cfg.dataset, kind, f"ulr{cfg.lookahead_lr:g}", f"glr{cfg.g_lr:g}", cfg.activation, cfg.loss[:3]]
    # Settings added after the first sweep are named only when they differ from the default, so that the
    # folders of earlier runs keep their names.
    if cfg.d_lr != DEFAULTS.d_lr:
        parts.append(f"dlr{cfg.d_lr:g}")
    if cfg.g_steps != DEFAULTS.g_steps:
        parts.append(f"g{cfg.g_steps}")
    if cfg.stop_grad:
        parts.append("stopgrad")
    if cfg.average_over_steps:
        parts.append("avg")
    if cfg.unroll_batches != "fixed":
        parts.append(cfg.unroll_batches)
    if cfg.weight_std:
        parts.append(f"wstd{cfg.weight_std:g}")
    return "_".join(parts)


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse and validate every flag; any problem is an argparse error before any work starts."""
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
    except ValueError as error:
        parser.error(str(error))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / run_name(cfg)
    checkpoint = out / CHECKPOINT
    if args.resume and not checkpoint.exists():
        parser.error(f"--resume: there is no {checkpoint}")
    if not args.resume and checkpoint.exists():
        parser.error(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return args, cfg, seeds, out


def summarize(records: List[Dict], step: int) -> str:
    rows = [r for r in records if r["step"] == step]
    lines = [f"step {step}: " + ", ".join(f"seed {r['seed']}: {r['modes']} modes, {100 * r['hq']:.1f}% HQ, "
                                            f"rKL {r['reverse_kl']:.3f}" for r in rows)]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    lines.append(f"mean over {len(rows)} seeds: {mean('modes'):.2f} modes ({mean('modes_strict'):.2f} strict), "
                 f"{100 * mean('hq'):.1f}% HQ, reverse KL {mean('reverse_kl'):.3f}, energy {mean('energy'):.4f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, cfg, seeds, out = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    trainer = Trainer(cfg, seeds, out_dir=out, resume=args.resume, progress=not args.no_progress)
    print(f"{out}: {dataclasses.asdict(cfg)} seeds {seeds}", file=sys.stderr)
    try:
        records = trainer.run()
    except TrainingDiverged as error:
        print(f"error: {error} (see {out})", file=sys.stderr)
        trainer.save_figure()
        return 3
    print(summarize(records, trainer.step))
    print(f"outputs in {out}: metrics.json, metrics.csv, density.png, {CHECKPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
