"""The cheap approximation of unrolling that the Discussion of Metz et al. (2017) suggests, on the 2-D mixture.

Sec. 4: "it may be sufficient to further perturb the training gradient in the same direction that a single
unrolling step perturbs it". The generator's gradient is

    g_alpha = g_0 + alpha (g_1 - g_0)

where g_0 is the plain GAN's gradient (K = 0) and g_1 the one-step unrolled gradient (Eq. 12 with K = 1):
``unroll.extrapolated_surrogate_loss``. It costs one unrolled step, whatever alpha. Rows, on paired seeds:

- K = 0 (plain GAN), K = 1, K = 5, K = 10 (the full unrolled gradient);
- ``alpha`` in {1, 2, 5, 10} (alpha = 1 trains K = 1 to the last bit of the parameters, so its row is the K = 1
  run);
- the compute-matched control: D takes K + 1 committed steps per iteration and G the plain gradient (K = 1
  matches the extrapolation's one look-ahead step).

The question: does some alpha reach K = 10's stable coverage at <= 1.5x the plain GAN's cost per
iteration? The cost is measured after training: every cell's vmapped iteration is timed in the same process,
the cells interleaved over several rounds (median), so that the load of a shared machine falls on all alike.

    python examples/gan/extrapolation.py --threads 1 --no-progress   # the sweep behind docs/results/extrapolation.md
    python examples/gan/extrapolation.py --resume                    # continue it after a kill
    python examples/gan/extrapolation.py --report-only               # rewrite the page from the runs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import Tensor

import unroll
from lib import ablations as ab
from lib.sweeps import Cell, CellMeta
from lib.training import SIZE_FLAGS, GeneratorRule, StepInputs, Strategies, TrainConfig, d_inner_loss

# ---- configuration: TRAINING's fields dataset, steps, d_lr, g_lr, unroll_lr, eval_every and eval_samples are flags
# of their names (--d-lr ...) whose defaults are its values here (ablations.add_common_flags); the cells vary K,
# control and the generator's rule ----
TRAINING = dataclasses.replace(ab.COMMON, steps=2000)
ALPHAS = (1.0, 2.0, 5.0, 10.0)
KS = (0, 1, 5, 10)
CONTROL_KS = (1,)  # extra committed D steps: 1 matches the extrapolation's single look-ahead step
GOAL_COST = 1.5  # the goal: K = 10's stable coverage at <= 1.5x the plain GAN's cost per iteration
GOAL_K = 10


@dataclass(frozen=True)
class Extrapolated(GeneratorRule):
    """One-step extrapolation of the unrolled gradient (Sec. 4, Discussion): G's loss f_0 + alpha (f_1 - f_0)
    (saturating, as the plain and unrolled rows), whose gradient is g_0 + alpha (g_1 - g_0), g_1 Eq. 12's with
    K = 1. ``surrogate``: ``unroll.extrapolated_surrogate_loss`` (:func:`extrapolated`)."""

    activation: str
    surrogate: Callable[..., Tensor]

    def sample_loss(self, fake: Tensor, d: Dict[str, Tensor], d_state: Dict[str, Any], extra: Dict[str, Tensor],
                    inputs: StepInputs) -> Tensor:
        return self.surrogate(d, d_state, inputs.x, fake)


def extrapolated(cfg: TrainConfig, alpha: float) -> Strategies:
    """G's rule :class:`Extrapolated` with factor ``alpha``, its look-ahead step Adam at ``cfg.lookahead_lr`` from
    D's current state; D trains plainly."""
    surrogate = unroll.extrapolated_surrogate_loss(
        d_inner_loss, alpha, optimizer=unroll.adam(cfg.lookahead_lr, betas=(cfg.beta1, cfg.beta2)))
    return Strategies(generator=Extrapolated(cfg.activation, surrogate))


def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/extrapolation", doc="docs/results/extrapolation.md")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="extrapolation factors")
    p.add_argument("--ks", type=SIZE_FLAGS["K"], nargs="+", default=list(KS),
                   help="unrolling steps of the reference rows")
    p.add_argument("--control", type=SIZE_FLAGS["K"], nargs="*", default=list(CONTROL_KS),
                   help="compute-matched controls: D takes K + 1 committed steps per iteration (none: no control)")
    ab.add_timing_flags(p)
    return p


