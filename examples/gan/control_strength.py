"""Where does the control of the 2-D mixture experiment break? n committed D steps per G step, for both
discriminator initialisations, with the discriminator's accuracy and loss measured at every evaluation.

The control (``TrainConfig.control``: D takes n = K + 1 committed Adam steps per iteration, the K extra at the
look-ahead lr, and G the plain gradient; no unrolling) is what unrolling must beat to be more than "more D
steps" (Metz et al. 2017, Sec. 3.1 and Fig. 2 run no such control). On the paper ring at every lr 1e-3 the 6-step
control settles like K = 5 and the 11-step one did not settle in any seed (docs/results/mixture.md). App. A does not
say how D is initialised: ``--d-inits`` runs G's orthogonal gain-0.8 init (this project's default) and
``torch.nn.Linear``'s default init (``TrainConfig.d_init``). Before naming a mechanism ("too strong for the
generator to follow"), every evaluation records D's accuracy and L_D on the evaluation samples against reference
data (``d_accuracy``, ``d_loss_eval``: ``training.discriminator_metrics``).

    python examples/gan/control_strength.py --threads 1 --no-progress   # docs/results/control_strength.md's sweep
    python examples/gan/control_strength.py --resume                    # continue it after a kill
    python examples/gan/control_strength.py --report-only               # rewrite the page from the runs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from unroll_examples import ablations as ab
from unroll_examples import report
from unroll_examples.cli import control_steps
from unroll_examples.models import D_INITS
from unroll_examples.sweeps import Cell, CellMeta
from unroll_examples.training import D_METRIC_NAMES

# ---- configuration: TRAINING's fields in ab.COMMON_FLAGS are flags of their names (--d-lr ...) whose defaults are
# its values here (ablations.add_common_flags); the cells vary the D steps and D's init. 3,000 iterations and 10
# seeds: the budget of docs/results/mixture.md, where the 6- and 11-step controls were first run ----
TRAINING = dataclasses.replace(ab.COMMON, steps=3000)
D_STEPS = (6, 7, 8, 9, 10, 11)  # committed D steps per G step: K + 1 for K = 5 .. 10
TRACE_EVERY = 500  # the columns of the over-training tables


def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/control_strength", doc="docs/results/control_strength.md",
                        seeds="0-9")
    p.add_argument("--d-steps", type=control_steps, nargs="+", default=list(D_STEPS),
                   help="committed D steps per G step of the controls (each >= 2)")
    p.add_argument("--d-inits", nargs="+", choices=D_INITS, default=list(D_INITS),
                   help="the discriminator's initialisations")
    return p


def build_cells(args: argparse.Namespace) -> List[Cell]:
    """One control per (D steps, init), the D steps outermost, each in the order given."""
    base = ab.base_config(args, TRAINING)
    return [Cell("main", f"{n} D steps, {init} init", dataclasses.replace(base, K=n - 1, control=True, d_init=init),
                 args.seed_list)
            for n in dict.fromkeys(args.d_steps) for init in dict.fromkeys(args.d_inits)]


# ---- the page ----
def by_step(meta: Dict[str, Any], key: str) -> Dict[int, List[float]]:
    """Every evaluation's values of ``key`` over seeds (records without it, from before it was measured, left out)."""
    values: Dict[int, List[float]] = {}
    for record in meta["records"]:
        if record.get(key) is not None:
            values.setdefault(record["step"], []).append(float(record[key]))
    return values


def trace_table(metas: Sequence[CellMeta], key: str, every: int, scale: float = 1.0, digits: int = 2) -> str:
    """Rows = cells, columns = the evaluations at multiples of ``every``, at 250 and the last: mean of ``key`` over
    seeds."""
    done = [m for _, m in metas if m is not None]
    last = max((r["step"] for m in done for r in m["records"]), default=0)
    steps = sorted({r["step"] for m in done for r in m["records"]
                    if r["step"] % every == 0 or r["step"] in (250, last)})
    rows = []
    for cell, meta in metas:
        if meta is None:
            continue
        values = by_step(meta, key)
        rows.append([cell.label] + [f"{scale * statistics.fmean(values[s]):.{digits}f}" if s in values else ""
                                    for s in steps])
    return report.table(rows, ["run"] + [str(s) for s in steps])


def settled_split(metas: Sequence[CellMeta], n_modes: int, min_hq: float, start: int) -> str:
    """Per cell, D's accuracy and loss averaged over the evaluations from iteration ``start`` on, separately for
    the seeds that settle (stable coverage by the end) and those that do not: does a stronger D go with failure?"""
    rows = []
    for cell, meta in metas:
        if meta is None:
            continue
        settled = dict(zip(sorted({r["seed"] for r in meta["records"]}),
                           ab.stable_steps(meta, n_modes, min_hq)))
        row = [cell.label]
        for group in (True, False):
            seeds = [s for s, step in settled.items() if (step is not None) == group]
            for key in D_METRIC_NAMES:
                per_seed = [statistics.fmean(float(r[key]) for r in meta["records"]
                                             if r["seed"] == s and r["step"] >= start and r.get(key) is not None)
                            for s in seeds]
                row.append(report.plus_minus(*report.mean_and_se(per_seed), ".3f") if per_seed else "–")
            row.append(str(len(seeds)))
        rows.append(row)
    return report.table(rows, ["run", "D accuracy, settled", "D loss, settled", "settled seeds",
                               "D accuracy, not settled", "D loss, not settled", "unsettled seeds"])


