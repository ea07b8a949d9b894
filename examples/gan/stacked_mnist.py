"""Stacked MNIST: discrete mode collapse (Metz et al., 2017, Sec. 3.3.1, Table 1, App. E).

Three random MNIST digits stacked as R, G, B give 1000 modes. A GAN with App. E's small generator and a
discriminator of size X is trained for every K (unrolled steps), X and seed; an MNIST classifier (trained by
``mnist_classifier.py``, cached) labels each channel of the generator's samples, and Table 1 reports the
modes with at least one sample and KL(model || uniform over the 1000 modes).

    python examples/gan/stacked_mnist.py            # reduced default: about 25 minutes on 2 CPU cores (measured on one
                                                    # machine; 3-4x that on a slower one: docs/reproducibility.md)
    python examples/gan/stacked_mnist.py --paper    # the paper's configuration (days on a CPU: for a GPU)
    python examples/gan/stacked_mnist.py --resume   # continue an interrupted run in the same --out
    python examples/gan/stacked_mnist.py --report-only  # remake docs/results/stacked_mnist.md from its per-seed file
    # the controls (docs/results/stacked_mnist_controls.md): first the committed D steps whose cost matches each
    # row that looks ahead (timed side by side, nothing trained), then every row beside its step-matched (K + 1)
    # and cost-matched controls, timed side by side again after training
    python examples/gan/stacked_mnist.py --K 5 10 --alphas 5 --steps 1000 --match-cost --out runs/stacked_mnist_cost
    python examples/gan/stacked_mnist.py --K 0 5 10 --controls 6 11 18 36 --alphas 5 --seeds 0 1 2 3 4 \
        --steps 1000 --out runs/stacked_mnist_controls --doc docs/results/stacked_mnist_controls.md
    torchrun --nproc_per_node 8 examples/gan/stacked_mnist.py --paper --device cuda   # data-parallel, one GPU
                                                    # per rank (docs/distributed.md)

Writes ``results.json`` (settings, deviations from the paper, per-run metrics, the table beside the paper's),
``samples.png``, ``samples_over_training.png``, ``losses.png`` and one folder per run with ``checkpoint.pt`` and
``result.json``; with ``--per-seed FILE`` every run's final numbers, and with ``--doc PAGE`` the results page made
from them (``--report-only`` remakes it from the per-seed file alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from unroll_examples import digit_classifier as mc
from unroll_examples import image_experiment as ex
from unroll_examples import image_models as models
from unroll_examples import image_training as it
from unroll_examples import parallel, report, runs
from unroll_examples.cli import positive_int
from unroll_examples.image_metrics import stacked_mode_stats
from unroll_examples.mnist_data import StackedMNIST, load_mnist

# ------------------------------------------------------------------------------------------ configuration
# The settings of this script: fields of ex.ImageConfig, each a flag of its name (eval_samples -> --eval-samples),
# in the order results.json and settings.json store them.
SETTINGS = ("K", "sizes", "controls", "alphas", "seeds", "steps", "eval_samples", "d_lr", "g_lr", "batch", "beta1",
            "unroll_lr", "g_loss", "snapshot_every", "checkpoint_every", "split", "out")
# The paper's configuration (App. E gives the models; training follows App. D): the settings it states ...
PAPER_STATES = ("K", "sizes", "seeds", "steps", "eval_samples", "d_lr", "g_lr")
PAPER = ex.ImageConfig(K=(0, 1, 5, 10), sizes=("1/4", "1/2"), seeds=(0, 1, 2, 3, 4), steps=50_000,
                       eval_samples=25_600, d_lr=2e-4, g_lr=1e-4,
                       # ... and ours, where it states none
                       batch=64, beta1=0.5, unroll_lr=None, g_loss="nonsaturating", snapshot_every=2_500,
                       checkpoint_every=500, split="auto", out="runs/stacked_mnist")
CONFIGS = {
    # The default: every K and X of Table 1, 3 seeds, short training at a higher learning rate, fewer evaluation
    # samples (measured 0.59 s per iteration of all 8 cells at 1 thread, ~3 s per evaluation: 23 minutes with 2
    # workers).
    "reduced": dataclasses.replace(PAPER, seeds=(0, 1, 2), steps=1_500, eval_samples=2_560, d_lr=ex.REDUCED_LR,
                                   g_lr=ex.REDUCED_LR, snapshot_every=150, checkpoint_every=50),
    "paper": PAPER,  # --paper
}
# Deviations and open details besides the settings above that differ from PAPER_STATES ({name}: the setting).
NOTES = [
    "training length: App. E gives none; the paper's value above assumes App. D's 100k network updates "
    "(50k iterations of one D and one G update)",
    "batch size: not stated in the paper; {batch} here",
    "Adam beta1 = {beta1} (stated in App. A/C, not in App. D/E)",
    ex.LR_NOTE,
    "generator loss: -log D(G(z)) (App. D's L_G, whose sign the text drops)",
    "unrolled steps reuse the iteration's minibatch (Sec. 3: 'fixed minibatches') and continue from D's "
    "current Adam state",
    "models: 3x3 kernels, padding 1, batch norm after every layer but the outputs, tanh output, Xavier init "
    "(see image_models.py)",
    "digit classifier: a CNN trained by mnist_classifier.py (the paper's classifier is not described)",
    "samples are drawn with the generator's batch norm in evaluation mode (running statistics)",
]
# --match-cost: committed D steps per iteration timed beside the rows that look ahead (a line through them gives
# the match; an unrolled step costs a few committed ones), and the file it writes.
MATCH_CANDIDATES = (1, 11, 21, 31, 41)
COST_MATCH_FILE = "cost_match.json"
# Table 1 of the paper: modes covered and KL(model || data), mean ± standard error.
PAPER_TABLE = {
    ("1/4", 0): "30.6 ± 20.73 modes, KL 5.99 ± 0.42", ("1/4", 1): "65.4 ± 34.75 modes, KL 5.911 ± 0.14",
    ("1/4", 5): "236.4 ± 63.30 modes, KL 4.67 ± 0.43", ("1/4", 10): "327.2 ± 74.67 modes, KL 4.66 ± 0.46",
    ("1/2", 0): "628.0 ± 140.9 modes, KL 2.58 ± 0.751", ("1/2", 1): "523.6 ± 55.768 modes, KL 2.44 ± 0.26",
    ("1/2", 5): "732.0 ± 44.98 modes, KL 1.66 ± 0.090", ("1/2", 10): "817.4 ± 37.91 modes, KL 1.43 ± 0.12",
}


# ------------------------------------------------------------------------------------------ the results page

def _mean_se(stats: Tuple[float, float]) -> str:
    return "—" if stats[0] != stats[0] else report.plus_minus_sig(*stats)  # NaN: no finished run


def _row_seconds(payload: Mapping[str, Any], x: str) -> Dict[str, float]:
    """The side-by-side cost per iteration of each row at size ``x`` (the file's summary; empty without one)."""
    return dict((payload.get("summary") or {}).get("seconds_per_iteration", {}).get(x, {}))


def page_body(payload: Mapping[str, Any], doc: Path) -> List[str]:
    """The page's tables: per X and row the modes and KL (mean ± s.e.) beside Table 1 and, with controls, the cost
    per iteration; then every seed's modes and KL; with controls, every look-ahead row against its controls, seed
    by seed."""
    settings = payload["settings"]
    rows_of = ex.setting_rows(settings)
    timed = bool(payload.get("summary"))
    rows = []
    for x in settings["sizes"]:
        seconds = _row_seconds(payload, x)
        plain = seconds.get(ex.row_label({"K": 0}))
        for row in rows_of:
            label = ex.row_label(row)
            paper = (PAPER_TABLE.get((x, row["K"]), "— modes, KL —") if ex.row_of(row)[1:] == (1, None)
                     else "— modes, KL —").split(" modes, KL ")
            cost = ([f"{seconds[label]:.3f} s" + (f" ({seconds[label] / plain:.1f}×)" if plain else "")
                     if label in seconds else "—"] if timed else [])
            rows.append([x, label, _mean_se(ex.cell_stats(payload, "modes", X=x, **row)),
                         _mean_se(ex.cell_stats(payload, "kl", X=x, **row)), *cost, *paper])
    cost_header = ["cost per iteration (× K = 0)"] if timed else []
    per_seed = [[x, ex.row_label(row)] + [f"{cells[seed]['modes']} ({cells[seed]['kl']:.2f})" if seed in cells
                                          else "—" for seed in settings["seeds"]]
                for x in settings["sizes"] for row in rows_of for cells in [ex.runs_of(payload, X=x, **row)]]
    lines = [
        report.table(rows, ["X", "row", "modes covered (ours)", "KL (ours)", *cost_header, "paper modes",
                            "paper KL"]), "",
        "The paper's numbers are Table 1 of Metz et al. (2017) (25,600 samples per model, standard errors over "
        "runs)." + (" Costs: seconds per training iteration of every row, timed side by side in one process "
                    "after training (untrained models of the first seed, "
                    f"{payload['summary']['timing_rounds']} interleaved rounds of "
                    f"{payload['summary']['timing_iterations']} iterations, median)." if timed else ""), "",
        f"Per seed ({ex.seeds_text(settings['seeds'])}): modes covered (KL):", "",
        report.table(per_seed, ["X", "row"] + [f"seed {seed}" for seed in settings["seeds"]]), "",
    ]
    if settings.get("controls"):
        lines += _control_comparisons(payload), ""
    return lines


def _control_comparisons(payload: Mapping[str, Any]) -> str:
    """Every look-ahead row (K > 0 or an alpha) against its step-matched control (K + 1 committed D steps) and its
    cost-matched one (the control whose side-by-side cost is closest), paired by seed."""
    settings = payload["settings"]
    controls = [{"K": 0, "d_steps": n} for n in settings["controls"]]
    body = []
    for x in settings["sizes"]:
        seconds = _row_seconds(payload, x)
        for row in ex.setting_rows(settings):
            if ex.row_of(row)[0] == 0:
                continue
            label = ex.row_label(row)
            matches = [(c, "step-matched") for c in controls
                       if row.get("alpha") is None and c["d_steps"] == row["K"] + 1]
            if label in seconds:
                nearest = min(controls, key=lambda c: abs(seconds.get(ex.row_label(c), math.inf) - seconds[label]))
                if ex.row_label(nearest) in seconds:
                    ratio = seconds[label] / seconds[ex.row_label(nearest)]
                    matches.append((nearest, f"cost-matched ({ratio:.2f}× its cost)"))
            for control, kind in matches:
                ours, theirs = ex.runs_of(payload, X=x, **row), ex.runs_of(payload, X=x, **control)
                paired = sorted(set(ours) & set(theirs))
                modes = [ours[s]["modes"] - theirs[s]["modes"] for s in paired]
                kls = [ours[s]["kl"] - theirs[s]["kl"] for s in paired]
                ahead = sum(d > 0 for d in modes)
                body.append([x, label, f"{ex.row_label(control)}, {kind}", str(len(paired)),
                             _mean_se(report.mean_and_se(modes)), f"{ahead} of {len(paired)}",
                             _mean_se(report.mean_and_se(kls))])
    return report.table(body, ["X", "row", "against", "paired seeds", "modes, row − control",
                               "row covers more", "KL, row − control"])


def check_summary(summary: Any) -> Optional[str]:
    """What is wrong with the per-seed file's ``summary`` (None when nothing is): a file without one is read (its page
    has no cost column); one with it holds the side-by-side cost of every row per size and how it was timed."""
    if summary is None:
        return None
    if not isinstance(summary, dict):
        return "must be an object"
    for field in ("timing_rounds", "timing_iterations"):
        if not runs.is_a(summary.get(field), int) or summary[field] < 1:
            return f"{field} must be a positive integer, got {summary.get(field)!r}"
    costs = summary.get("seconds_per_iteration")
    if not isinstance(costs, dict) or not all(isinstance(rows, dict) for rows in costs.values()):
        return "seconds_per_iteration must map each size to an object of rows"
    for x, rows in costs.items():
        for label, seconds in rows.items():
            if not report.safe_text(label) or not report.is_finite_number(seconds) or seconds <= 0:
                return f"seconds_per_iteration[{x!r}][{label!r}] must be a positive number, got {seconds!r}"
    return None


PAGE = ex.PageSpec(name="stacked_mnist", title="Stacked MNIST: discrete mode collapse (Sec. 3.3.1, Table 1)",
                   keys={"X": str}, metrics=("modes", "kl"), check_summary=check_summary,
                   subtitle=lambda settings: ", against committed discriminator steps" if settings.get("controls")
                   else "",
                   figures=(("samples.png", "final samples of each cell's first seed"),),
                   body=page_body, about=ex.paragraph(__doc__, 1))



def build_parser() -> argparse.ArgumentParser:
    p = ex.config_parser(__doc__, CONFIGS, SETTINGS,
                         helps={"eval_samples": "generator samples labelled per run"})
    p.add_argument("--classifier-cache", default=None,
                   help=f"digit classifier cache file (default {mc.cache_path()})")
    p.add_argument("--classifier-train", type=int, default=None,
                   help=f"digits the classifier trains on (default {mc.ClassifierConfig().n_train})")
    p.add_argument("--classifier-epochs", type=int, default=None,
                   help=f"classifier epochs (default {mc.ClassifierConfig().epochs})")
    p.add_argument("--match-cost", action="store_true",
                   help="train nothing: time every row that looks ahead (--K > 0, --alphas) beside controls of "
                        "--match-candidates committed D steps, side by side in this process, and write the D steps "
                        f"whose cost matches each row to <out>/{COST_MATCH_FILE}")
    p.add_argument("--match-candidates", type=positive_int, nargs="+", default=list(MATCH_CANDIDATES), metavar="N",
                   help="committed D steps per iteration timed by --match-cost (a line through their costs gives "
                        "the match)")
    p.add_argument("--timing-iterations", type=positive_int, default=3,
                   help="timed iterations per row and round (--match-cost, and the cost column of a run with "
                        "--controls or --alphas)")
    p.add_argument("--timing-rounds", type=positive_int, default=10, help="rounds of timing, the rows interleaved")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, ex.ImageConfig, Path]:
    """Parse and validate every flag: any problem is an argparse error before any work starts."""
    p = build_parser()
    args, config, _, out = ex.parse_config(p, argv, CONFIGS, SETTINGS, at_least={"eval_samples": 1})
    for flag in ("classifier_train", "classifier_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    ex.resolve_page_flags(p, args, PAGE.name)
    if args.match_cost and (args.report_only or not any(K > 0 for K in config.K) and not config.alphas):
        p.error("--match-cost times the rows that look ahead against controls: give --K > 0 or --alphas, and "
                "no --report-only")
    if args.match_cost and len(set(args.match_candidates)) < 2:
        p.error(f"--match-candidates needs two distinct counts at least, got {args.match_candidates}")
    return args, config, out


def classifier_config(args: argparse.Namespace) -> mc.ClassifierConfig:
    config = mc.ClassifierConfig()
    if args.classifier_train is not None:
        config = dataclasses.replace(config, n_train=args.classifier_train)
    if args.classifier_epochs is not None:
        config = dataclasses.replace(config, epochs=args.classifier_epochs)
    return config


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args, config, out = parse_args(argv)
    if args.report_only:
        return ex.report_only(PAGE, args)
    classifier = classifier_config(args)
    ranks = parallel.from_environment(config.batch, torch.device(args.device).type)  # None without torchrun
    args.device = parallel.rank_device(args.device, ranks)
    # The classifier labels every sample: its settings are the evaluation's.
    with ex.session(args, ex.settings_of(config, SETTINGS), out, extra={"classifier": dataclasses.asdict(classifier)},
                    parallel=ranks) as start:
        return run(args, config, out, classifier, start, argv, ranks)


def run(args: argparse.Namespace, config: ex.ImageConfig, out: Path, classifier_cfg: mc.ClassifierConfig,
        start: float, argv: Optional[Sequence[str]], ranks: Optional[parallel.DataParallel] = None) -> int:
    """Train the classifier (or load it), every run, then the table and figures. Under ``torchrun`` (``ranks``)
    rank 0 trains and caches the classifier first, every rank trains every run on its shards and evaluates it
    (the replicas are identical), and rank 0 alone writes."""
    settings = ex.settings_of(config, SETTINGS)
    mnist = ex.load_data(load_mnist, config.split, args.data_dir)
    data = StackedMNIST(mnist)
    notes = ex.split_note(mnist) + ex.paper_deviations(config, PAPER, PAPER_STATES, NOTES)
    if config.controls or config.alphas:
        notes.append(f"rows the paper does not have: controls that commit {list(config.controls)} D steps per "
                     f"iteration (K = 0) and the one-step extrapolation (Sec. 4) with alpha {list(config.alphas)}")
    ex.announce("Stacked MNIST (Sec. 3.3.1, Table 1)", settings, notes, print)

    with parallel.rank_zero_first(ranks):
        classifier, report = mc.load_or_train(classifier_cfg, args.data_dir, args.classifier_cache,
                                              progress=not args.no_progress and (ranks is None or ranks.writes))
    print(f"digit classifier: {100 * report['heldout_accuracy']:.2f}% on {report['n_heldout']} held-out digits "
          f"of the {report['data']} ({'cached' if report['cached'] else 'trained now'}: {report['cache_path']})")
    if report["heldout_accuracy"] < mc.TARGET_ACCURACY:
        print(f"warning: the classifier is below the {100 * mc.TARGET_ACCURACY:.1f}% target; mode labels are "
              f"unreliable")

    gans = {size: stacked_gan(size, data) for size in config.sizes}
    if args.match_cost:
        return match_cost(args, settings, gans, out)
    specs = [spec for size, gan in gans.items() for spec in ex.run_specs(gan, settings, X=size)]

    def evaluate(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
        labels, _ = mc.label_stacked(classifier, trainer.samples(config.eval_samples))
        stats = stacked_mode_stats(labels)
        return {"modes": stats.modes, "kl": stats.kl, "n_samples": stats.n_samples}

    records, trainers = ex.run(args, specs, out, evaluate, ex.eval_settings(
        settings, ("eval_samples",), classifier=dataclasses.asdict(classifier_cfg)), ranks)
    status = 3 if any(r["status"] != "done" for r in records) else 0
    if ranks is not None and not ranks.writes:
        return status  # rank 0 writes the table, results.json and the figures
    summary = None
    if config.controls or config.alphas:  # the rows' costs, side by side: what "cost-matched" is checked against
        print(f"timing every row side by side ({args.timing_rounds} rounds of {args.timing_iterations} iterations)")
        summary = {"seconds_per_iteration": {size: ex.row_costs(gan, settings, args.timing_iterations,
                                                                args.timing_rounds, args.device)
                                             for size, gan in gans.items()},
                   "timing_rounds": args.timing_rounds, "timing_iterations": args.timing_iterations}
    keys = ("X", "K", *ex.ROW_FIELDS)
    rows = ex.aggregate(records, keys, ("modes", "kl"))
    table = ex.markdown_table(rows, [("modes", "modes covered"), ("kl", "KL(model || uniform)")],
                              {(x, k, None, None): v for (x, k), v in PAPER_TABLE.items()}, keys)
    ex.finish(out, "stacked_mnist", argv, settings, notes, records, rows, table, trainers, specs, start,
              extra={"data": data.source, "classifier": report, "paper_table": {f"X={x}, K={k}": v for (x, k), v
                                                                                  in PAPER_TABLE.items()}},
              per_seed=args.per_seed, summary=summary)
    ex.publish(PAGE, args, out)
    return status


def stacked_gan(size: str, data: StackedMNIST) -> it.ImageGAN:
    """App. E's generator against the discriminator of size ``size`` on ``data``."""
    def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
        return data.sample(n, gen)[0]

    return it.ImageGAN(f"stacked_mnist(X={size})", models.stacked_generator,
                       lambda: models.stacked_discriminator(models.parse_size(size)), sample_data)


def match_cost(args: argparse.Namespace, settings: Mapping[str, Any], gans: Mapping[str, it.ImageGAN],
               out: Path) -> int:
    """``--match-cost``: per size, the committed D steps whose cost matches each row that looks ahead
    (:func:`image_experiment.match_cost`), written to ``<out>/cost_match.json`` and printed; trains nothing."""
    result = {"experiment": "stacked_mnist", "settings": dict(settings), "sizes": {}}
    for size, gan in gans.items():
        print(f"X = {size}: timing {len(args.match_candidates)} controls beside the rows that look ahead")
        match = ex.match_cost(gan, settings, args.match_candidates, args.timing_iterations, args.timing_rounds,
                              args.device)
        result["sizes"][size] = match
        for label, row in match["rows"].items():
            print(f"  {label}: {row['seconds']:.4f} s per iteration; {row['matched_d_steps']} D steps: "
                  f"{row['control_seconds']:.4f} s ({row['ratio']:.2f}x)")
    runs.write_json(out / COST_MATCH_FILE, result)
    print(f"written: {out / COST_MATCH_FILE}")
    print(json.dumps({size: {label: row["matched_d_steps"] for label, row in match["rows"].items()}
                      for size, match in result["sizes"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
