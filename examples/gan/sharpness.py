"""Why do converged generators keep a halo between the modes? Fine-tune a settled mixture run several ways.

At convergence our unrolled generators cover every mode but keep a halo of samples along the circle between
them: 15-28% high-quality (HQ) samples, where VEEGAN reports 35.6% for Unrolled GAN. Candidate causes: too few
iterations, learning rates that stay high to the end, a small batch, the saturating generator loss. Each variant
starts from the same finished run (``mixture.py`` or a sweep cell: the parameters, Adam states and data streams
its ``final.pt`` exports) and trains ``--steps`` more iterations with one factor changed; "continue" changes nothing
(the same run, longer), so every other row is read against it.

    python examples/gan/sharpness.py --from runs/mixture_sweep/main/<cell> --seeds 0-4 --steps 500

writes ``<--doc>`` (a table, per-seed JSON beside it) and one run folder per variant under ``--out``; a killed
sweep is resumed by the same command (each variant continues from its own checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from unroll_examples import REPO_ROOT, report, runs
from unroll_examples.cli import HelpFormatter, add_threads_flag, parse_seeds
from unroll_examples.data import make_mixture
from unroll_examples.metrics import metric_records
from unroll_examples.report import fmt, summary_stats, table
from unroll_examples.runs import CHECKPOINT, FINAL
from unroll_examples.sweeps import final_records, finished_run, finite_records
from unroll_examples.training import TrainConfig, Trainer, select_seeds

# ---- configuration: (label, what changes) ----
VARIANTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("continue (nothing changed)", {}),
    ("all learning rates ×0.1", {"lr_scale": 0.1}),
    ("all learning rates ×0.01", {"lr_scale": 0.01}),
    ("generator lr ×0.1 only", {"g_lr_scale": 0.1}),
    ("batch ×4", {"batch_scale": 4}),
    ("non-saturating generator loss", {"loss": "nonsaturating"}),
)


def variant_config(base: TrainConfig, change: Dict[str, Any], steps: int) -> TrainConfig:
    """The source run's configuration with one factor changed, trained for ``steps`` more iterations."""
    lr = change.get("lr_scale", 1.0)
    return dataclasses.replace(
        base, steps=steps, d_lr=base.d_lr * lr, g_lr=base.g_lr * lr * change.get("g_lr_scale", 1.0),
        unroll_lr=base.effective_unroll_lr * lr, batch=base.batch * change.get("batch_scale", 1),
        loss=change.get("loss", base.loss))


def load_source(folder: Path, seeds: Optional[Sequence[int]]
                ) -> Tuple[TrainConfig, runs.Checkpoint, List[Dict[str, Any]]]:
    """A finished run's configuration, its final state restricted to the chosen seeds (default: all), and their
    metric records at its last iteration."""
    meta = finished_run(folder)
    final = runs.read_final(folder / FINAL)
    config = {k: v for k, v in final.settings.items() if k != "seeds"}
    with runs.reading(folder / FINAL):
        cfg = TrainConfig(**config)
    chosen = [int(s) for s in final.settings.get("seeds", [])] if seeds is None else list(seeds)
    final = select_seeds(final, chosen)
    records = [r for r in meta["records"] if r["step"] == final.step and r["seed"] in chosen]
    return cfg, final, records


def train_variant(cfg: TrainConfig, source: runs.Checkpoint, folder: Path, progress: bool) -> Dict[str, Any]:
    """Train one variant from the source's final state (or from its own checkpoint after a kill); its
    metrics.json."""
    meta = runs.read_json(folder / "metrics.json")
    if meta is not None and meta["status"] == "done":
        return meta
    resume = (folder / CHECKPOINT).exists()
    trainer = Trainer(cfg, source.settings["seeds"], out_dir=folder, resume=resume, progress=progress,
                      start=None if resume else source)
    trainer.run()
    return runs.read_json(folder / "metrics.json")


def row(label: str, records: List[Dict[str, Any]], n_modes: int) -> List[str]:
    recs = finite_records(records)
    stats = {k: summary_stats([r[k] for r in recs]) for k in ("modes_strict", "hq", "reverse_kl", "energy")}
    return [label, fmt(stats["modes_strict"]), f"{sum(r['modes_strict'] == n_modes for r in recs)}/{len(recs)}",
            f"{fmt(stats['hq'], 100, 1)} ({100 * stats['hq']['median']:.1f})", fmt(stats["reverse_kl"], digits=3),
            fmt(stats["energy"], digits=4)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="a finished run folder (final.pt, metrics.json)")
    p.add_argument("--seeds", default=None, help="a subset of the run's seeds (default: all)")
    p.add_argument("--steps", type=int, default=500, help="fine-tuning iterations per variant")
    p.add_argument("--eval-every", type=int, default=250, help="iterations between evaluations")
    p.add_argument("--out", default="runs/sharpness", help="one run folder per variant")
    p.add_argument("--doc", default=str(REPO_ROOT / "docs/results/sharpness.md"), help="the results page")
    add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be >= 1")
    try:
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
        base, source, source_records = load_source(Path(args.source), seeds)
        seeds = source.settings["seeds"]
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    n_modes = make_mixture(base.dataset).n_modes
    start = source.step
    rows = [row(f"source run at iteration {start}", source_records, n_modes)]
    numbers: Dict[str, Any] = {"source": str(args.source), "source_step": start, "seeds": seeds, "variants": []}
    with runs.claim(Path(args.out), resume=None):  # variants continue from their own checkpoints
        for label, change in VARIANTS:
            cfg = dataclasses.replace(variant_config(base, change, args.steps), eval_every=args.eval_every)
            name = label.split(" (")[0].replace(" ", "_").replace("×", "x")
            meta = train_variant(cfg, source, Path(args.out) / name, not args.no_progress)
            rows.append(row(f"{label}, +{args.steps}", final_records(meta), n_modes))
            numbers["variants"].append({"label": label, "config": dataclasses.asdict(cfg),
                                        "records": metric_records(meta["records"])})
    command = report.command_line("examples/gan/sharpness.py", argv)
    doc = Path(args.doc)
    per_seed_line = report.write_per_seed(doc, doc.with_suffix("") / "per_seed.json", numbers)
    lines = ["# Sharpness: fine-tuning a finished run one factor at a time", "", *report.opening(doc),
             *report.made_by(command),
             "", f"Source: `{args.source}` ({base.dataset}, K={base.K}{' control' if base.control else ''}, D lr "
             f"{base.d_lr:g}, G lr {base.g_lr:g}, look-ahead lr {base.effective_unroll_lr:g}, batch {base.batch}, "
             f"{base.loss} loss), seeds {seeds}, from iteration {start}. Each variant trains {args.steps} more "
             "iterations from the same parameters, Adam states and data streams. Mean ± s.e. over seeds; HQ median "
             "in parentheses.", "", report.notes_block(doc), "",
             table(rows, ["variant", "strict modes", "all modes strict", "HQ % (median)", "reverse KL",
                          "energy dist."]), "",
             per_seed_line, ""]
    report.write_page(doc, lines)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