def brief(metas: Sequence[CellMeta], args: argparse.Namespace, n_modes: int) -> str:
    """The page's first paragraph: every cell's settled seeds, strict modes, HQ and final D accuracy."""
    parts = []
    for cell, meta in metas:
        if meta is None:
            continue
        numbers = ab.seed_numbers(meta, n_modes, args.min_hq)
        last = by_step(meta, "d_accuracy")
        final = last[max(last)] if last else []
        parts.append(f"{cell.label}: {sum(s is not None for s in numbers['stable_coverage'])}/"
                     f"{len(numbers['seeds'])} settled, {statistics.fmean(numbers['modes_strict']):.1f} strict modes, "
                     f"{100 * statistics.fmean(numbers['hq']):.1f}% HQ"
                     + (f", final D accuracy {statistics.fmean(final):.2f}" if final else ""))
    return (f"**In brief** ({args.dataset}, {len(args.seed_list)} paired seeds, {args.steps:,} iterations, D / G / "
            f"extra-D-step lr {args.d_lr:g} / {args.g_lr:g} / {args.unroll_lr:g}; every row is a control: n "
            f"committed D steps per G step, no unrolling): " + "; ".join(parts) + ".")


def per_seed_traces(metas: Sequence[CellMeta]) -> Dict[str, Any]:
    """Every cell's evaluations, per seed: iteration, strict modes, HQ, D accuracy and D loss."""
    keys = ("step", "seed", "modes_strict", "hq", *D_METRIC_NAMES)
    return {cell.label: [{k: r.get(k) for k in keys} for r in meta["records"]]
            for cell, meta in metas if meta is not None}


def write_report(args: argparse.Namespace, cells: List[Cell], log: Sequence[dict], command: str,
                 complete: bool) -> None:
    intro = ("Rows: **n D steps, init**: the control, D takes n committed Adam steps per G step (the first at the D "
             "lr, n − 1 at the look-ahead lr; all 1e-3 here) and G the plain gradient, no unrolling; **orthogonal "
             "init**: D's weights orthogonal with gain 0.8, zero biases (as G's; the project's default); **pytorch "
             "init**: `torch.nn.Linear`'s default (weights and biases uniform in ±1/√fan_in). The generator's init "
             "and the data are the same in every row (paired seeds). **D accuracy**: at each evaluation, "
             "(share of the reference data points with D(x) > 1/2 + share of the evaluation samples with "
             "D(G(z)) < 1/2) / 2, 0.5 = chance; **D loss**: L_D on the same points (2 log 2 ≈ 1.386 at D ≡ 1/2); "
             "both on the evaluation's samples, not a training batch.")
    metas, n_modes, lines = ab.start_page("Where the control breaks on the ring: D steps per G step and D's init",
                                          intro, args, cells, command, complete)
    lines[2:2] = [brief(metas, args, n_modes), ""]
    start = args.steps // 2
    header = [ab.STRICT_FIRST_MODES if h == "modes (strict)" else h for h in ab.RESULT_HEADER]
    results = report.table([ab.result_row(c.label, c, m, n_modes, args.min_hq, log, strict_first=True)
                            for c, m in metas], header)
    lines += ["## Results", "", results, "",
              "## Over training", "", f"Mean over seeds at evaluations every {TRACE_EVERY} iterations (and at 250 "
              "and the last).", "", "**Strict modes** (of 8):", "", trace_table(metas, "modes_strict", TRACE_EVERY,
                                                                              digits=1), "",
              "**HQ %**:", "", trace_table(metas, "hq", TRACE_EVERY, 100, 1), "",
              "**D accuracy** (0.5 = chance):", "", trace_table(metas, "d_accuracy", TRACE_EVERY), "",
              "**D loss** (L_D on the evaluation points):", "", trace_table(metas, "d_loss_eval", TRACE_EVERY), "",
              "## D's accuracy and loss, settled against unsettled seeds", "",
              f"Per seed the mean over the evaluations from iteration {start:,} on, then mean ± s.e. over the "
              f"seeds of each group ('–': no seed in the group).", "",
              settled_split(metas, n_modes, args.min_hq, start), ""]
    lines += ab.figure_markdown(metas, Path(args.out), args, "control_strength",
                                f"{args.dataset}: controls by D steps and D init (seed {args.seed_list[0]})")
    lines += ab.per_seed_json(args, metas, n_modes, command, {})
    traces = Path(args.fig_dir) / "traces.json"
    lines += [report.write_per_seed(Path(args.doc), traces, {"command": command, **per_seed_traces(metas)},
                                    "Every evaluation of every seed (strict modes, HQ, D accuracy, D loss):"), ""]
    ab.write_page(Path(args.doc), lines, log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return ab.main_for("control_strength.py", build_parser(), build_cells, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
