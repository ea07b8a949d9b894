"""Colored MNIST: manifold collapse (Metz et al., 2017, Sec. 3.3.2, Table 2, App. F).

Each digit is coloured ``I*C + (I - 1)`` with ``C ~ N(0, 0.5^2)`` per channel, plus ``N(0, 0.2^2)`` pixel noise,
clipped to [-1, 1]. GANs of size X (App. F; X = 1 is the CIFAR-10 model) are trained for every K, X and seed;
the foreground colour of each image is found by 2-cluster k-means, Gaussian KDEs are fitted to the colours of
data and samples, and Table 2 reports their Jensen-Shannon divergence (nats).

    python examples/gan/colored_mnist.py            # reduced default: about 25 minutes on 2 CPU cores (measured on one
                                                    # machine; 3-4x that on a slower one: docs/reproducibility.md)
    python examples/gan/colored_mnist.py --paper    # the paper's configuration
    python examples/gan/colored_mnist.py --resume   # continue an interrupted run in the same --out
    python examples/gan/colored_mnist.py --report-only  # remake docs/results/colored_mnist.md from its per-seed file

Writes ``results.json``, ``samples.png``, ``samples_over_training.png``, ``losses.png``, ``colors.png`` and one
folder per run with ``checkpoint.pt`` and ``result.json``; with ``--per-seed FILE`` every run's final numbers, and
with ``--doc PAGE`` the results page made from them (``--report-only`` remakes it from the per-seed file alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from unroll_examples import image_experiment as ex
from unroll_examples import image_models as models
from unroll_examples import image_training as it
from unroll_examples import report, runs
from unroll_examples.image_metrics import foreground_colors, js_divergence_kde
from unroll_examples.mnist_data import ColoredMNIST, load_mnist
from unroll_examples.plotting import pyplot, save_figure

# ------------------------------------------------------------------------------------------ configuration
# The settings of this script: fields of ex.ImageConfig, each a flag of its name (js_samples -> --js-samples), in
# the order results.json and settings.json store them.
SETTINGS = ("K", "sizes", "seeds", "steps", "d_lr", "g_lr", "eval_samples", "batch", "beta1", "unroll_lr", "g_loss",
            "js_samples", "snapshot_every", "checkpoint_every", "split", "out")
# The paper's configuration (App. F gives the models; training follows App. D): the settings it states ...
PAPER_STATES = ("K", "sizes", "seeds", "steps", "d_lr", "g_lr")
PAPER = ex.ImageConfig(K=(0, 1, 5, 10), sizes=("1/4", "1/2", "1"), seeds=(0, 1, 2, 3, 4), steps=50_000, d_lr=2e-4,
                       g_lr=1e-4,
                       # ... and ours, where it states none
                       eval_samples=10_000, batch=64, beta1=0.5, unroll_lr=None, g_loss="nonsaturating",
                       js_samples=5_000, snapshot_every=2_500, checkpoint_every=500, split="auto",
                       out="runs/colored_mnist")
CONFIGS = {
    # The default: the smallest model only (X = 1 costs ~5x more per iteration), 3 seeds, short training at a
    # higher learning rate (measured 0.69 s per iteration of all four K at 1 thread: 21 minutes with 2 workers).
    "reduced": dataclasses.replace(PAPER, sizes=("1/4",), seeds=(0, 1, 2), steps=1_200, eval_samples=2_000,
                                   d_lr=ex.REDUCED_LR, g_lr=ex.REDUCED_LR, snapshot_every=150, checkpoint_every=50),
    "paper": PAPER,  # --paper
}
# Deviations and open details besides the settings above that differ from PAPER_STATES ({name}: the setting).
NOTES = [
    "training length: App. F gives none; the paper's value above assumes App. D's 100k network updates "
    "(50k iterations of one D and one G update)",
    "batch size: not stated in the paper; {batch} here",
    "Adam beta1 = {beta1} (stated in App. A/C, not in App. D/F)",
    ex.LR_NOTE,
    "generator loss: -log D(G(z)) (App. D's L_G, whose sign the text drops)",
    "unrolled steps reuse the iteration's minibatch and continue from D's current Adam state",
    "models: 3x3 kernels, padding 1, batch norm after every layer but the outputs, tanh output, Xavier init "
    "(see image_models.py)",
    "colours of {eval_samples} samples and {eval_samples} data images per run (the paper does not say how many)",
    "KDE: scipy Gaussian KDE, Scott's bandwidth (not stated); JS divergence in nats by Monte Carlo with "
    "{js_samples} draws from each KDE",
    "foreground colour: the smaller of the two k-means clusters; anti-aliased stroke edges pull it towards "
    "the background for data and samples alike (docs/results/mnist_data.md)",
    "samples are drawn with the generator's batch norm in evaluation mode (running statistics)",
]
# Table 2 of the paper: JS divergence, mean ± standard error.
PAPER_TABLE = {
    ("1/4", 0): "0.073 ± 0.0058", ("1/4", 1): "0.142 ± 0.028", ("1/4", 5): "0.049 ± 0.0021",
    ("1/4", 10): "0.075 ± 0.012",
    ("1/2", 0): "0.095 ± 0.011", ("1/2", 1): "0.119 ± 0.010", ("1/2", 5): "0.055 ± 0.0049",
    ("1/2", 10): "0.074 ± 0.016",
    ("1", 0): "0.034 ± 0.0034", ("1", 1): "0.050 ± 0.0026", ("1", 5): "0.027 ± 0.0028",
    ("1", 10): "0.025 ± 0.00076",
}
_DATA_EVAL_SEED = 123_457  # the data images whose colours every run is compared with


# ------------------------------------------------------------------------------------------ the results page

def page_body(payload: Mapping[str, Any], doc: Path) -> List[str]:
    """The page's table: per X and K the JS divergence (mean ± s.e. and per seed) beside Table 2, whose other
    sizes are listed as not run."""
    settings = payload["settings"]
    rows = []
    for x in settings["sizes"]:
        for K in settings["K"]:
            mean, se = ex.cell_stats(payload, "js", X=x, K=K)
            by_seed = ex.runs_of(payload, X=x, K=K)
            rows.append([x, str(K), "—" if mean != mean else report.plus_minus_sig(mean, se),
                         ", ".join(f"{by_seed[s]['js']:.3f}" if s in by_seed else "—" for s in settings["seeds"]),
                         PAPER_TABLE.get((x, K), "—")])
    not_run = ("not in the reduced default" if tuple(settings["sizes"]) == CONFIGS["reduced"].sizes
               else "not run")
    rows += [[x, str(K), not_run, "—", paper] for (x, K), paper in PAPER_TABLE.items() if x not in settings["sizes"]]
    header = ["X", "K", "JS (ours)", f"JS per seed {ex.seeds_text(settings['seeds'])} (ours)", "JS (paper)"]
    return [report.table(rows, header), "", "The paper's numbers are Table 2 of Metz et al. (2017).", ""]


PAGE = ex.PageSpec(name="colored_mnist", title="Colored MNIST: manifold collapse (Sec. 3.3.2, Table 2)",
                   keys={"X": str}, metrics=("js",),
                   figures=(("colors.png", "foreground colours of the data and of each K's first seed"),
                            ("samples.png", "final samples of each K's first seed")),
                   body=page_body, about=ex.paragraph(__doc__, 1))



def build_parser() -> argparse.ArgumentParser:
    return ex.config_parser(__doc__, CONFIGS, SETTINGS,
                            helps={"sizes": "model size multipliers X",
                                   "eval_samples": "samples (and data images) whose colours are compared"})


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, ex.ImageConfig, Path]:
    """Parse and validate every flag: any problem is an argparse error before any work starts."""
    # A 3-D KDE needs more points than dimensions to have a non-singular covariance.
    p = build_parser()
    args, config, _, out = ex.parse_config(p, argv, CONFIGS, SETTINGS, at_least={"eval_samples": 10, "js_samples": 10})
    ex.resolve_page_flags(p, args, PAGE.name)
    return args, config, out


def plot_colors(data_colors: torch.Tensor, panels: Sequence, path: Path) -> None:
    """Red-green projection of the foreground colours: data, then each model's."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.4 * (len(panels) + 1), 2.6), squeeze=False)
    for ax, (label, colors) in zip(axes[0], [("data", data_colors), *panels]):
        c = colors[:2000].clamp(-1, 1)
        ax.scatter(c[:, 0], c[:, 1], s=1, c=((c + 1) / 2).numpy())
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_xlabel("red", fontsize=7)
    axes[0][0].set_ylabel("green", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args, config, out = parse_args(argv)
    if args.report_only:
        return ex.report_only(PAGE, args)
    with ex.session(args, ex.settings_of(config, SETTINGS), out) as start:
        return run(args, config, out, start, argv)


def run(args: argparse.Namespace, config: ex.ImageConfig, out: Path, start: float,
        argv: Optional[Sequence[str]]) -> int:
    """Every run, then the table and figures."""
    settings = ex.settings_of(config, SETTINGS)
    mnist = ex.load_data(load_mnist, config.split, args.data_dir)
    data = ColoredMNIST(mnist)
    notes = ex.split_note(mnist) + ex.paper_deviations(config, PAPER, PAPER_STATES, NOTES)
    ex.announce("Colored MNIST (Sec. 3.3.2, Table 2)", settings, notes, print)
    data_images, _ = data.sample(config.eval_samples, torch.Generator().manual_seed(_DATA_EVAL_SEED))
    data_colors = foreground_colors(data_images)

    def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
        return data.sample(n, gen)[0]

    specs = []
    for size in config.sizes:
        x = models.parse_size(size)
        gan = it.ImageGAN(f"colored_mnist(X={size})", lambda x=x: models.cifar_generator(x),
                          lambda x=x: models.cifar_discriminator(x), sample_data)
        specs += ex.run_specs(gan, settings, X=size)

    model_colors: Dict[str, torch.Tensor] = {}

    def evaluate(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
        colors = foreground_colors(trainer.samples(config.eval_samples))
        model_colors[spec.folder] = colors
        js = js_divergence_kde(data_colors, colors, n_samples=config.js_samples, seed=0)
        return {"js": js, "color_mean": [float(v) for v in colors.mean(0)],
                "color_std": [float(v) for v in colors.std(0)]}

    records, trainers = ex.run(args, specs, out, evaluate, ex.eval_settings(settings, ("eval_samples", "js_samples")))
    rows = ex.aggregate(records, ("X", "K"), ("js",))
    table = ex.markdown_table(rows, [("js", "JS divergence (nats)")], PAPER_TABLE, ("X", "K"))
    first = ex.first_finished(specs, trainers)
    for _label, (spec, trainer) in first.items():
        if spec.folder not in model_colors:  # evaluated in an earlier session (--resume)
            model_colors[spec.folder] = foreground_colors(trainer.samples(config.eval_samples))
    if first:
        plot_colors(data_colors, [(f"{label}, seed {spec.cfg.seed}", model_colors[spec.folder])
                                  for label, (spec, _) in first.items()], out / "colors.png")
    ex.finish(out, "colored_mnist", argv, settings, notes, records, rows, table, trainers, specs, start,
              extra={"data": data.source, "data_color_std": [float(v) for v in data_colors.std(0)],
                     "paper_table": {f"X={x}, K={k}": v for (x, k), v in PAPER_TABLE.items()}},
              per_seed=args.per_seed)
    ex.publish(PAGE, args, out)
    return 3 if any(r["status"] != "done" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
