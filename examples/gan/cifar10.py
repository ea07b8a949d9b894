"""Unrolled GANs on CIFAR-10 and their sample diversity (Metz et al., 2017, Sec. 3.4, Table 3, Fig. 5-6, App. D).

App. D's DCGAN-like models are trained for K = 0, 1, 5, 10; then, per model, inference via optimisation
reconstructs training images (L-BFGS over z, 3 random restarts; Table 3's mean MSE and percent best rank) and
pairwise l2 distances between samples are compared with the data's (Fig. 6).

Needs the CIFAR-10 python batches (``cifar-10-batches-py``): in ``--data-dir``, ``$UNROLL_CIFAR10_DIR`` or
``../shared/data/cifar10``; they are downloaded when absent and the network allows.

    python examples/gan/cifar10.py            # reduced default: about 23 minutes on 2 CPU cores (estimated for one
                                              # machine; 3-4x that on a slower one: docs/reproducibility.md)
    python examples/gan/cifar10.py --paper    # the paper's configuration (App. D models, 5 seeds, 100k updates)
    python examples/gan/cifar10.py --resume   # continue an interrupted run in the same --out
    python examples/gan/cifar10.py --report-only  # remake docs/results/cifar10.md from its per-seed file

Writes ``results.json``, ``samples.png`` (Fig. 4), ``samples_over_training.png``, ``pairwise_distances.png``,
``reconstructions.png``, ``losses.png`` and one folder per run with ``checkpoint.pt`` and ``result.json``; with
``--per-seed FILE`` every run's final numbers, and with ``--doc PAGE`` the results page made from them
(``--report-only`` remakes it from the per-seed file alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from unroll_examples import diversity as dv
from unroll_examples import image_experiment as ex
from unroll_examples import image_models as models
from unroll_examples import image_training as it
from unroll_examples import runs
from unroll_examples.cifar_data import load_cifar10

# ------------------------------------------------------------------------------------------ configuration
# The settings of this script: fields of ex.ImageConfig, each a flag of its name (lbfgs_iters -> --lbfgs-iters), in
# the order results.json and settings.json store them.
SETTINGS = ("K", "size", "seeds", "steps", "d_lr", "g_lr", "targets", "restarts", "batch", "beta1", "unroll_lr",
            "g_loss", "lbfgs_iters", "pairs", "snapshot_every", "checkpoint_every", "no_checksum", "out")
# The paper's configuration: the settings it states (App. D: G lr 1e-4, D lr 2e-4, 100k network updates = 50k
# iterations; Sec. 3.4: K in {0, 1, 5, 10}, 5 seeds, 1280 training images reconstructed with 3 L-BFGS restarts) ...
PAPER_STATES = ("K", "size", "seeds", "steps", "d_lr", "g_lr", "targets", "restarts")
PAPER = ex.ImageConfig(K=(0, 1, 5, 10), size="1", seeds=(0, 1, 2, 3, 4), steps=50_000, d_lr=2e-4, g_lr=1e-4,
                       targets=1280, restarts=3,
                       # ... and ours, where it states none
                       batch=64, beta1=0.5, unroll_lr=None, g_loss="nonsaturating", lbfgs_iters=200, pairs=5_000,
                       snapshot_every=2_500, checkpoint_every=500, no_checksum=False, out="runs/cifar10")
CONFIGS = {
    # The default: App. F's X = 1/4 version of the model (X = 1 is ~5x slower per iteration), 3 seeds, at the
    # learning rate the same models need on colored MNIST to learn within a CPU budget (not yet run on CIFAR-10
    # here: no data). Colored MNIST's X = 1/4 runs measured 0.69 s per iteration of all four K at 1 thread; with
    # ~8 s per diversity evaluation that is about 23 minutes with 2 workers.
    "reduced": dataclasses.replace(PAPER, size="1/4", seeds=(0, 1, 2), steps=1_200, d_lr=ex.REDUCED_LR,
                                   g_lr=ex.REDUCED_LR, targets=64, lbfgs_iters=50, snapshot_every=150,
                                   checkpoint_every=50),
    "paper": PAPER,  # --paper
}
# Deviations and open details besides the settings above that differ from PAPER_STATES ({name}: the setting).
NOTES = [
    "batch size: not stated in the paper; {batch} here",
    "Adam beta1 = {beta1} (stated in App. A/C, not in App. D)",
    ex.LR_NOTE,
    "generator loss: -log D(G(z)) (App. D's L_G, whose sign the text drops)",
    "unrolled steps reuse the iteration's minibatch and continue from D's current Adam state",
    "models: 3x3 kernels, padding 1, batch norm after every layer but the outputs, tanh output, Xavier init "
    "(see image_models.py); the App. D table has no encoder in use here",
    "inference via optimisation: {targets} training images, {restarts} L-BFGS restarts of up to {lbfgs_iters} "
    "iterations, all targets of a restart in one batched L-BFGS run; generator in evaluation mode",
    "MSE is on [-1, 1] pixels (the paper does not state its scale; divide by 4 for [0, 1])",
]
PAPER_TABLE3 = {"0": "0.0231 ± 0.0024, 0.63%", "1": "0.0195 ± 0.0021, 22.97%", "5": "0.0200 ± 0.0023, 15.31%",
                "10": "0.0181 ± 0.0018, 61.09%"}


# ------------------------------------------------------------------------------------------ the results page

def page_body(payload: Mapping[str, Any], doc: Path) -> List[str]:
    """The page's tables (:func:`image_experiment.diversity_body`) beside Table 3."""
    return ex.diversity_body(payload, doc, mse_spec=".4f", distance_spec=".2f", paper=PAPER_TABLE3) + [
        "The paper's numbers are Table 3 of Metz et al. (2017) (MSE ± standard error, percent best rank).", ""]


