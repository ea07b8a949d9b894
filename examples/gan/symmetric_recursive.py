"""Symmetric and recursive unrolling on the 2-D mixture: the two extensions of Metz et al. (2017), Sec. 4.

The paper unrolls one player: G descends f(θ_G, θ_D^K(θ_G, θ_D)), θ_D^K being K look-ahead steps of D with G
fixed (Eq. 9-12). Its Discussion proposes two more, both one call of the public API here:

- **symmetric**: "unrolling the generator when updating the discriminator as well". G's step is the paper's; D's
  step descends L_D(θ_G^K(θ_G, θ_D), θ_D), θ_G^K being K look-ahead steps of G against this D
  (``unroll.surrogate_loss`` with the roles swapped), so D reacts to how G would move.
- **recursive**: "unrolling sequences of G and D updates". G descends f(θ_G, θ_D^K), where θ_D^K ends K *joint*
  steps in which G keeps learning too (``unroll.unrolled_game`` with both players moving): D's look-ahead answers
  a moving G, and G's gradient flows through both.

Every look-ahead step is Adam at ``--unroll-lr`` starting from the moving player's current Adam state, on the
iteration's minibatch. Rows, on paired seeds: K = 0, the one-sided K (the paper), symmetric K and recursive K for
every K of ``--ks`` (recursive from K = 2: its one joint step moves G and D simultaneously, so with K = 1 D's
look-ahead ignores G's move and recursive is the one-sided run, to rounding; tested). The question:
does either converge in fewer iterations, or at lower cost, than one-sided unrolling? Cost per iteration is timed
after training, the cells interleaved in one process.

    python examples/gan/symmetric_recursive.py --threads 1 --no-progress   # docs/results/symmetric_recursive.md
    python examples/gan/symmetric_recursive.py --resume                    # continue it after a kill
    python examples/gan/symmetric_recursive.py --report-only               # rewrite the page from the runs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import unroll
from unroll_examples import ablations as ab
from unroll_examples import report
from unroll_examples.models import generator_forward
from unroll_examples.sweeps import Cell
from unroll_examples.training import (
    SIZE_FLAGS,
    GeneratorRule,
    Params,
    PlainD,
    Pullback,
    StepInputs,
    Strategies,
    TrainConfig,
    d_inner_loss,
    plain_d,
)

# ---- configuration: TRAINING's fields dataset, steps, d_lr, g_lr, unroll_lr, eval_every and eval_samples are flags
# of their names (--d-lr ...) whose defaults are its values here (ablations.add_common_flags); the cells vary K and
# the kind of unrolling ----
TRAINING = dataclasses.replace(ab.COMMON, steps=2000)
KS = (1, 5)


def g_inner_loss(g: Dict[str, Tensor], d: Dict[str, Tensor], x: Tensor, z: Tensor, activation: str) -> Tensor:
    """G's saturating loss -L_D as a function of G's parameters (the game is zero-sum)."""
    return -d_inner_loss(d, x, generator_forward(g, z, activation))


@dataclass(frozen=True)
class SymmetricD(PlainD):
    """Symmetric unrolling (Sec. 4, Discussion: "unrolling the generator when updating the discriminator as well"):
    D's committed step descends L_D(θ_G^K(θ_G, θ_D), θ_D), θ_G^K after K look-ahead steps of G against this D
    (``g_looks_ahead``: ``unroll.surrogate_loss`` with the roles swapped; the saturating game is zero-sum, so the
    default outer loss -inner is D's loss). The gradient is the total derivative, G's response included."""

    g_looks_ahead: Callable[..., Tensor]

    def loss(self, d: Params, g: Params, g_state: Dict[str, Any], x: Tensor, z: Tensor) -> Tensor:
        """D's loss at G's K-step look-ahead."""
        return self.g_looks_ahead(g, g_state, d, x, z)

    def loss_gradient(self, d: Params, g: Params, g_state: Dict[str, Any], inputs: StepInputs,
                      fake: Tensor) -> Tuple[Params, Tensor]:
        return torch.func.grad_and_value(self.loss)(d, g, g_state, inputs.x, inputs.z)


def symmetric(cfg: TrainConfig) -> Strategies:
    """D's rule :class:`SymmetricD` (look-ahead Adam at ``cfg.effective_unroll_lr``); G keeps the paper's surrogate."""
    adam = unroll.adam(cfg.effective_unroll_lr, betas=(cfg.beta1, cfg.beta2))
    g_looks_ahead = unroll.surrogate_loss(
        lambda g, d, x, z: g_inner_loss(g, d, x, z, cfg.activation), cfg.K, optimizer=adam)
    plain = plain_d(cfg)
    return Strategies(discriminator=SymmetricD(plain.opt, plain.average, g_looks_ahead))


@dataclass(frozen=True)
class Recursive(GeneratorRule):
    """Recursive unrolling (Sec. 4, Discussion: "unrolling sequences of G and D updates"): G descends its loss at
    (θ_G, θ_D^K), θ_D^K after K joint look-ahead steps in which G keeps learning too (``joint``:
    ``unroll.unrolled_game``); G's gradient flows through both players' steps. A loss of G's parameters, not of
    its samples."""

    activation: str
    joint: Callable[..., Tuple[Params, Any]]

    def params_loss(self, g: Params, g_state: Dict[str, Any], d: Params, d_state: Dict[str, Any], x: Tensor,
                    z: Tensor) -> Tensor:
        """G's loss against D's end point of the joint look-ahead."""
        end, _ = self.joint({"g": g, "d": d}, {"g": g_state, "d": d_state}, x, z)
        return g_inner_loss(g, end["d"], x, z, self.activation)

    def samples(self, g: Params, z: Tensor) -> Tuple[Tensor, Optional[Pullback]]:
        return generator_forward(g, z, self.activation), None  # differentiated by parameters: no vjp to keep

    def gradient(self, g: Params, g_state: Dict[str, Any], d: Params, d_state: Dict[str, Any], extra: Params,
                 inputs: StepInputs, fake: Tensor, pullback: Optional[Pullback]) -> Tuple[Params, Tensor]:
        return torch.func.grad_and_value(self.params_loss)(g, g_state, d, d_state, inputs.x, inputs.z)


def recursive(cfg: TrainConfig) -> Strategies:
    """G's rule :class:`Recursive`, both players' look-ahead steps Adam at ``cfg.effective_unroll_lr``; D trains
    plainly."""
    adam = unroll.adam(cfg.effective_unroll_lr, betas=(cfg.beta1, cfg.beta2))
    act = cfg.activation
    losses = {"g": lambda p, x, z: g_inner_loss(p["g"], p["d"], x, z, act),
              "d": lambda p, x, z: d_inner_loss(p["d"], x, generator_forward(p["g"], z, act))}
    joint = unroll.unrolled_game(losses, cfg.K, optimizers={"g": adam, "d": adam})
    return Strategies(generator=Recursive(act, joint))


STRATEGIES = {"symmetric": symmetric, "recursive": recursive}


def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/symmetric_recursive", doc="docs/results/symmetric_recursive.md")
    p.add_argument("--ks", type=SIZE_FLAGS["K"], nargs="+", default=list(KS),
                   help="look-ahead steps of every kind of unrolling")
    ab.add_timing_flags(p)
    return p


def build_cells(args: argparse.Namespace) -> List[Cell]:
    """K = 0 first (the cost reference), then one-sided, symmetric and recursive for every K."""
    if any(k < 1 for k in args.ks):
        raise ValueError(f"--ks must be >= 1 (K = 0 is always the first row), got {args.ks}")
    base = ab.base_config(args, TRAINING)
    seeds = args.seed_list
    cells = [Cell("main", "K=0 (plain GAN)", dataclasses.replace(base, K=0), seeds)]
    for K in sorted(set(args.ks)):
        cfg = dataclasses.replace(base, K=K)
        cells.append(Cell("main", f"one-sided K={K} (the paper)", cfg, seeds))
        for kind, strategies in STRATEGIES.items():
            if kind == "recursive" and K == 1:
                continue
            cells.append(Cell("main", f"{kind} K={K}", cfg, seeds, tag=kind, strategies=strategies(cfg)))
    return cells


def write_report(args: argparse.Namespace, cells: List[Cell], log: Sequence[dict], command: str,
                 complete: bool) -> None:
    intro = ("Rows: **one-sided K**: the paper's unrolled G (K look-ahead steps of D, full Eq. 12 gradient), D "
             "trained plainly; **symmetric K**: the same G, and D's step descends L_D at G's K-step look-ahead "
             "(`unroll.surrogate_loss`, roles swapped); **recursive K**: G descends its loss at D's end point after "
             "K joint look-ahead steps of both players (`unroll.unrolled_game`), D trained plainly. **cost vs K=0**: "
             "each cell's iteration (all seeds vmapped, no evaluation) timed in one process after training, the "
             f"cells interleaved over {args.timing_rounds} rounds of {args.timing_iterations} iterations (median), "
             "divided by K = 0's.")
    metas, n_modes, lines = ab.start_page("Symmetric and recursive unrolling (Metz et al. 2017, Sec. 4)", intro,
                                          args, cells, command, complete)
    costs = ab.timings(args, cells, complete) or {}
    lines += ["## Results", "", ab.timed_results_table(metas, args, n_modes, log, costs), ""]
    main_figure = ab.draw_figure(metas, Path(args.out), args, "symmetric_recursive",
                                 f"{args.dataset}: one-sided, symmetric and recursive unrolling (seed "
                                 f"{args.seed_list[0]})")
    lines += ab.per_seed_json(args, metas, n_modes, command, costs)
    ab.write_page(Path(args.doc), lines, log, report.opening(Path(args.doc), main_figure))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return ab.main_for("symmetric_recursive.py", build_parser(), build_cells, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
