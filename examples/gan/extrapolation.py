"""The cheap approximation of unrolling that the Discussion of Metz et al. (2017) suggests, on the 2-D mixture.

Sec. 4: "it may be sufficient to further perturb the training gradient in the same direction that a single
unrolling step perturbs it". The generator's gradient is

    g_alpha = g_0 + alpha (g_1 - g_0)

where g_0 is the plain GAN's gradient (K = 0) and g_1 the one-step unrolled gradient (Eq. 12 with K = 1):
``unroll.extrapolated_surrogate_loss``. It costs one unrolled step, whatever alpha. Rows, on paired seeds:

- K = 0 (plain GAN), K = 1, K = 5, K = 10 (the full unrolled gradient);
- ``alpha`` in {1, 2, 5, 10} (alpha = 1 trains K = 1 to the last bit of the parameters, so its row is the K = 1
  run);
- controls: D takes n committed steps per iteration and G the plain gradient (``--control`` gives n - 1). The
  step-matched control has n = 2 (one extra D step for the extrapolation's one look-ahead step); the cost-matched
  control has the n whose measured cost per iteration is closest to the extrapolated rows' (``--match-cost``).

The questions: does some alpha reach K = 10's stable coverage at <= 1.5x the plain GAN's cost per iteration, and
does the direction g_1 - g_0 buy anything that the same compute spent on committed D steps does not? The cost is
measured after training: every cell's vmapped iteration is timed in the same process, the cells interleaved over
several rounds (median), so that the load of a shared machine falls on all alike.

    python examples/gan/extrapolation.py --threads 1 --no-progress   # the sweep behind docs/results/extrapolation.md
    python examples/gan/extrapolation.py --resume                    # continue it after a kill
    python examples/gan/extrapolation.py --report-only               # rewrite the page from the runs
    # the cost-matched control: time the extrapolated rows beside controls of 2..8 D steps (interleaved, no
    # training; writes <fig-dir>/cost_match.json), then train with --control set to the closest count minus one
    python examples/gan/extrapolation.py --match-cost --alphas 5 10 --ks 0 --seeds 0-9 --doc <page>
    # docs/results/extrapolation_matched.md (the cost-matched control, 6 D steps; --dataset ring-veegan and
    # --out/--doc ..._veegan for the VEEGAN ring); many short timing rounds: a shared machine's bursts average out
    python examples/gan/extrapolation.py --alphas 5 10 --ks 0 --control 5 --seeds 0-9 --timing-rounds 30 \
        --timing-iterations 3 --out runs/extrapolation_matched --doc docs/results/extrapolation_matched.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

import unroll
from unroll_examples import ablations as ab
from unroll_examples import report, runs, sweeps
from unroll_examples.cli import positive_int
from unroll_examples.sweeps import Cell, CellMeta
from unroll_examples.training import SIZE_FLAGS, GeneratorRule, StepInputs, Strategies, TrainConfig, d_inner_loss

# ---- configuration: TRAINING's fields dataset, steps, d_lr, g_lr, unroll_lr, eval_every and eval_samples are flags
# of their names (--d-lr ...) whose defaults are its values here (ablations.add_common_flags); the cells vary K,
# control and the generator's rule ----
TRAINING = dataclasses.replace(ab.COMMON, steps=2000)
ALPHAS = (1.0, 2.0, 5.0, 10.0)
KS = (0, 1, 5, 10)
CONTROL_KS = (1,)  # extra committed D steps: 1 matches the extrapolation's single look-ahead step (step-matched)
MATCH_CANDIDATES = tuple(range(2, 9))  # committed D steps per iteration timed by --match-cost
COST_MATCH_FILE = "cost_match.json"
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
    """G's rule :class:`Extrapolated` with factor ``alpha``, its look-ahead step Adam at
    ``cfg.effective_unroll_lr`` from D's current state; D trains plainly."""
    surrogate = unroll.extrapolated_surrogate_loss(
        d_inner_loss, alpha, optimizer=unroll.adam(cfg.effective_unroll_lr, betas=(cfg.beta1, cfg.beta2)))
    return Strategies(generator=Extrapolated(cfg.activation, surrogate))


