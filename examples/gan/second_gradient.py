"""Is the second term of Eq. 12 needed? The App. B.2 ablation of Metz et al. (2017), Figs. App.3 and App.4.

The generator's gradient of the unrolled surrogate f(θ_G, θ_D^K(θ_G, θ_D)) has two terms (Eq. 12): the direct
one, and the one that flows back through the K discriminator updates. Three configurations:

- ``full``: both terms (``unroll.surrogate_loss``);
- ``stop_grad``: the first term only (``stop_grad=True``: θ_D^K is a constant);
- ``stop_grad_avg``: the first term only, with the loss averaged over θ_D^1 .. θ_D^K (``average_over_steps``);

for K in {0, 1, 3, 5, 10}, in two regimes: one generator update per discriminator update, and five (the paper:
with D kept out of equilibrium, full unrolling needs 5 steps where the first term alone needs 10).

    python examples/gan/second_gradient.py                 # the sweep behind docs/results/second_gradient.md
    python examples/gan/second_gradient.py --resume        # continue it after a kill
    python examples/gan/second_gradient.py --report-only   # rewrite the page from the runs

Every cell is a run folder under ``--out`` (metrics.json/csv, density.png, checkpoint.pt); figures like App.3 and
App.4 go to ``--fig-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from unroll_examples import ablations as ab
from unroll_examples import report
from unroll_examples.sweeps import Cell, table
from unroll_examples.training import SIZE_FLAGS

# ---- configuration: TRAINING's fields dataset, steps, d_lr, g_lr, unroll_lr, eval_every and eval_samples are flags
# of their names (--d-lr ...) whose defaults are its values here (ablations.add_common_flags); the cells vary K,
# g_steps and CONFIGS' fields ----
TRAINING = dataclasses.replace(ab.COMMON, steps=2000)
STEPS_G5 = 800  # iterations of the five-G-step regime (--steps-g5)
CONFIGS: Dict[str, Dict[str, bool]] = {
    "full": {},
    "stop_grad": {"stop_grad": True},
    "stop_grad_avg": {"stop_grad": True, "average_over_steps": True},
}
CONFIG_TITLES = {"full": "full gradient (both terms of Eq. 12)", "stop_grad": "stop gradient (first term only)",
                 "stop_grad_avg": "stop gradient, loss averaged over k = 1..K"}
KS = (0, 1, 3, 5, 10)
REGIMES = (1, 5)  # generator updates per discriminator update
PAPER_CLAIM = {
    1: "no difference between with and without the second gradient: both need 3 unrolling steps to become stable "
       "(Fig. App.3)",
    5: "full unrolling needs 5 unrolling steps to converge, the first term alone needs 10 (Fig. App.4)",
}


def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/second_gradient", doc="docs/results/second_gradient.md")
    p.add_argument("--steps-g5", type=int, default=STEPS_G5,
                   help="iterations per run with five G updates per D update (each costs about five times more)")
    p.add_argument("--ks", type=SIZE_FLAGS["K"], nargs="+", default=list(KS),
                   help="unrolling steps (0 is shared by all)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="full: both terms of Eq. 12; stop_grad: the first only; stop_grad_avg: averaged over k")
    p.add_argument("--regimes", type=int, nargs="+", choices=REGIMES, default=list(REGIMES),
                   help="generator updates per discriminator update")
    return p


def build_cells(args: argparse.Namespace) -> List[Cell]:
    """K = 0 once per regime (no unrolling: the configurations coincide), then every configuration and K > 0."""
    if any(k < 0 for k in args.ks):
        raise ValueError(f"--ks must be >= 0, got {args.ks}")
    base = ab.base_config(args, TRAINING)
    cells = []
    for g_steps in args.regimes:
        steps = args.steps if g_steps == 1 else args.steps_g5
        group = f"g{g_steps}"
        if 0 in args.ks:
            cells.append(Cell(group, "K=0 (plain GAN)", dataclasses.replace(base, K=0, g_steps=g_steps, steps=steps),
                              args.seed_list))
        for name in args.configs:
            for K in sorted(k for k in args.ks if k > 0):
                cfg = dataclasses.replace(base, K=K, g_steps=g_steps, steps=steps, **CONFIGS[name])
                cells.append(Cell(group, f"{name}, K={K}", cfg, args.seed_list))
    return cells


def config_of(cell: Cell) -> Optional[str]:
    if cell.cfg.K == 0:
        return None
    return next(name for name, flags in CONFIGS.items()
                if cell.cfg.stop_grad == flags.get("stop_grad", False)
                and cell.cfg.average_over_steps == flags.get("average_over_steps", False))


def smallest_stable_k(cells: List[ab.CellMeta], name: str, n_modes: int, min_hq: float) -> str:
    """The smallest K at which every seed reaches stable coverage (what the paper's claim is about)."""
    for cell, meta in sorted(cells, key=lambda cm: cm[0].cfg.K):
        if meta is None or (cell.cfg.K > 0 and config_of(cell) != name):
            continue
        steps = ab.stable_steps(meta, n_modes, min_hq)
        if steps and all(s is not None for s in steps):
            return f"K = {cell.cfg.K}"
    return "none of the K run"


def write_report(args: argparse.Namespace, cells: List[Cell], log: Sequence[dict], command: str,
                 complete: bool) -> None:
    intro = ("Configurations: " + "; ".join(f"**{n}** = {CONFIG_TITLES[n]}" for n in args.configs) + ". "
             "K = 0 is the plain GAN, the same for every configuration.")
    metas, n_modes, lines = ab.start_page("The second gradient term (Metz et al. 2017, App. B.2): measured over seeds",
                                          intro, args, cells, command, complete)
    main_figure = None
    for g_steps in args.regimes:
        group = [(c, m) for c, m in metas if c.group == f"g{g_steps}"]
        regime = "one generator update" if g_steps == 1 else f"{g_steps} generator updates"
        lines += [f"## {regime} per discriminator update", ""]
        lines += [ab.results_table(group, args, n_modes, log), ""]
        claim_rows = [[n, smallest_stable_k(group, n, n_modes, args.min_hq)] for n in args.configs]
        lines += [f"Paper (App. B.2): {PAPER_CLAIM[g_steps]}. Here, the smallest K at which every seed reaches "
                  f"stable coverage within the run:", "",
                  table(claim_rows, ["configuration", "smallest K with all seeds settled"]), ""]
        drawn = ab.draw_figure(group, Path(args.out), args, f"second_gradient_g{g_steps}",
                               f"{args.dataset}, {regime} per D update (seed {args.seed_list[0]})")
        if main_figure is None:  # the first regime's figure opens the page, after its verdict
            main_figure = drawn
        elif drawn is not None:
            lines += [report.figure(Path(args.doc), *drawn), ""]
    lines += ab.per_seed_json(args, metas, n_modes, command, {})
    ab.write_page(Path(args.doc), lines, log, report.opening(Path(args.doc), main_figure))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return ab.main_for("second_gradient.py", build_parser(), build_cells, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
