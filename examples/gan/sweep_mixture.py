"""The mixture sweep: K in {0, 1, 5, 10} beside step- and wall-time-matched controls on paired seeds, one table per
dataset (× generator activation × mode weights), plus an optional sensitivity table; writes a results page
(``docs/results/mixture*.md``) with Fig. 2-style PNGs and every seed's numbers in ``per_seed.json``.

    # the pages (each resumable: re-run the same command after a kill; --report-only re-renders)
    python examples/gan/sweep_mixture.py --datasets ring --ks 0 1 5 10 --control-ks 5 10 58 --seeds 0-9 \
        --steps 3000 --d-lr 1e-3 --g-lr 1e-3 --unroll-lr 1e-3 --no-sensitivity --threads 1 --no-progress

Every cell is an ordinary run folder (as ``mixture.py`` writes) under ``--out``; finished cells are skipped and
unfinished ones resumed from their checkpoint, so a killed sweep loses at most one evaluation interval. The
report is rewritten after every cell (marked partial until the last one is done); when the sweep is complete,
every main cell's iteration is timed side by side in one process (``timing.json`` in ``--out``) for the cost
column. Text between the ``<!-- notes -->`` markers of an existing report is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from unroll_examples import REPO_ROOT, cli, report, runs
from unroll_examples import ablations as ab
from unroll_examples.cli import HelpFormatter, add_threads_flag, parse_seeds
from unroll_examples.data import make_mixture
from unroll_examples.metrics import fully_covered, metric_records
from unroll_examples.plotting import histogram_extent
from unroll_examples.report import fmt, summary_stats, table
from unroll_examples.sweeps import (
    Cell,
    CellMeta,
    check_sweep,
    checked_cells,
    figure_for,
    final_records,
    finite_records,
    page_status,
    read_cell,
    run_cells,
)
from unroll_examples.training import DENSITY, SIZE_FLAGS, TrainConfig, read_snapshots

# ---- configuration: MAIN's fields in FLAGS are flags of their names (--d-lr ...) whose defaults are its values here
# (cli.add_config_flags); the main tables vary dataset, activation, weight_std, K and control (--datasets ...), the
# sensitivity table one field at a time ----
MAIN = TrainConfig(steps=2000, unroll_lr=1e-3, eval_every=250)
"""App. A's settings (D and G lr 1e-4, batch 512, 10,000 samples per evaluation) with look-ahead lr 1e-3 and
2,000 iterations (on the grid ``--steps-grid``; in the sensitivity table ``--sens-steps``)."""
FLAGS = ("steps", "d_lr", "g_lr", "unroll_lr", "eval_every", "eval_samples", "batch")
HELPS = {"steps": "iterations per run on the rings", "unroll_lr": "look-ahead lr of the main table",
         "d_lr": "discriminator Adam lr of every cell (App. A)", "g_lr": "generator Adam lr of every cell (App. A)",
         "eval_every": "iterations between evaluations (and checkpoints)", "batch": "minibatch size"}
"""This sweep's words for the flags (a TrainConfig help such as --unroll-lr's names mixture.py's default)."""

# Published numbers to compare with: VEEGAN Table 1 and PacGAN Table 1 (their GAN baselines and VEEGAN's "Unrolled").
PUBLISHED = {
    "ring-veegan": [("VEEGAN Table 1: GAN", "1", "99.3", "-"), ("VEEGAN Table 1: Unrolled GAN", "7.6", "35.6", "-"),
                    ("PacGAN Table 1: GAN", "6.3 ± 0.5", "98.2 ± 0.2", "0.45 ± 0.09")],
    "grid": [("VEEGAN Table 1: GAN", "3.3", "0.5", "-"), ("VEEGAN Table 1: Unrolled GAN", "23.6", "16", "-"),
             ("PacGAN Table 1: GAN", "17.3 ± 0.8", "94.8 ± 0.7", "0.70 ± 0.07")],
    "ring": [("Metz et al. Fig. 2, K=0", "1 at a time (rotates)", "-", "-"),
             ("Metz et al. Fig. 2, K=10", "8 (converges)", "-", "-")],
}
DATASET_TITLES = {"ring": "Paper ring (8 modes, radius 2, std 0.02)",
                  "ring-veegan": "VEEGAN/PacGAN ring (8 modes, radius 1, std 0.01)",
                  "grid": "VEEGAN/PacGAN grid (25 modes, 5x5 on {-4..4}², std 0.05)"}


