"""The headline of Metz et al. (2017), Fig. 2, in a few minutes: the plain GAN collapses, the unrolled GAN learns
the ring.

    python examples/gan/fig2.py            # K = 0, K = 5 and the step-matched control, 3 paired seeds
    python examples/gan/fig2.py --paper    # App. A's learning rates (1e-4) and K = 10: about an hour (mixture_app_a.md)

Trains, on the paper's ring of 8 Gaussians, the plain GAN (K = 0), an unrolled GAN (K unrolled discriminator
steps) and the step-matched control (K + 1 committed discriminator steps per generator step, no unrolling:
what unrolling must beat to be more than "more D steps"), each for the same paired seeds (same initial
parameters and data), all seeds of a configuration at once with ``torch.func.vmap``, the configurations in
parallel processes (one per core). Writes to ``--out``: ``fig2.png`` (rows = configurations, seed 0; columns =
training iterations; last column the data), ``summary.json`` (the table below, per seed), and one run folder per
configuration with its ``metrics.json``, ``metrics.csv``, ``density.png`` and ``checkpoint.pt``; prints a table
(strict modes, HQ %, reverse KL, stable coverage) and a one-line verdict. ``--resume`` continues a killed run.

The default setting is the one measured to converge on a CPU budget (docs/results/second_gradient.md): Adam at
lr 1e-3 for D, G and the look-ahead steps. App. A's 1e-4 is ``--paper``: there K = 10 settles too, but only
after 6,500-9,500 iterations, about 50 minutes of one core (docs/results/mixture_app_a.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from unroll_examples import cli, runs
from unroll_examples.ablations import MIN_HQ, describe_stable, n_modes_of, stable_steps
from unroll_examples.cli import HelpFormatter, parse_seeds
from unroll_examples.sweeps import (
    Cell,
    check_sweep,
    figure_for,
    final_records,
    finite_records,
    fmt,
    read_cell,
    run_cell,
    summary_stats,
    table,
)
from unroll_examples.training import TrainConfig

# ---- configuration: the named presets (--paper picks "paper"); K is the unrolled GAN's, and K = 0 and the control
# (K + 1 committed D steps) run beside it with the same other fields ----
CONFIGS = {
    # measured: K = 5 settles by ~1,250 iterations
    "converging": TrainConfig(d_lr=1e-3, g_lr=1e-3, unroll_lr=1e-3, K=5, steps=2000, eval_every=250),
    # App. A; Fig. 2 shows K = 10
    "paper": TrainConfig(d_lr=1e-4, g_lr=1e-4, unroll_lr=1e-4, K=10, steps=10_000, eval_every=250),
}
FLAGS = ("dataset", "K", "steps", "eval_every")
"""The fields a flag may override (``--K`` ...); the others are the preset's."""
DEFAULT_OUT = "runs/fig2"


@dataclass(frozen=True)
class RunOptions:
    """Which seeds, where the outputs go and how the configurations are trained."""

    seeds: str = cli.option("0-2", "paired seeds, e.g. 0-2 or 0,3,7")
    no_control: bool = cli.option(False, "skip the step-matched control")
    workers: int = cli.option(min(2, torch.get_num_threads() or 1),
                              "configurations trained at once, each in its own process on one thread")
    out: str = cli.option(DEFAULT_OUT, "output folder", type=cli.folder)
    resume: bool = cli.option(False, "continue a killed run in --out (the same settings)")
    no_progress: bool = cli.option(False, "no progress bar")