def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/extrapolation", doc="docs/results/extrapolation.md")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="extrapolation factors")
    p.add_argument("--ks", type=SIZE_FLAGS["K"], nargs="+", default=list(KS),
                   help="unrolling steps of the reference rows")
    p.add_argument("--control", type=SIZE_FLAGS["K"], nargs="*", default=list(CONTROL_KS),
                   help="controls: D takes K + 1 committed steps per iteration (1: step-matched to the one "
                        "look-ahead step; the cost-matched count comes from --match-cost; none: no control)")
    p.add_argument("--match-cost", action="store_true",
                   help="train nothing: time the extrapolated rows beside controls of --match-candidates D steps "
                        "(interleaved, --timing-rounds rounds of --timing-iterations), write <fig-dir>/"
                        f"{COST_MATCH_FILE} and print the count whose cost is closest")
    p.add_argument("--match-candidates", type=positive_int, nargs="+", default=list(MATCH_CANDIDATES),
                   help="committed D steps per iteration that --match-cost times")
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
    cells += [control_cell(base, K + 1, seeds) for K in sorted(set(args.control))]
    cells += [unrolled(K) for K in sorted((k for k in ks if k > 1), reverse=True)]  # the goal's K = 10 first
    return cells


def control_cell(base: TrainConfig, d_steps: int, seeds: Sequence[int]) -> Cell:
    """The control with ``d_steps`` committed D steps per iteration (``K = d_steps - 1``) and G's plain gradient."""
    return Cell("main", f"control, {d_steps} D steps", dataclasses.replace(base, K=d_steps - 1, control=True),
                tuple(seeds))


def match_cost(args: argparse.Namespace, cells: Sequence[Cell], command: str) -> Dict[str, Any]:
    """Time the extrapolated rows (α ≠ 1; their work is the same for every α) beside controls of
    ``args.match_candidates`` committed D steps, interleaved in this process (:func:`ablations.time_cells`), and
    name the count whose cost per iteration is closest to the extrapolated rows' median. Trains nothing."""
    alphas = [c for c in cells if c.strategies is not None]
    if not alphas:
        raise ValueError("--match-cost needs an extrapolated row with α ≠ 1 in --alphas")
    base = ab.base_config(args, TRAINING)
    controls = {n: control_cell(base, n, args.seed_list) for n in sorted(set(args.match_candidates))}
    start = time.time()
    costs = ab.time_cells([*alphas, *controls.values()], args.timing_iterations, args.timing_rounds)
    alpha_cost = statistics.median(costs[c.folder] for c in alphas)
    ratios = {n: costs[c.folder] / alpha_cost for n, c in controls.items()}
    return {"command": command, "dataset": args.dataset, "seeds": list(args.seed_list),
            "timing_rounds": args.timing_rounds, "timing_iterations": args.timing_iterations,
            "seconds": time.time() - start,
            "extrapolated": {c.label: costs[c.folder] for c in alphas}, "extrapolated_median": alpha_cost,
            "controls": {str(n): costs[c.folder] for n, c in controls.items()},
            "ratio_to_extrapolated": {str(n): r for n, r in ratios.items()},
            "closest_d_steps": min(ratios, key=lambda n: abs(ratios[n] - 1))}


# ---- the page ----
def cost_match_lines(args: argparse.Namespace) -> List[str]:
    """The page's section on the cost matching (:func:`match_cost`), when ``<fig-dir>/cost_match.json`` exists."""
    path = Path(args.fig_dir) / COST_MATCH_FILE
    match = runs.read_json_file(path)
    if match is None:
        return []
    rows = [[n, f"{1000 * match['controls'][n]:.1f}", f"{match['ratio_to_extrapolated'][n]:.2f}×"]
            for n in sorted(match["controls"], key=int)]
    link = report.link_from(Path(args.doc), path)
    return ["## Cost matching", "",
            *report.made_by(match["command"], "Which control costs what the extrapolated rows cost, measured "
                                              "before training (nothing trained), made by:"), "",
            f"Every cell's iteration ({len(match['seeds'])} seeds vmapped, no evaluation) timed in one process, the "
            f"cells interleaved over {match['timing_rounds']} rounds of {match['timing_iterations']} iterations "
            f"(median). Extrapolated rows: "
            + ", ".join(f"{label} {1000 * v:.1f} ms" for label, v in match["extrapolated"].items())
            + f" per iteration. Closest: **{match['closest_d_steps']} committed D steps**, the cost-matched "
              f"control. Numbers: [{link}]({link}).", "",
            report.table(rows, ["committed D steps", "ms / iteration", "cost vs extrapolated (median)"]), ""]


