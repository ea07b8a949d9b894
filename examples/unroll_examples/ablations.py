"""What the App. B ablation sweeps (``second_gradient.py``, ``historical_averaging.py``) share: the common
settings and flags, running the cells (``--resume``), steps to stable coverage, cost, tables and figures.

A sweep is a list of :class:`sweeps.Cell`: each is an ordinary run folder under ``--out`` with all its seeds
trained together (``torch.func.vmap``), evaluated along the way and checkpointed.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import REPO_ROOT, cli, report, runs
from .cli import HelpFormatter, add_threads_flag, parse_seeds, positive_int
from .data import make_mixture
from .metrics import steps_to_stable_coverage
from .report import fmt, summary_stats, table
from .sweeps import (
    TIMING_FILE,
    Cell,
    CellMeta,
    check_sweep,
    checked_cells,
    figure_for,
    final_records,
    finite_records,
    page_status,
    read_cell,
    read_timing,
    run_cells,
)
from .timing import interleaved_seconds
from .training import TrainConfig, Trainer

# The ablations need runs that converge within a CPU budget. With App. A's learning rates (1e-4) K = 10 settles only
# after 6,500-9,500 iterations (docs/results/mixture_app_a.md); with 1e-3 for D, G and the look-ahead steps, K = 5
# covers all 8 ring modes from about 1,250 iterations (docs/results/mixture.md), while K = 0 collapses. Every flag
# can restore App. A.
COMMON = TrainConfig(dataset="ring", d_lr=1e-3, g_lr=1e-3, unroll_lr=1e-3, eval_every=250, eval_samples=10_000)
"""The settings every ablation sweep starts from (each script sets its ``steps``); the cells vary the rest."""
COMMON_FLAGS = ("dataset", "steps", "d_lr", "g_lr", "unroll_lr", "eval_every", "eval_samples")
"""The TrainConfig fields that are flags of every ablation sweep (:func:`add_common_flags`)."""
COMMON_HELPS = {"steps": "training iterations per run", "d_lr": "discriminator Adam learning rate",
                "g_lr": "generator Adam learning rate", "unroll_lr": "look-ahead Adam lr"}
"""The ablations' words for fields whose TrainConfig help names App. A's defaults (theirs are :data:`COMMON`)."""
MIN_HQ = 0.05


def add_common_flags(p: argparse.ArgumentParser, training: TrainConfig, *, out: str, doc: str, seeds: str = "0-4",
                     fields: Sequence[str] = COMMON_FLAGS) -> None:
    """Flags every ablation sweep has: one per TrainConfig field in ``fields``, its default from ``training`` (the
    script's settings, :data:`COMMON` with its ``steps``), and the sweep's own flags."""
    cli.add_config_flags(p, training, only=fields, helps={k: v for k, v in COMMON_HELPS.items() if k in fields},
                         title="every cell's training settings (unroll_examples/training.py TrainConfig)")
    p.add_argument("--seeds", default=seeds, help="paired seeds, trained together (e.g. 0-4)")
    p.add_argument("--min-hq", type=float, default=MIN_HQ,
                   help="share of high-quality samples that 'stable coverage' requires besides all modes")
    p.add_argument("--out", default=out, help="run folders (checkpoints, metrics)")
    p.add_argument("--doc", default=str(REPO_ROOT / doc), help="the results page to write")
    p.add_argument("--fig-dir", default=None, help="figures (default: a folder named like --doc, beside it)")
    p.add_argument("--resume", action="store_true", help="continue the runs already in --out")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from the runs in --out")
    add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def parser(description: str) -> argparse.ArgumentParser:
    """An ablation script's argument parser (every default shown by ``--help``)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def base_config(args: argparse.Namespace, training: TrainConfig, fields: Sequence[str] = COMMON_FLAGS
                ) -> TrainConfig:
    """``training`` with the flags of :func:`add_common_flags` (the same ``fields``) applied: what every cell of
    the sweep shares."""
    return cli.config_from_args(args, training, only=fields)


def parse_and_check(parser: argparse.ArgumentParser, build_cells, argv: Optional[Sequence[str]]
                    ) -> Tuple[argparse.Namespace, List[Cell]]:
    """Parse flags and build the cells; every problem is an argparse error before any training starts."""
    args = parser.parse_args(argv)

    def cells_of(args: argparse.Namespace) -> List[Cell]:
        args.seed_list = tuple(parse_seeds(args.seeds))
        if not 0 <= args.min_hq <= 1:
            raise ValueError(f"--min-hq must be in [0, 1], got {args.min_hq}")
        return build_cells(args)

    cells = checked_cells(parser, args, cells_of)
    if args.fig_dir is None:
        args.fig_dir = str(Path(args.doc).with_suffix(""))
    return args, cells


