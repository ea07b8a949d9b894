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

Writes ``results.json``, ``samples.png`` (Fig. 4), ``samples_over_training.png``, ``pairwise_distances.png``,
``reconstructions.png``, ``losses.png`` and one folder per run with ``checkpoint.pt`` and ``result.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from lib import diversity as dv
from lib import image_experiment as ex
from lib import image_models as models
from lib import image_training as it
from lib import runs
from lib.cifar_data import load_cifar10

# ------------------------------------------------------------------------------------------ configuration
# App. D: G lr 1e-4, D lr 2e-4, 100k network updates (50k iterations); Sec. 3.4: K in {0, 1, 5, 10}, 5 seeds,
# 1280 training images reconstructed with 3 L-BFGS restarts.
PAPER: Dict[str, Any] = dict(K=[0, 1, 5, 10], size="1", seeds=[0, 1, 2, 3, 4], steps=50_000, d_lr=2e-4,
                             g_lr=1e-4, targets=1280, restarts=3)
PAPER_EXTRAS: Dict[str, Any] = dict(lbfgs_iters=200, snapshot_every=2_500, checkpoint_every=500)
# The reduced default: App. F's X = 1/4 version of the model (X = 1 is ~5x slower per iteration), 3 seeds, at
# the learning rate the same models need on colored MNIST to learn within a CPU budget (not yet run on CIFAR-10
# here: no data). Colored MNIST's X = 1/4 runs measured 0.69 s per iteration of all four K at 1 thread; with
# ~8 s per diversity evaluation that is about 23 minutes with 2 workers.
REDUCED: Dict[str, Any] = dict(PAPER, size="1/4", seeds=[0, 1, 2], steps=1_200, batch=64, beta1=0.5,
                               d_lr=ex.REDUCED_LR, g_lr=ex.REDUCED_LR, unroll_lr=None, g_loss="nonsaturating",
                               targets=64, lbfgs_iters=50, pairs=5_000, snapshot_every=150, checkpoint_every=50,
                               no_checksum=False, out="runs/cifar10")
NOTES = [
    "batch size: not stated in the paper; {batch} here",
    "Adam beta1 = 0.5 (stated in App. A/C, not in App. D)",
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


ALL_PAPER = {**PAPER, **PAPER_EXTRAS}


def build_parser() -> argparse.ArgumentParser:
    p = ex.parser(__doc__, REDUCED, ALL_PAPER)
    p.add_argument("--size", type=ex.size_arg, default=None,
                   help=f"model size multiplier X of App. F {ex.default_text('size', REDUCED, ALL_PAPER)}")
    ex.add_diversity_flags(p, REDUCED, ALL_PAPER, "training images")
    p.add_argument("--no-checksum", action="store_true", default=None,
                   help="skip the official md5 check of the batch files (for your own conversions)")
    return p


parse_args = ex.parse_args_for(build_parser, REDUCED, ALL_PAPER, ex.DIVERSITY_AT_LEAST)


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args, settings, out = parse_args(argv)
    with ex.session(args, settings, out) as start:
        checksums = {"checksums": None} if settings["no_checksum"] else {}
        cifar = ex.load_data(load_cifar10, "train", args.data_dir, **checksums)
        images = cifar.images.float() / 127.5 - 1.0  # [N, 3, 32, 32] in [-1, 1]
        notes = ex.deviations(settings, PAPER, NOTES)
        ex.announce("CIFAR-10 (Sec. 3.4, Table 3)", settings, notes, print)

        x = models.parse_size(settings["size"])
        gan = it.ImageGAN(f"cifar10(X={settings['size']})", lambda: models.cifar_generator(x),
                          lambda: models.cifar_discriminator(x), ex.uniform_sampler(images))
        specs = ex.run_specs(gan, settings)
        probe = dv.DiversityProbe(images, n_targets=min(settings["targets"], images.shape[0]),
                                  restarts=settings["restarts"], max_iter=settings["lbfgs_iters"],
                                  n_pairs=settings["pairs"], n_samples=min(2000, images.shape[0]))
        records, trainers = ex.run(args, specs, out, dv.script_evaluator(probe),
                                   ex.eval_settings(settings, ex.DIVERSITY_SETTINGS))
        diversity, table = dv.script_outputs(probe, records, specs, trainers, out, paper=PAPER_TABLE3)
        rows = ex.aggregate(records, ("K",), ("recon_mse", "mean_distance"))
        table += (f"\n\nmean pair distance (data {probe.data_profile['mean_distance']:.3f}):\n\n"
                  + ex.markdown_table(rows, [("mean_distance", "mean pair distance")], key_names=("K",)))
        ex.finish(out, "cifar10", argv, settings, notes, records, rows, table, trainers, specs, start,
                  extra={"data": cifar.description, "diversity_table": diversity, "paper_table3": PAPER_TABLE3,
                         "data_distance_profile": probe.data_profile}, per_seed=args.per_seed)
    return 3 if any(r["status"] != "done" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