RUN = RunOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    converging, paper = CONFIGS["converging"], CONFIGS["paper"]
    p.add_argument("--paper", action="store_true",
                   help=f"App. A's settings, the paper preset: {cli.changed_fields(paper, converging)} (default: "
                        f"the converging preset {cli.changed_fields(converging, paper)})")
    cli.add_config_flags(p, converging, presets=CONFIGS, only=FLAGS,
                         title="training (unroll_examples/training.py TrainConfig)",
                         helps={"K": "unrolled discriminator steps of the unrolled GAN",
                                "steps": "training iterations (one D + one G update)"})
    cli.add_config_flags(p, RUN)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[Cell]]:
    """Every flag checked, and the configurations built, before any work starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base = cli.config_from_args(args, CONFIGS["paper" if args.paper else "converging"])
    try:
        if base.K < 1:
            raise ValueError(f"--K must be >= 1 (the unrolled GAN; K = 0 always runs beside it), got {base.K}")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        seeds = tuple(parse_seeds(args.seeds))
        K = base.K
        cells = [Cell("fig2", f"unrolled, K={K}", base, seeds),
                 Cell("fig2", "plain GAN, K=0", dataclasses.replace(base, K=0), seeds)]
        if not args.no_control:
            cells.append(Cell("fig2", f"control, {K + 1} D steps", dataclasses.replace(base, control=True), seeds))
        for cell in cells:
            cell.cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    return args, cells


def train_all(cells: Sequence[Cell], out: Path, workers: int, progress: bool) -> Dict[str, float]:
    """Train every configuration (the unrolled one first: it takes longest); returns seconds per iteration."""
    def task(i: int) -> Tuple[int, float]:
        torch.set_num_threads(1)  # one thread is the fastest for these small models (examples/gan/README.md)
        log: List[Dict[str, Any]] = []
        run_cell(cells[i], out / cells[i].folder, progress and i == 0, log)
        spent = [e for e in log if e["to_step"] > e["from_step"]]
        per_iteration = (sum(e["seconds"] for e in spent) / sum(e["to_step"] - e["from_step"] for e in spent)
                         if spent else float("nan"))
        return i, per_iteration

    costs: Dict[str, float] = {}

    def done(result: Tuple[int, float]) -> None:
        i, per_iteration = result
        costs[cells[i].label] = per_iteration
        print(f"done: {cells[i].label}", file=sys.stderr, flush=True)

    if workers > 1 and runs.can_fork():
        runs.run_in_workers(task, range(len(cells)), min(workers, len(cells)), done)
    else:
        for i in range(len(cells)):
            done(task(i))
    return costs


def summarize(cell: Cell, meta: Dict[str, Any], n_modes: int, cost: float) -> Dict[str, Any]:
    """Final metrics (mean ± s.e. over seeds), stable coverage per seed, and cost."""
    records = finite_records(final_records(meta))
    stats = {k: summary_stats([r[k] for r in records]) for k in ("modes_strict", "hq", "reverse_kl", "modes")}
    return {"label": cell.label, "K": cell.cfg.K, "control": cell.cfg.control, "status": meta["status"],
            "step": max(r["step"] for r in meta["records"]), "stats": stats,
            "stable_steps": stable_steps(meta, n_modes, MIN_HQ), "seconds_per_iteration": cost,
            "per_seed": final_records(meta)}


def verdict(rows: Sequence[Dict[str, Any]], n_modes: int) -> str:
    """One line: what each configuration did, in words."""
    def said(row: Dict[str, Any]) -> str:
        steps, stats = row["stable_steps"], row["stats"]
        settled, n = sum(s is not None for s in steps), len(steps)
        strict, kl, hq = stats["modes_strict"]["mean"], stats["reverse_kl"]["mean"], 100 * stats["hq"]["mean"]
        if settled:
            what = f"learns all {n_modes} modes in {settled}/{n} seeds ({describe_stable(steps)}, {hq:.0f}% HQ)"
        elif kl > 1.0:  # most samples on one or two modes (a uniform spread has reverse KL 0, one mode log 8)
            what = f"collapses ({strict:.1f} of {n_modes} modes strict, reverse KL {kl:.2f})"
        else:
            what = f"spreads without learning the modes ({strict:.1f} of {n_modes} strict, {hq:.1f}% HQ)"
        return f"{row['label']} {what}"

    return "; ".join(said(row) for row in rows) + "."


def main_table(rows: Sequence[Dict[str, Any]], n_modes: int) -> str:
    plain = next((r["seconds_per_iteration"] for r in rows if r["K"] == 0), float("nan"))
    body = [[r["label"], f"{r['step']}", fmt(r["stats"]["modes_strict"], digits=1) + f" of {n_modes}",
             fmt(r["stats"]["hq"], 100, 1), fmt(r["stats"]["reverse_kl"], digits=3),
             describe_stable(r["stable_steps"]), f"{r['seconds_per_iteration'] / plain:.1f}×"] for r in rows]
    return table(body, ["configuration", "iterations", "strict modes", "HQ %", "reverse KL",
                        "stable coverage (iteration)", "cost / iteration vs K=0"])


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.time()
    args, cells = parse_args(argv)
    out = Path(args.out)
    settings = {"cells": [dataclasses.asdict(c.cfg) for c in cells], "seeds": list(cells[0].seeds)}
    with runs.claim(out, resume=args.resume, settings=settings, validate=lambda: check_sweep(cells, out)):
        costs = train_all(cells, out, args.workers, not args.no_progress)
        metas = [(cell, read_cell(cell, out / cell.folder)) for cell in cells]
        n_modes = n_modes_of(args.dataset)
        rows = [summarize(cell, meta, n_modes, costs.get(cell.label, float("nan"))) for cell, meta in metas]
        # The figure's rows: plain GAN first, then the unrolled GAN, then the control (as Fig. 2's two rows).
        order = [1, 0] + list(range(2, len(cells)))
        title = f"{args.dataset}: plain GAN, unrolled GAN and the control (seed {cells[0].seeds[0]})"
        figure_for(args.dataset, [metas[i] for i in order], out, out / "fig2.png", title=title)
        line = verdict([rows[i] for i in order], n_modes)
        runs.write_json(out / "summary.json", {"rows": rows, "verdict": line, "wall_seconds": time.time() - start})
    print(main_table([rows[i] for i in order], n_modes))
    print(f"\n{line}")
    print("strict modes: a mode counts if it gets at least 1% of the high-quality samples its weight predicts; "
          "HQ: within 3 std of a mode; stable coverage: all modes strict with >= 5% HQ from that evaluation on. "
          "A learned ring is all modes strict with many HQ samples; a collapsed GAN covers one or two.")
    print(f"figure: {out / 'fig2.png'}; per configuration: {out}/fig2/*/metrics.json")
    print(f"wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
