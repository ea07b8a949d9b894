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
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from unroll_examples import digit_classifier as mc
from unroll_examples import image_experiment as ex
from unroll_examples import image_models as models
from unroll_examples import image_training as it
from unroll_examples import parallel, report, runs
from unroll_examples.image_metrics import stacked_mode_stats
from unroll_examples.mnist_data import StackedMNIST, load_mnist

# ------------------------------------------------------------------------------------------ configuration
# The settings of this script: fields of ex.ImageConfig, each a flag of its name (eval_samples -> --eval-samples),
# in the order results.json and settings.json store them.
SETTINGS = ("K", "sizes", "seeds", "steps", "eval_samples", "d_lr", "g_lr", "batch", "beta1", "unroll_lr", "g_loss",
            "snapshot_every", "checkpoint_every", "split", "out")
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


def page_body(payload: Mapping[str, Any], doc: Path) -> List[str]:
    """The page's tables: per X and K the modes and KL (mean ± s.e.) beside Table 1, then the modes per seed."""
    settings = payload["settings"]
    rows = []
    for x in settings["sizes"]:
        for K in settings["K"]:
            paper = PAPER_TABLE.get((x, K), "— modes, KL —").split(" modes, KL ")
            rows.append([x, str(K), _mean_se(ex.cell_stats(payload, "modes", X=x, K=K)),
                         _mean_se(ex.cell_stats(payload, "kl", X=x, K=K)), *paper])
    per_seed = []
    for x in settings["sizes"]:
        cells = [ex.runs_of(payload, X=x, K=K) for K in settings["K"]]
        per_seed.append([x] + [", ".join(str(c[seed]["modes"]) if seed in c else "—" for c in cells)
                               for seed in settings["seeds"]])
    return [
        report.table(rows, ["X", "K", "modes covered (ours)", "KL (ours)", "paper modes", "paper KL"]), "",
        "The paper's numbers are Table 1 of Metz et al. (2017) (25,600 samples per model, standard errors over "
        "runs).", "",
        f"Per seed ({ex.seeds_text(settings['seeds'])}), modes covered for K = {ex.seeds_text(settings['K'])}:", "",
        report.table(per_seed, ["X"] + [f"seed {seed}" for seed in settings["seeds"]]), "",
    ]


PAGE = ex.PageSpec(name="stacked_mnist", title="Stacked MNIST: discrete mode collapse (Sec. 3.3.1, Table 1)",
                   keys={"X": str}, metrics=("modes", "kl"),
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
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, ex.ImageConfig, Path]:
    """Parse and validate every flag: any problem is an argparse error before any work starts."""
    p = build_parser()
    args, config, _, out = ex.parse_config(p, argv, CONFIGS, SETTINGS, at_least={"eval_samples": 1})
    for flag in ("classifier_train", "classifier_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    ex.resolve_page_flags(p, args, PAGE.name)
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
    ex.announce("Stacked MNIST (Sec. 3.3.1, Table 1)", settings, notes, print)

    with parallel.rank_zero_first(ranks):
        classifier, report = mc.load_or_train(classifier_cfg, args.data_dir, args.classifier_cache,
                                              progress=not args.no_progress and (ranks is None or ranks.writes))
    print(f"digit classifier: {100 * report['heldout_accuracy']:.2f}% on {report['n_heldout']} held-out digits "
          f"of the {report['data']} ({'cached' if report['cached'] else 'trained now'}: {report['cache_path']})")
    if report["heldout_accuracy"] < mc.TARGET_ACCURACY:
        print(f"warning: the classifier is below the {100 * mc.TARGET_ACCURACY:.1f}% target; mode labels are "
              f"unreliable")

    def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
        return data.sample(n, gen)[0]

    specs = []
    for size in config.sizes:
        gan = it.ImageGAN(f"stacked_mnist(X={size})", models.stacked_generator,
                          lambda size=size: models.stacked_discriminator(models.parse_size(size)), sample_data)
        specs += ex.run_specs(gan, settings, X=size)

    def evaluate(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
        labels, _ = mc.label_stacked(classifier, trainer.samples(config.eval_samples))
        stats = stacked_mode_stats(labels)
        return {"modes": stats.modes, "kl": stats.kl, "n_samples": stats.n_samples}

    records, trainers = ex.run(args, specs, out, evaluate, ex.eval_settings(
        settings, ("eval_samples",), classifier=dataclasses.asdict(classifier_cfg)), ranks)
    status = 3 if any(r["status"] != "done" for r in records) else 0
    if ranks is not None and not ranks.writes:
        return status  # rank 0 writes the table, results.json and the figures
    rows = ex.aggregate(records, ("X", "K"), ("modes", "kl"))
    table = ex.markdown_table(rows, [("modes", "modes covered"), ("kl", "KL(model || uniform)")],
                              {(x, k): v for (x, k), v in PAPER_TABLE.items()}, ("X", "K"))
    ex.finish(out, "stacked_mnist", argv, settings, notes, records, rows, table, trainers, specs, start,
              extra={"data": data.source, "classifier": report, "paper_table": {f"X={x}, K={k}": v for (x, k), v
                                                                                  in PAPER_TABLE.items()}},
              per_seed=args.per_seed)
    ex.publish(PAGE, args, out)
    return status


if __name__ == "__main__":
    sys.exit(main())
