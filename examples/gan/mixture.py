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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from unroll_examples import cli, parallel, runs
from unroll_examples.cli import MAX_SEEDS, HelpFormatter, add_threads_flag, parse_seeds
from unroll_examples.runs import CHECKPOINT, FINAL
from unroll_examples.training import DEFAULT_CHECKPOINT_EVERY, DENSITY, TrainConfig, Trainer, run_name

# ---- configuration: every field of TRAINING and RUN is a flag of its name (weight_std -> --weight-std) whose
# default is the field's value here (cli.add_config_flags); --help lists each with its default ----
TRAINING = TrainConfig()
"""App. A's settings: the defaults of :class:`unroll_examples.training.TrainConfig`, where each field's help and check
sit."""
DEFAULT_OUT = "runs/mixture"


@dataclass(frozen=True)
class RunOptions:
    """Which seeds, where the outputs go and how the run is carried out (``--threads``: unroll_examples/cli.py)."""

    seeds: str = cli.option("0-4", f"e.g. 0-9 or 0,3,7: trained together (vmapped), at most {MAX_SEEDS}")
    checkpoint_every: int = cli.option(DEFAULT_CHECKPOINT_EVERY, "iterations between checkpoints besides those "
                                                                 "at evaluations (what a kill can lose)")
    out: Optional[str] = cli.option(None, f"output folder (default: {DEFAULT_OUT}/<settings>)", type=cli.folder)
    resume: bool = cli.option(False, "continue from <out>/checkpoint.pt (the same settings; --steps may grow)")
    no_progress: bool = cli.option(False, "no tqdm bar")


RUN = RunOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    cli.add_config_flags(p, TRAINING, title="training (unroll_examples/training.py TrainConfig)")
    cli.add_config_flags(p, RUN)
    add_threads_flag(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, TrainConfig, List[int], Path]:
    """Parse and validate every flag; any problem is an argparse error before any work starts. Nothing is written:
    the output folder is checked when :func:`main` takes it (:func:`runs.claim`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        cfg = cli.config_from_args(args, TRAINING)
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
        except runs.Diverged as error:
            print(f"error: {error} (see {out})", file=sys.stderr)
            return 3
    print(summarize(records, trainer.step, trainer.mixture.n_modes))
    print(f"training time {trainer.train_seconds:.1f} s, {1e3 * trainer.train_seconds / max(trainer.step, 1):.1f} ms "
          f"per iteration (evaluations and checkpoints excluded)")
    print(f"outputs in {out}: metrics.json, metrics.csv, density.png, {DENSITY}, {FINAL}, {CHECKPOINT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