PAGE = ex.PageSpec(name="cifar10", title="CIFAR-10: sample diversity (Sec. 3.4, Table 3)",
                   keys={}, metrics=("recon_mse", "mean_distance"),
                   figures=(("samples.png", "final samples of each K's first seed"),
                            ("pairwise_distances.png", "pairwise distances")),
                   body=page_body, check_summary=ex.check_diversity_summary, about=ex.paragraph(__doc__, 1))



def build_parser() -> argparse.ArgumentParser:
    return ex.config_parser(__doc__, CONFIGS, SETTINGS,
                            helps={"size": "model size multiplier X of App. F",
                                   "targets": "training images reconstructed by inference via optimisation"})


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, ex.ImageConfig, Path]:
    """Parse and validate every flag: any problem is an argparse error before any work starts."""
    p = build_parser()
    args, config, _, out = ex.parse_config(p, argv, CONFIGS, SETTINGS, ex.DIVERSITY_AT_LEAST)
    ex.resolve_page_flags(p, args, PAGE.name)
    return args, config, out


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args, config, out = parse_args(argv)
    if args.report_only:
        return ex.report_only(PAGE, args)
    settings = ex.settings_of(config, SETTINGS)
    with ex.session(args, settings, out) as start:
        checksums = {"checksums": None} if config.no_checksum else {}
        cifar = ex.load_data(load_cifar10, "train", args.data_dir, **checksums)
        images = cifar.images.float() / 127.5 - 1.0  # [N, 3, 32, 32] in [-1, 1]
        notes = ex.paper_deviations(config, PAPER, PAPER_STATES, NOTES)
        ex.announce("CIFAR-10 (Sec. 3.4, Table 3)", settings, notes, print)

        x = models.parse_size(config.size)
        gan = it.ImageGAN(f"cifar10(X={config.size})", lambda: models.cifar_generator(x),
                          lambda: models.cifar_discriminator(x), ex.uniform_sampler(images))
        specs = ex.run_specs(gan, settings)
        probe = dv.DiversityProbe(images, n_targets=min(config.targets, images.shape[0]),
                                  restarts=config.restarts, max_iter=config.lbfgs_iters,
                                  n_pairs=config.pairs, n_samples=min(2000, images.shape[0]))
        records, trainers = ex.run(args, specs, out, dv.script_evaluator(probe),
                                   ex.eval_settings(settings, ex.DIVERSITY_SETTINGS))
        diversity, table = dv.script_outputs(probe, records, specs, trainers, out, paper=PAPER_TABLE3)
        rows = ex.aggregate(records, ("K",), ("recon_mse", "mean_distance"))
        table += (f"\n\nmean pair distance (data {probe.data_profile['mean_distance']:.3f}):\n\n"
                  + ex.markdown_table(rows, [("mean_distance", "mean pair distance")], key_names=("K",)))
        ex.finish(out, "cifar10", argv, settings, notes, records, rows, table, trainers, specs, start,
                  extra={"data": cifar.description, "diversity_table": diversity, "paper_table3": PAPER_TABLE3,
                         "data_distance_profile": probe.data_profile}, per_seed=args.per_seed,
                  summary=ex.diversity_summary(diversity, probe.data_profile))
        ex.publish(PAGE, args, out)
    return 3 if any(r["status"] != "done" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