def main_for(script: str, parser: argparse.ArgumentParser, build_cells: Callable[[argparse.Namespace], List[Cell]],
             write_report: Callable[..., None], argv: Optional[Sequence[str]]) -> int:
    """The whole sweep: check the flags, hold ``--out`` (:func:`runs.claim`: runs already there need
    ``--resume``, which needs runs), train every unfinished cell, rewrite the page after each and at the end.

    ``write_report(args, cells, log, command, complete)`` renders the page. Problems with the folder or a
    checkpoint are one line on stderr and exit code 2.
    """
    return runs.reports_errors(_main_for)(script, parser, build_cells, write_report, argv)


def _main_for(script: str, parser: argparse.ArgumentParser,
              build_cells: Callable[[argparse.Namespace], List[Cell]], write_report: Callable[..., None],
              argv: Optional[Sequence[str]]) -> int:
    args, cells = parse_and_check(parser, build_cells, argv)
    # The command that trains the runs: --report-only and --resume do not change them.
    command = report.command_line(f"examples/gan/{script}", argv, drop=("--report-only", "--resume"))
    resume = None if args.report_only else args.resume
    with runs.claim(Path(args.out), resume=resume, validate=lambda: check_sweep(cells, Path(args.out))):
        torch.set_num_threads(args.threads)
        log = run_cells(cells, Path(args.out), not args.no_progress, args.report_only,
                        lambda log: write_report(args, cells, log, command, complete=False))
        write_report(args, cells, log, command, complete=True)
    print(f"wrote {args.doc}")
    return 0