def section_title(cfg: TrainConfig) -> str:
    """A main table's heading: the dataset, then what differs from its default (mode weights, activation)."""
    title = DATASET_TITLES[cfg.dataset]
    if cfg.weight_std:
        title += f", non-uniform mode weights (std {cfg.weight_std:g}, weight seed {cfg.weight_seed})"
    if cfg.activation != "relu":
        title += f", {cfg.activation} generator"
    return title


def build_cells(args: argparse.Namespace) -> List[Cell]:
    main = cli.config_from_args(args, MAIN, only=FLAGS)
    cells: List[Cell] = []
    seeds = tuple(parse_seeds(args.seeds))
    for dataset in args.datasets:
        for activation in args.activations:
            for weight_std in args.weight_stds:
                data = dataclasses.replace(main, dataset=dataset, activation=activation, weight_std=weight_std,
                                           steps=args.steps_grid if dataset == "grid" else main.steps)
                for K in args.ks:
                    cells.append(Cell("main", f"K={K}", dataclasses.replace(data, K=K), seeds))
                for control_k in args.control_ks:
                    cells.append(Cell("main", f"control ({control_k + 1} D steps)",
                                      dataclasses.replace(data, K=control_k, control=True), seeds))
    if args.no_sensitivity:
        return cells
    # Sensitivity on the paper ring: one factor at a time away from the main setting, K=0 beside K=10 where
    # the factor changes the plain GAN too. The steps factor is read off the evaluations along the way.
    sens = tuple(parse_seeds(args.sens_seeds))
    ring = dataclasses.replace(main, dataset="ring", steps=args.sens_steps)
    variants: List[Tuple[str, Dict[str, Any], Tuple[int, ...]]] = [
        ("App. A as written: unroll lr = D lr 1e-4", dict(unroll_lr=1e-4), (10,)),
        ("generator lr 1e-3", dict(g_lr=1e-3), (0, 10)),
        ("generator lr 1e-3, unroll lr 1e-4", dict(g_lr=1e-3, unroll_lr=1e-4), (10,)),
        ("tanh generator", dict(activation="tanh"), (0, 10)),
        ("notebook: tanh, generator lr 1e-3", dict(activation="tanh", g_lr=1e-3), (0,)),
        ("non-saturating loss", dict(loss="nonsaturating"), (0, 10)),
        ("stop-gradient (first term only)", dict(stop_grad=True), (10,)),
    ]
    if args.quick:
        variants = variants[:1]
    for label, change, ks in variants:
        for K in ks:
            cells.append(Cell("sensitivity", f"{label}, K={K}", dataclasses.replace(ring, **change, K=K), sens))
    return cells


def row_for(label: str, meta: Optional[Dict[str, Any]], n_modes: int, cost: Optional[float]) -> List[str]:
    """Stable coverage, the final metrics (strict count and HQ first: they tell a learned ring from a diffuse
    cloud) and the measured cost per iteration relative to K = 0."""
    cost_text = "" if cost is None else f"{cost:.2f}×"
    if meta is None:
        return [label, "not run"] + [""] * (len(HEADER) - 2)
    recs = finite_records(final_records(meta))
    step = max(r["step"] for r in meta["records"])
    if not recs:
        return [label, str(step), "diverged"] + [""] * (len(HEADER) - 4) + [cost_text]
    stats = {k: summary_stats([r[k] for r in recs]) for k in ("modes", "modes_strict", "hq", "reverse_kl", "energy")}
    all_strict = sum(r["modes_strict"] == n_modes for r in recs)
    status = "" if meta["status"] == "done" else f" ({meta['status']})"
    return [label, f"{step}{status}", ab.describe_stable(ab.stable_steps(meta, n_modes, ab.MIN_HQ)),
            f"{fmt(stats['modes_strict'])} ({stats['modes_strict']['median']:g})", f"{all_strict}/{len(recs)}",
            f"{fmt(stats['hq'], 100, 1)} ({100 * stats['hq']['median']:.1f})", fmt(stats["modes"]),
            f"{fmt(stats['reverse_kl'], digits=3)} ({stats['reverse_kl']['median']:.3f})",
            fmt(stats["energy"], digits=4), cost_text]


HEADER = ["run", "iterations", "stable coverage (iteration)", "strict modes (median)", "all modes strict",
          "HQ % (median)", "modes (lenient)", "reverse KL (median)", "energy dist.", "cost / iteration vs K=0"]
HORIZONS = [500, 1000, 2000, 3000, 5000]