def brief(metas: Sequence[CellMeta], args: argparse.Namespace, n_modes: int, costs: Dict[str, float]) -> str:
    """The page's first paragraph: every row's settled seeds, final strict modes and HQ, on the page's seeds and
    budget (no judgement beyond these numbers)."""
    plain = costs.get(metas[0][0].folder)
    parts = []
    for cell, meta in metas:
        if meta is None:
            continue
        numbers = ab.seed_numbers(meta, n_modes, args.min_hq)
        settled = sum(s is not None for s in numbers["stable_coverage"])
        cost = costs.get(cell.folder)
        cost_text = "" if cost is None or plain is None else f", {cost / plain:.2f}× K=0's cost"
        parts.append(f"{cell.label} {settled}/{len(numbers['seeds'])} settled, "
                     f"{statistics.fmean(numbers['modes_strict']):.1f} strict modes, "
                     f"{100 * statistics.fmean(numbers['hq']):.1f}% HQ{cost_text}")
    return (f"**In brief** ({args.dataset}, {len(args.seed_list)} paired seeds, {args.steps:,} iterations, D / G / "
            f"look-ahead lr {args.d_lr:g} / {args.g_lr:g} / {args.unroll_lr:g}; controls: committed D steps and "
            f"G's plain gradient): " + "; ".join(parts) + ". Paired comparisons and per-seed numbers below.")


def d_accuracy_line(metas: Sequence[CellMeta]) -> str:
    """D's accuracy and loss on the evaluation samples against reference data at the last evaluation, per row
    (runs from before these records were kept have none: '')."""
    parts = []
    for cell, meta in metas:
        final = [] if meta is None else [r for r in sweeps.final_records(meta) if r.get("d_accuracy") is not None]
        if final:
            accuracy = report.mean_and_se([r["d_accuracy"] for r in final])
            loss = report.mean_and_se([r["d_loss_eval"] for r in final])
            parts.append(f"{cell.label} {report.plus_minus(*accuracy)} ({report.plus_minus(*loss)})")
    if not parts:
        return ""
    return ("**The discriminator at the last evaluation**, accuracy (L_D) on the evaluation samples against "
            "reference data, mean ± s.e. over seeds (accuracy 0.5 = chance, L_D 1.386 at D ≡ 1/2): "
            + "; ".join(parts) + ".")


PAIR_HEADER = ["A − B", "cost A / B (timed)", "settled: only A / only B / both / neither",
               "both settled: A earlier / same / later", "Δ strict modes", "Δ HQ (points)"]