def seconds_per_iteration(cell: Cell, log: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Training wall time per iteration of ``cell`` (all its seeds together), from the sweep's cost log."""
    entries = [e for e in log if e["cell"] == cell.folder and e["to_step"] > e["from_step"]]
    if not entries:
        return None
    return sum(e["seconds"] for e in entries) / sum(e["to_step"] - e["from_step"] for e in entries)


def add_timing_flags(p: argparse.ArgumentParser) -> None:
    """Flags of :func:`timings`: how long the side-by-side timing of the cells runs."""
    p.add_argument("--timing-iterations", type=positive_int, default=20, help="timed iterations per cell and round")
    p.add_argument("--timing-rounds", type=positive_int, default=3, help="rounds of timing, the cells interleaved")


def time_cells(cells: Sequence[Cell], iterations: int, rounds: int, warmup: int = 1) -> Dict[str, float]:
    """Seconds per iteration of every cell (all its seeds vmapped, random draws included, no evaluation): the
    median over ``rounds`` rounds of ``iterations`` iterations each, the cells interleaved within a round, after
    ``warmup`` untimed iterations (first-call overheads; state that grows, such as an ensemble filling up)."""
    def iteration(trainer: Trainer) -> Callable[[], None]:
        def step() -> None:
            trainer.state, _ = trainer.step_fn(trainer.state, trainer.draw_batch())
        return step

    steps = {c.folder: iteration(Trainer(c.cfg, c.seeds, strategies=c.strategies)) for c in cells}
    return interleaved_seconds(steps, iterations, rounds, warmup)


def timings(args: argparse.Namespace, cells: Sequence[Cell], complete: bool,
            warmup: int = 1) -> Optional[Dict[str, float]]:
    """The measured cost per iteration (:func:`time_cells`), timed once when the sweep is complete and kept in
    ``--out``."""
    path = Path(args.out) / TIMING_FILE
    known = read_timing(Path(args.out))
    if complete and any(c.folder not in known for c in cells):
        known.update(time_cells([c for c in cells if c.folder not in known], args.timing_iterations,
                                args.timing_rounds, warmup))
        runs.write_json(path, known)
    return known or None


def stable_steps(meta: Dict[str, Any], n_modes: int, min_hq: float) -> List[Optional[int]]:
    """Per seed, the iteration from which the run keeps stable coverage (None: never within the run)."""
    by_seed: Dict[int, List[Dict[str, Any]]] = {}
    for record in meta["records"]:
        by_seed.setdefault(record["seed"], []).append(record)
    return [steps_to_stable_coverage(by_seed[s], n_modes, min_hq) for s in sorted(by_seed)]


def describe_stable(steps: Sequence[Optional[int]]) -> str:
    """``"4/5 settled, median 1250"``; the median counts unsettled runs as later than any settled one."""
    settled = sorted(s for s in steps if s is not None)
    if not settled:
        return f"0/{len(steps)} settled"
    median = statistics.median(settled + [math.inf] * (len(steps) - len(settled)))
    median_text = "not settled" if math.isinf(median) else f"{median:g}"
    return f"{len(settled)}/{len(steps)} settled, median {median_text}"


RESULT_HEADER = ["run", "iterations", "stable coverage (iteration)", "modes (strict)", "all modes", "HQ %",
                 "reverse KL", "s / iteration"]
STRICT_FIRST_MODES = "strict modes (lenient)"
"""The modes column's header with ``strict_first`` (:func:`result_row`): the strict count, then the lenient one."""


def result_row(label: str, cell: Cell, meta: Optional[Dict[str, Any]], n_modes: int, min_hq: float,
               log: Sequence[Dict[str, Any]], strict_first: bool = False) -> List[str]:
    """One table row: steps to stable coverage and the final metrics (mean ± s.e. over seeds); the modes column
    is "lenient (strict)", or with ``strict_first`` "strict (lenient)" (:data:`STRICT_FIRST_MODES`)."""
    if meta is None:
        return [label, "not run"] + [""] * (len(RESULT_HEADER) - 2)
    step = max(r["step"] for r in meta["records"])
    status = "" if meta["status"] == "done" else f" ({meta['status']})"
    recs = finite_records(final_records(meta))
    cost = seconds_per_iteration(cell, log)
    cost_text = "" if cost is None else f"{cost:.3f}"
    if not recs:
        return [label, f"{step}{status}", "diverged"] + [""] * 4 + [cost_text]
    stats = {k: summary_stats([r[k] for r in recs]) for k in ("modes", "modes_strict", "hq", "reverse_kl")}
    return [label, f"{step}{status}", describe_stable(stable_steps(meta, n_modes, min_hq)),
            (f"{fmt(stats['modes_strict'], digits=1)} ({fmt(stats['modes'], digits=1)})" if strict_first else
             f"{fmt(stats['modes'], digits=1)} ({fmt(stats['modes_strict'], digits=1)})"),
            f"{sum(r['modes'] == n_modes for r in recs)}/{len(recs)}", fmt(stats["hq"], 100, 1),
            fmt(stats["reverse_kl"], digits=3), cost_text]


def seed_numbers(meta: Dict[str, Any], n_modes: int, min_hq: float) -> Dict[str, List[Any]]:
    """Per seed: the iteration of stable coverage (None: not settled) and the final metrics."""
    last = sorted(final_records(meta), key=lambda r: r["seed"])
    return {"seeds": [r["seed"] for r in last], "stable_coverage": stable_steps(meta, n_modes, min_hq),
            **{k: [r[k] for r in last] for k in ("modes", "modes_strict", "hq", "reverse_kl")}}


def timed_results_table(metas: Sequence[CellMeta], args: argparse.Namespace, n_modes: int,
                        log: Sequence[Dict[str, Any]], costs: Dict[str, float],
                        reference: Optional[Tuple[str, str]] = None, strict_first: bool = False) -> str:
    """:func:`results_table` with a last column: each cell's timed cost per iteration over the first cell's
    (the plain GAN), or over ``reference`` = (its folder, its name in the header); ``strict_first``: as in
    :func:`result_row`."""
    folder, name = reference or (metas[0][0].folder, "K=0")
    plain = costs.get(folder)
    rows = []
    for cell, meta in metas:
        cost = costs.get(cell.folder)
        rows.append(result_row(cell.label, cell, meta, n_modes, args.min_hq, log, strict_first)
                    + ["" if cost is None or plain is None else f"{cost / plain:.2f}×"])
    header = [STRICT_FIRST_MODES if strict_first and h == "modes (strict)" else h for h in RESULT_HEADER]
    return table(rows, header + [f"cost vs {name} (timed)"])


def per_seed_json(args: argparse.Namespace, metas: Sequence[CellMeta], n_modes: int, command: str,
                  costs: Dict[str, float]) -> List[str]:
    """Write every row's per-seed numbers to ``<fig-dir>/per_seed.json``; the page's line that links it. Each row
    names its own length (``iterations``): a sweep's rows need not share ``--steps`` (second_gradient.py's
    five-G-step regime has ``--steps-g5``)."""
    numbers = {"command": command, "dataset": args.dataset, "iterations": args.steps, "min_hq": args.min_hq,
               "rows": [{"label": c.label, "folder": c.folder, "iterations": c.cfg.steps,
                         "s_per_iteration_timed": costs.get(c.folder),
                         **seed_numbers(m, n_modes, args.min_hq)} for c, m in metas if m is not None]}
    return [report.write_per_seed(Path(args.doc), Path(args.fig_dir) / "per_seed.json", numbers), ""]


def load_all(cells: Sequence[Cell], out_root: Path) -> List[CellMeta]:
    return [(c, read_cell(c, out_root / c.folder)) for c in cells]


def draw_figure(cells: List[CellMeta], out_root: Path, args: argparse.Namespace, name: str,
                title: str) -> Optional[Tuple[Path, str]]:
    """Write a Fig. 2-style grid (rows = cells, first seed; columns = evaluations) to ``<fig-dir>/<name>.png``:
    its path and title (for :func:`report.figure` or :func:`report.opening`), None when there is nothing to
    draw."""
    path = Path(args.fig_dir) / f"{name}.png"
    return (path, title) if figure_for(args.dataset, cells, out_root, path, title=title) else None


def figure_markdown(cells: List[CellMeta], out_root: Path, args: argparse.Namespace, name: str,
                    title: str) -> List[str]:
    """Write a Fig. 2-style grid (:func:`draw_figure`) and return its markdown."""
    figure = draw_figure(cells, out_root, args, name, title)
    return [] if figure is None else [report.figure(args.doc, *figure), ""]


def start_page(title: str, intro: str, args: argparse.Namespace, cells: Sequence[Cell], command: str,
               complete: bool) -> Tuple[List[CellMeta], int, List[str]]:
    """The cells' runs, the number of modes, and the page's first lines: title, status, the command, the settings
    every table shares, ``intro`` and the hand-written notes kept from the existing page."""
    metas = load_all(cells, Path(args.out))
    n_modes = n_modes_of(args.dataset)
    status = page_status(metas, complete)
    return metas, n_modes, [
        f"# {title}", "",
        *report.made_by(command, f"Status: **{status}**. Made by:"), "",
        f"Settings: the mixture experiment of App. A (`examples/gan/mixture.py`) on the `{args.dataset}` data "
        f"({n_modes} modes), {len(args.seed_list)} paired seeds per row (seed s has the same initial parameters and "
        f"data in every row), trained together with `torch.func.vmap`. Adam β=(0.5, 0.999), batch 512, saturating "
        f"generator loss; D lr {args.d_lr:g}, G lr {args.g_lr:g}, look-ahead lr {args.unroll_lr:g} (App. A uses "
        f"1e-4 for all three; at 1e-4 K = 10 settles only after 6,500–9,500 iterations, see "
        f"[mixture_app_a.md](mixture_app_a.md)). "
        f"One *iteration* is one D update followed by the G updates of the regime. Metrics on {args.eval_samples:,} "
        f"samples every {args.eval_every} iterations. **Stable coverage**: the first evaluation from which every "
        f"later one has all {n_modes} modes covered by the strict count (each mode gets at least 1% of the "
        f"high-quality samples its weight predicts) and at least {100 * args.min_hq:g}% high-quality samples "
        f"(`metrics.steps_to_stable_coverage`); 'settled' counts the seeds that got there. Final metrics: mean ± "
        f"standard error over seeds at the last evaluation; s / iteration is the measured training time of all "
        f"seeds together (one thread).", "",
        intro, "", report.notes_block(args.doc), "",
    ]


def results_table(rows: Sequence[CellMeta], args: argparse.Namespace, n_modes: int,
                  log: Sequence[Dict[str, Any]]) -> str:
    """One :func:`result_row` per cell."""
    return table([result_row(c.label, c, m, n_modes, args.min_hq, log) for c, m in rows], RESULT_HEADER)


def write_page(doc: Path, lines: Sequence[str], log: Sequence[Dict[str, Any]], opening: Sequence[str] = ()
               ) -> None:
    """Write the page, ending with the total training time of the sweep; ``opening`` (:func:`report.opening`:
    the kept verdict and the main figure) follows the title."""
    total = sum(e["seconds"] for e in log)
    lines = list(lines[:2]) + list(opening) + list(lines[2:]) + [
                           f"Training time of all cells: {total / 60:.1f} min, summed over cells (each cell on one "
                           f"thread, all its seeds together with torch.func.vmap). The 2-core machine was shared "
                           f"with other jobs, so s / iteration is noisy.", ""]
    report.write_page(Path(doc), lines)


def n_modes_of(dataset: str) -> int:
    return make_mixture(dataset).n_modes