def covered_at(meta: Dict[str, Any], step: int, n_modes: int) -> List[bool]:
    """Per seed at evaluation ``step``: all modes strict with at least ``ab.MIN_HQ`` high-quality samples."""
    return [fully_covered(r, n_modes, ab.MIN_HQ) for r in meta["records"] if r["step"] == step]


def horizons_table(cells: List[CellMeta], n_modes: int, horizons: Sequence[int]) -> str:
    """Seeds with full strict coverage (and >= MIN_HQ HQ) at several horizons: a run that covers the modes at
    one horizon and drops one later shows here, whatever iteration the run stops at."""
    last = max((max(r["step"] for r in m["records"]) for _, m in cells if m), default=0)
    shown = sorted({h for h in horizons if h <= last} | {last})  # the end of the runs always
    rows = []
    for cell, meta in cells:
        if meta is None:
            continue
        row = [cell.label]
        for h in shown:
            flags = covered_at(meta, h, n_modes)
            row.append(f"{sum(flags)}/{len(flags)}" if flags else "")
        rows.append(row)
    return table(rows, ["run"] + [f"at {h}" for h in shown])


def modes_over_time(cells: List[CellMeta]) -> str:
    steps = sorted({r["step"] for _, m in cells if m for r in m["records"]})
    shown = [s for i, s in enumerate(steps) if i % max(1, len(steps) // 8) == 0 or s == steps[-1]]
    rows = []
    for cell, meta in cells:
        if meta is None:
            continue
        by_step = {}
        for r in meta["records"]:
            by_step.setdefault(r["step"], []).append(r["modes_strict"])
        rows.append([cell.label] + [f"{statistics.fmean(by_step[s]):.1f}" if s in by_step else "" for s in shown])
    return table(rows, ["run"] + [str(s) for s in shown])


def observations(cells: List[CellMeta], n_modes: int) -> List[str]:
    """Plain statements computed from the numbers (no judgement calls)."""
    out = []
    for cell, meta in cells:
        if meta is None:
            continue
        recs = finite_records(final_records(meta))
        if not recs:
            out.append(f"- {cell.label}: diverged ({meta.get('diverged')}).")
            continue
        full = sum(r["modes_strict"] == n_modes for r in recs)
        one = sum(r["modes_strict"] <= 1 for r in recs)
        out.append(f"- {cell.label}: {full}/{len(recs)} runs end with all {n_modes} modes by the strict count, "
                   f"{one}/{len(recs)} with at most one.")
    return out


def per_seed(meta: Dict[str, Any], n_modes: int) -> Dict[str, Any]:
    """A cell's numbers seed by seed: stable coverage and every evaluation's metrics."""
    return {"stable_coverage": dict(zip(sorted({r["seed"] for r in meta["records"]}),
                                        ab.stable_steps(meta, n_modes, ab.MIN_HQ))),
            "records": metric_records(meta["records"])}


def dominant_modes(snapshots: List[Tuple[int, torch.Tensor]], dataset: str) -> List[List[int]]:
    """Per seed, the mode nearest the densest histogram bin at every evaluation after step 0."""
    mixture = make_mixture(dataset)
    extent = histogram_extent(mixture)
    out: List[List[int]] = []
    for step, hist in snapshots:
        if step == 0:
            continue
        bins = hist.shape[-1]
        flat = hist.reshape(hist.shape[0], -1).argmax(dim=1)
        centre = (torch.stack([flat // bins, flat % bins], dim=1).double() + 0.5) * (2 * extent / bins) - extent
        nearest = torch.cdist(centre, mixture.centers.double()).argmin(dim=1)
        out.append(nearest.tolist())
    return [list(seed_modes) for seed_modes in zip(*out)]


def rotation_table(cells: List[CellMeta], out_root: Path, dataset: str) -> str:
    """How often the densest mode changes between evaluations: rotation through the modes shows here."""
    rows = []
    for cell, meta in cells:
        if meta is None or not (out_root / cell.folder / DENSITY).exists():
            continue
        per_seed = dominant_modes(read_snapshots(out_root / cell.folder), dataset)
        if not per_seed or len(per_seed[0]) < 2:
            continue
        changes = [sum(a != b for a, b in zip(m[:-1], m[1:])) for m in per_seed]
        distinct = [len(set(m)) for m in per_seed]
        rows.append([cell.label, f"{statistics.fmean(changes):.1f} of {len(per_seed[0]) - 1}",
                     f"{statistics.fmean(distinct):.1f}", " ".join(map(str, per_seed[0]))])
    return table(rows, ["run", "densest mode changed (mean over seeds)", "distinct densest modes",
                        f"densest mode per evaluation, seed {cells[0][0].seeds[0]}"])


def write_report(args: argparse.Namespace, cells: List[Cell], out_root: Path, log: List[Dict[str, Any]],
                 command: str, complete: bool) -> None:
    doc = Path(args.doc)
    metas = [(c, read_cell(c, out_root / c.folder)) for c in cells]
    status = page_status(metas, complete)
    main_cfg = next(c.cfg for c in cells if c.group == "main")
    lines = [
        "# Unrolled GAN on 2-D mixtures of Gaussians (Metz et al. 2017, Sec. 3.1): measured over seeds",
        "",
        *report.made_by(command, f"Status: **{status}**. Made by:"),
        "",
        f"Settings (App. A unless stated): generator 256→128→128→2 ({'/'.join(args.activations)}), discriminator "
        f"input/4 →128 ReLU→logit, orthogonal init gain 0.8, Adam β=(0.5, 0.999), D lr {main_cfg.d_lr:g}, G lr "
        f"{main_cfg.g_lr:g}, **unrolled (look-ahead) Adam lr {main_cfg.effective_unroll_lr:g}** starting from D's "
        f"current Adam state, {main_cfg.loss} generator loss (G minimises -L_D), fixed unroll minibatch, batch "
        f"{main_cfg.batch}. One *iteration* = one D update then one G update on the same minibatch (the paper "
        f"counts each update as a step). Metrics on {main_cfg.eval_samples:,} generator samples: HQ = within 3 std "
        f"of the nearest mode; a mode is covered if it is the nearest mode of at least one HQ sample (strict: at "
        f"least 1% of the samples its weight predicts); reverse KL = KL(mode histogram of all samples ‖ true "
        f"weights); energy distance on 2,000 samples. Tables show the last evaluation; mean ± standard error over "
        f"paired seeds (seed s has the same init and data stream in every row), median in parentheses. The "
        f"control takes K+1 committed D steps per G step (the extra ones at the look-ahead lr) and does not unroll.",
        "",
        report.notes_block(doc),
        "",
    ]
    main = [(c, m) for c, m in metas if c.group == "main"]
    costs = ab.timings(args, [c for c, _ in main], complete) or {}
    seed_numbers: Dict[str, Any] = {"command": command, "min_hq": ab.MIN_HQ, "sections": []}
    sections: Dict[str, List[CellMeta]] = {}
    main_figure: Optional[Tuple[Path, str]] = None
    for cell, meta in main:
        sections.setdefault(section_title(cell.cfg), []).append((cell, meta))
    for title, dcells in sections.items():
        cfg = dcells[0][0].cfg
        n_modes = make_mixture(cfg.dataset).n_modes
        plain = next((costs.get(c.folder) for c, _ in dcells if c.cfg.K == 0 and not c.cfg.control), None)

        def relative_cost(cell: Cell) -> Optional[float]:  # called in this iteration only: B023 does not apply
            return None if plain is None or cell.folder not in costs else costs[cell.folder] / plain  # noqa: B023

        lines += [f"## {title}", ""]
        lines += [table([row_for(c.label, m, n_modes, relative_cost(c)) for c, m in dcells], HEADER), ""]
        if cfg.dataset in PUBLISHED and not cfg.weight_std and cfg.activation == "relu":
            lines += ["Published (other architectures and training lengths; for orientation):", ""]
            lines += [table([list(p) for p in PUBLISHED[cfg.dataset]], ["source", "modes", "HQ %", "reverse KL"]),
                      ""]
        lines += [f"Seeds with all {n_modes} modes strict and at least {100 * ab.MIN_HQ:g}% HQ, at several "
                  f"horizons (iterations):", "", horizons_table(dcells, n_modes, args.horizons), ""]
        lines += ["Mean strict modes over training (iterations):", "", modes_over_time(dcells), ""]
        lines += ["Mode hopping: the mode nearest the densest point of each run's density, evaluation by evaluation. "
                  "For a collapsed generator this is its one mode, so changes are jumps from mode to mode; for a "
                  "diffuse generator the densest point is sampling noise and the column means nothing.", "",
                  rotation_table(dcells, out_root, cfg.dataset), ""]
        lines += observations(dcells, n_modes) + [""]
        name = "_".join(
            [cfg.dataset] + ([f"wstd{cfg.weight_std:g}"] if cfg.weight_std else []) +
            ([cfg.activation] if cfg.activation != "relu" else []))
        fig = Path(args.fig_dir) / f"mixture_{name}.png"
        if figure_for(cfg.dataset, dcells, out_root, fig, title):
            if main_figure is None:  # the first section's figure opens the page, after its verdict
                main_figure = (fig, name)
            else:
                lines += [report.figure(doc, fig, name), ""]
        seed_numbers["sections"].append({
            "title": title, "rows": [{"label": c.label, "config": dataclasses.asdict(c.cfg),
                                      "cost_vs_plain": relative_cost(c), **per_seed(m, n_modes)}
                                     for c, m in dcells if m is not None]})
    lines += [report.write_per_seed(doc, Path(args.fig_dir) / "per_seed.json", seed_numbers,
                                    "Per-seed numbers of every row (every evaluation):"), ""]
    scells = [(c, m) for c, m in metas if c.group == "sensitivity"]
    if scells:
        lines += ["## Sensitivity (paper ring; one factor changed from the main setting)", ""]
        lines += [table([row_for(c.label, m, 8, None) for c, m in scells], HEADER), ""]
        lines += ["Mean strict modes over training (the *steps* factor):", "", modes_over_time(scells), ""]
        lines += observations(scells, 8) + [""]
    if log:
        total = sum(e["seconds"] for e in log)
        lines += ["## Cost", "", f"Wall time of all cells: {total / 60:.1f} min (one process, one thread, on a "
                  f"2-core CPU shared with other jobs; all seeds of a cell trained together with torch.func.vmap).",
                  ""]
        lines += [table([[e["cell"], f"{e['from_step']}→{e['to_step']}", str(e["seeds"]), f"{e['seconds']:.0f}",
                          e.get("finished", "")] for e in log],
                        ["cell", "iterations", "seeds", "seconds", "finished at"]), ""]
    report.write_page(doc, [*lines[:2], *report.opening(doc, main_figure), *lines[2:]])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/mixture_sweep", help="run folders (checkpoints, metrics)")
    p.add_argument("--doc", default=str(REPO_ROOT / "docs/results/mixture.md"), help="the results page to write")
    p.add_argument("--fig-dir", default=str(REPO_ROOT / "docs/results/mixture"), help="the page's figures")
    p.add_argument("--datasets", nargs="+", default=["ring", "ring-veegan", "grid"],
                   choices=["ring", "ring-veegan", "grid"], help="the main tables' datasets")
    p.add_argument("--activations", nargs="+", default=["relu"], choices=["relu", "tanh"],
                   help="generator activations of the main tables (one table each)")
    p.add_argument("--weight-stds", type=cli.nonnegative_float, nargs="+", default=[0.0],
                   help="std of the non-uniform mode weights of the main tables (0 = uniform; one table each)")
    p.add_argument("--ks", type=SIZE_FLAGS["K"], nargs="+", default=[0, 1, 5, 10],
                   help="unrolled steps of the main tables")
    p.add_argument("--control-ks", type=SIZE_FLAGS["K"], nargs="+", default=[10],
                   help="one control per value k: k + 1 committed D steps per G step, no unrolling")
    p.add_argument("--seeds", default="0-9", help="paired seeds of the main tables (e.g. 0-9 or 0,3,7)")
    p.add_argument("--steps-grid", type=int, default=MAIN.steps, help="iterations per run on the grid")
    p.add_argument("--no-sensitivity", action="store_true", help="the main tables only")
    p.add_argument("--sens-seeds", default="0-3", help="paired seeds of the sensitivity table")
    p.add_argument("--sens-steps", type=int, default=2000, help="iterations per sensitivity run")
    p.add_argument("--horizons", type=int, nargs="+", default=HORIZONS,
                   help="iterations at which the page counts the seeds with full coverage")
    cli.add_config_flags(p, MAIN, only=FLAGS, helps=HELPS,
                         title="every cell's training settings (unroll_examples/training.py TrainConfig)")
    ab.add_timing_flags(p)
    add_threads_flag(p)
    p.add_argument("--quick", action="store_true", help="one sensitivity cell only (smoke tests)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from finished cells")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cells = checked_cells(parser, args, build_cells)
    # The page names the command that trains the runs; --report-only only re-renders them.
    command = report.command_line("examples/gan/sweep_mixture.py", argv, drop=("--report-only",))
    out_root = Path(args.out)
    # Cells continue from their checkpoints without --resume: a sweep is rerun with the same command.
    with runs.claim(out_root, resume=None, validate=lambda: check_sweep(cells, out_root)):
        torch.set_num_threads(args.threads)
        log = run_cells(cells, out_root, not args.no_progress, args.report_only,
                        lambda log: write_report(args, cells, out_root, log, command, complete=False))
        write_report(args, cells, out_root, log, command, complete=True)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