def paired_comparison(metas: Sequence[CellMeta], costs: Dict[str, float], n_modes: int, min_hq: float) -> str:
    """Each extrapolated row (α ≠ 1) against each control, seed by seed: who settles, who settles first, and the
    final strict modes and HQ as paired differences (mean ± s.e. over seeds); '' without such a pair."""
    done = [(c, m) for c, m in metas if m is not None]
    alphas = [(c, m) for c, m in done if c.strategies is not None]
    controls = [(c, m) for c, m in done if c.cfg.control]
    rows = []
    for (a, a_meta), (b, b_meta) in ((x, y) for x in alphas for y in controls):
        na, nb = ab.seed_numbers(a_meta, n_modes, min_hq), ab.seed_numbers(b_meta, n_modes, min_hq)
        if na["seeds"] != nb["seeds"]:
            continue
        pairs = list(zip(na["stable_coverage"], nb["stable_coverage"]))
        only_a = sum(x is not None and y is None for x, y in pairs)
        only_b = sum(x is None and y is not None for x, y in pairs)
        both = [(x, y) for x, y in pairs if x is not None and y is not None]
        neither = len(pairs) - only_a - only_b - len(both)
        order = (sum(x < y for x, y in both), sum(x == y for x, y in both), sum(x > y for x, y in both))
        d_strict = report.mean_and_se([x - y for x, y in zip(na["modes_strict"], nb["modes_strict"])])
        d_hq = report.mean_and_se([100 * (x - y) for x, y in zip(na["hq"], nb["hq"])])
        ratio = f"{costs[a.folder] / costs[b.folder]:.2f}" if a.folder in costs and b.folder in costs else ""
        rows.append([f"{a.label} − {b.label}", ratio, f"{only_a} / {only_b} / {len(both)} / {neither}",
                     " / ".join(map(str, order)), report.plus_minus(*d_strict, ".1f"),
                     report.plus_minus(*d_hq, ".1f")])
    return report.table(rows, PAIR_HEADER) if rows else ""


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
             "look-ahead step, whatever α; α = 1 is K = 1); **control, n D steps**: no unrolling, D takes n "
             "committed Adam steps per iteration (n − 1 at the look-ahead lr) and G the plain gradient; 2 D steps "
             "is the *step-matched* control (one extra D step for the one look-ahead step), the count named in "
             "*Cost matching* (when there is one) the *cost-matched* control. "
             "**cost vs K=0**: each cell's iteration (all seeds vmapped, no evaluation) timed in one process after "
             f"training, the cells interleaved over {args.timing_rounds} rounds of {args.timing_iterations} "
             "iterations (median), divided by K = 0's; the s / iteration column is the training wall time "
             "(evaluations and checkpoints included), taken while other jobs shared the machine.")
    metas, n_modes, lines = ab.start_page("One-step extrapolation of the unrolled gradient (Metz et al. 2017, Sec. 4)",
                                          intro, args, cells, command, complete)
    costs = ab.timings(args, cells, complete) or {}
    lines[2:2] = [brief(metas, args, n_modes, costs), ""]  # the verdict's numbers first, under the title
    lines += ["## Results", "", ab.timed_results_table(metas, args, n_modes, log, costs, strict_first=True), ""]
    verdict = goal_verdict(metas, costs, n_modes, args.min_hq)
    if verdict:
        lines += [verdict, ""]
    discriminator = d_accuracy_line(metas)
    if discriminator:
        lines += [discriminator, ""]
    pairs = paired_comparison(metas, costs, n_modes, args.min_hq)
    if pairs:
        lines += ["## Extrapolation against the controls, seed by seed", "",
                  "A = an extrapolated row, B = a control, on the same seeds: which settle (stable coverage by the "
                  "end), which settles first where both do, and the final strict modes and HQ as paired "
                  "differences A − B (mean ± s.e. over seeds); the cost ratio is from the side-by-side timing "
                  "above.", "", pairs, ""]
    lines += cost_match_lines(args)
    lines += ab.figure_markdown(metas, Path(args.out), args, "extrapolation",
                                f"{args.dataset}: extrapolation, unrolling and control (seed {args.seed_list[0]})")
    lines += ab.per_seed_json(args, metas, n_modes, command, costs)
    ab.write_page(Path(args.doc), lines, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    if not parser.parse_args(argv).match_cost:
        return ab.main_for("extrapolation.py", parser, build_cells, write_report, argv)
    args, cells = ab.parse_and_check(parser, build_cells, argv)
    command = report.command_line("examples/gan/extrapolation.py", argv)
    torch.set_num_threads(args.threads)
    match = match_cost(args, cells, command)
    path = Path(args.fig_dir) / COST_MATCH_FILE
    runs.write_json(path, match)
    for n, ratio in match["ratio_to_extrapolated"].items():
        print(f"{n} D steps: {1000 * match['controls'][n]:.1f} ms / iteration, {ratio:.2f}x the extrapolated rows")
    print(f"closest: {match['closest_d_steps']} D steps (--control {match['closest_d_steps'] - 1}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