def build_cells(args: argparse.Namespace) -> List[Cell]:
    """K = 0 first (the cost reference), then the cheap rows, then the expensive K, largest first."""
    if 0 not in args.ks:
        raise ValueError(f"--ks must include 0 (the plain GAN, the cost reference), got {args.ks}")
    if any(k < 0 for k in args.ks) or any(k < 1 for k in args.control):
        raise ValueError(f"--ks must be >= 0 and --control >= 1, got {args.ks} and {args.control}")
    base = ab.base_config(args, TRAINING)  # not args.control: that flag is the list of controls
    seeds = args.seed_list

    def unrolled(K: int) -> Cell:
        return Cell("main", "K=0 (plain GAN)" if K == 0 else f"K={K}", dataclasses.replace(base, K=K), seeds)

    ks = sorted(set(args.ks))
    cells = [unrolled(0)] + [unrolled(K) for K in ks if K == 1]
    cfg = dataclasses.replace(base, K=1)  # one look-ahead step (the extrapolated rule replaces the surrogate)
    for alpha in args.alphas:
        if alpha == 1:  # trains exactly like K = 1, bit for bit (tests/test_extrapolation_mixture.py): one run
            cells.append(Cell("main", "extrapolated α=1 (the K=1 run)", cfg, seeds))
            continue
        cells.append(Cell("main", f"extrapolated α={alpha:g}", cfg, seeds, tag=f"alpha{alpha:g}",
                          strategies=extrapolated(cfg, alpha)))
    cells += [Cell("main", f"control, {K + 1} D steps", dataclasses.replace(base, K=K, control=True),
                   seeds)
              for K in sorted(set(args.control))]
    cells += [unrolled(K) for K in sorted((k for k in ks if k > 1), reverse=True)]  # the goal's K = 10 first
    return cells


# ---- the page ----
def goal_verdict(metas: Sequence[CellMeta], costs: Dict[str, float], n_modes: int, min_hq: float) -> str:
    """Which extrapolated rows settle in at least as many seeds as K = GOAL_K, no later (median), at <= GOAL_COST
    times K = 0's measured cost."""
    by_label = {c.label: (c, m) for c, m in metas if m is not None}
    reference, plain = by_label.get(f"K={GOAL_K}"), by_label.get("K=0 (plain GAN)")
    if reference is None or plain is None or plain[0].folder not in costs:
        return ""

    def score(meta: Dict[str, Any]) -> tuple:
        steps = ab.stable_steps(meta, n_modes, min_hq)
        settled = sorted(s for s in steps if s is not None)
        median = statistics.median(settled + [float("inf")] * (len(steps) - len(settled)))
        return len(settled), median

    ref_settled, ref_median = score(reference[1])
    if ref_settled == 0:
        return f"**Goal** not testable: K={GOAL_K} settled in no seed within the run."
    winners = []
    for label, (cell, meta) in by_label.items():
        if not label.startswith("extrapolated") or cell.folder not in costs:
            continue
        settled, median = score(meta)
        relative = costs[cell.folder] / costs[plain[0].folder]
        if settled >= ref_settled and median <= ref_median and relative <= GOAL_COST:
            winners.append(f"{label} ({settled} settled, {relative:.2f}× K=0's cost)")
    found = "; ".join(winners) if winners else "no extrapolated row"
    return (f"**Goal** (K={GOAL_K}'s stable coverage, {ref_settled} settled, median "
            f"{'not settled' if ref_median == float('inf') else f'{ref_median:g}'}, at ≤ {GOAL_COST:g}× the plain "
            f"GAN's cost per iteration): met by {found}.")


def write_report(args: argparse.Namespace, cells: List[Cell], log: Sequence[dict], command: str,
                 complete: bool) -> None:
    intro = ("Rows: **K=k**: the unrolled surrogate with k look-ahead steps (full gradient of Eq. 12); "
             "**extrapolated α**: `unroll.extrapolated_surrogate_loss`, gradient g_0 + α(g_1 − g_0) (one "
             "look-ahead step, whatever α; α = 1 is K = 1); **control, k+1 D steps**: no unrolling, D takes k + 1 "
             "committed Adam steps per iteration (k at the look-ahead lr), the compute-matched control. "
             "**cost vs K=0**: each cell's iteration (all seeds vmapped, no evaluation) timed in one process after "
             f"training, the cells interleaved over {args.timing_rounds} rounds of {args.timing_iterations} "
             "iterations (median), divided by K = 0's; the s / iteration column is the training wall time "
             "(evaluations and checkpoints included), taken while other jobs shared the machine.")
    metas, n_modes, lines = ab.start_page("One-step extrapolation of the unrolled gradient (Metz et al. 2017, Sec. 4)",
                                          intro, args, cells, command, complete)
    costs = ab.timings(args, cells, complete) or {}
    lines += ["## Results", "", ab.timed_results_table(metas, args, n_modes, log, costs), ""]
    verdict = goal_verdict(metas, costs, n_modes, args.min_hq)
    if verdict:
        lines += [verdict, ""]
    lines += ab.figure_markdown(metas, Path(args.out), args, "extrapolation",
                                f"{args.dataset}: extrapolation, unrolling and control (seed {args.seed_list[0]})")
    lines += ab.per_seed_json(args, metas, n_modes, command, costs)
    ab.write_page(Path(args.doc), lines, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return ab.main_for("extrapolation.py", build_parser(), build_cells, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
