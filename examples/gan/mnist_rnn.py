"""An LSTM generator against a convolutional discriminator on MNIST (Metz et al., 2017, Sec. 3.2, Fig. 3, App. C).

The generator emits one 28-pixel column per LSTM step; its mismatch with the convolutional discriminator makes
standard GAN training collapse (Fig. 3, K = 0) where unrolling 20 steps keeps it spread out. The LSTM is an
explicit cell (``image_models.LSTMCell``), so the double backward that unrolling needs works on CPU and GPU.
After training, the diversity analyses of Sec. 3.4 run on each model: inference via optimisation on held
digits (mean reconstruction MSE and percent best rank, as Table 3) and pairwise l2 distances (Fig. 6).

    python examples/gan/mnist_rnn.py            # reduced default: about 21 minutes on 2 CPU cores (measured on one
                                                # machine; 3-4x that on a slower one: docs/reproducibility.md)
    python examples/gan/mnist_rnn.py --paper    # the paper's configuration (150k network updates)
    python examples/gan/mnist_rnn.py --resume   # continue an interrupted run in the same --out
    python examples/gan/mnist_rnn.py --report-only  # remake docs/results/mnist_rnn.md from its per-seed file

Writes ``results.json``, ``samples_over_training.png`` (Fig. 3), ``samples.png``, ``pairwise_distances.png``,
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
from unroll_examples.mnist_data import load_mnist, to_symmetric

# ------------------------------------------------------------------------------------------ configuration
# The settings of this script: fields of ex.ImageConfig, each a flag of its name (lbfgs_iters -> --lbfgs-iters), in
# the order results.json and settings.json store them.
SETTINGS = ("K", "steps", "d_lr", "g_lr", "beta1", "targets", "restarts", "seeds", "batch", "unroll_lr", "g_loss",
            "lbfgs_iters", "pairs", "snapshot_every", "checkpoint_every", "split", "out")
# The paper's configuration: the settings it states (App. C: 150k network updates = 75k iterations, Adam lr 1e-4
# and beta1 0.5 for both; Fig. 3 shows K = 0, 20. Sec. 3.4.1, on CIFAR-10: 1280 targets, 3 L-BFGS restarts) ...
PAPER_STATES = ("K", "steps", "d_lr", "g_lr", "beta1", "targets", "restarts")
PAPER = ex.ImageConfig(K=(0, 20), steps=75_000, d_lr=1e-4, g_lr=1e-4, beta1=0.5, targets=1280, restarts=3,
                       # ... and ours, where it states none
                       seeds=(0, 1, 2), batch=64, unroll_lr=None, g_loss="nonsaturating", lbfgs_iters=200,
                       pairs=5_000, snapshot_every=5_000, checkpoint_every=500, split="auto", out="runs/mnist_rnn")
CONFIGS = {
    # The default (measured 0.048 s per iteration at K = 0 and 0.52 s at K = 20, 1 thread per worker; ~5 s per
    # diversity evaluation): 21 minutes with 2 workers, the three K = 20 runs setting the pace.
    "reduced": dataclasses.replace(PAPER, steps=1_200, targets=64, lbfgs_iters=50, snapshot_every=150,
                                   checkpoint_every=50),
    "paper": PAPER,  # --paper
}
# Deviations and open details besides the settings above that differ from PAPER_STATES ({name}: the setting).
NOTES = [
    "batch size: not stated in the paper; {batch} here",
    "generator loss: -log D(G(z)) (App. C's L_G, whose sign the text drops)",
    "unrolled steps reuse the iteration's minibatch and continue from D's current Adam state",
    "LSTM: no per-step input, h_0 = ReLU(FC(z)), c_0 = 0 (App. C does not say what the LSTM reads or how the "
    "256-D vector fills the state); Xavier init per gate block, forget bias 1",
    "discriminator: 3x3 kernels, padding 1 (App. C gives no kernel size); batch norm after each convolution",
    "seeds: Fig. 3 shows one run per K; the paper reports no seeds for this experiment",
    "diversity (Sec. 3.4, run by the paper on CIFAR-10 only): {targets} target digits, {restarts} L-BFGS restarts "
    "of up to {lbfgs_iters} iterations each, all targets of a restart in one batched L-BFGS run; "
    "{pairs} random pairs for the distance histograms",
    "MSE is on [-1, 1] pixels (the paper does not state its scale; divide by 4 for [0, 1])",
]


# ------------------------------------------------------------------------------------------ the results page

def page_body(payload: Mapping[str, Any], doc: Path) -> List[str]:
    """The page's tables (:func:`image_experiment.diversity_body`; the paper reports no numbers here)."""
    return ex.diversity_body(payload, doc, mse_spec=".3f", distance_spec=".2f")


PAGE = ex.PageSpec(name="mnist_rnn", title="RNN generator on MNIST (Sec. 3.2, Fig. 3) and sample diversity (Sec. 3.4)",
                   keys={}, metrics=("recon_mse", "mean_distance"),
                   figures=(("samples_over_training.png", "samples of fixed latents over training, K = 0 and 20"),
                            ("pairwise_distances.png", "pairwise distances")),
                   body=page_body, check_summary=ex.check_diversity_summary, about=ex.paragraph(__doc__, 1))



def build_parser() -> argparse.ArgumentParser:
    return ex.config_parser(__doc__, CONFIGS, SETTINGS,
                            helps={"targets": "digits reconstructed by inference via optimisation"})


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
        mnist = ex.load_data(load_mnist, config.split, args.data_dir)
        digits = to_symmetric(mnist.images).unsqueeze(1)  # [N, 1, 28, 28] in [-1, 1) (App. C)
        notes = ex.split_note(mnist, ", and the reconstruction targets come from the same digits") \
            + ex.paper_deviations(config, PAPER, PAPER_STATES, NOTES)
        ex.announce("RNN generator on MNIST (Sec. 3.2, Fig. 3; diversity as Sec. 3.4)", settings, notes, print)

        gan = it.ImageGAN("mnist_rnn", models.rnn_generator, models.rnn_discriminator, ex.uniform_sampler(digits))
        specs = ex.run_specs(gan, settings)
        probe = dv.DiversityProbe(digits, n_targets=config.targets, restarts=config.restarts,
                                  max_iter=config.lbfgs_iters, n_pairs=config.pairs)
        records, trainers = ex.run(args, specs, out, dv.script_evaluator(probe),
                                   ex.eval_settings(settings, ex.DIVERSITY_SETTINGS))
        diversity, diversity_md = dv.script_outputs(probe, records, specs, trainers, out)
        rows = ex.aggregate(records, ("K",), ("recon_mse", "mean_distance"))
        table = ex.markdown_table(rows, [("recon_mse", "reconstruction MSE"),
                                         ("mean_distance", "mean pair distance")], key_names=("K",))
        table += (f"\n\ndata: mean pair distance {probe.data_profile['mean_distance']:.3f}\n\n"
                  f"Table 3 layout (percent best rank: share of targets each K reconstructs best):\n\n"
                  f"{diversity_md}")
        ex.finish(out, "mnist_rnn", argv, settings, notes, records, rows, table, trainers, specs, start,
                  extra={"data": mnist.description, "diversity_table": diversity,
                         "data_distance_profile": probe.data_profile}, per_seed=args.per_seed,
                  summary=ex.diversity_summary(diversity, probe.data_profile))
        ex.publish(PAGE, args, out)
    return 3 if any(r["status"] != "done" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
