"""The bilinear game min_x max_y x·y: which update rules reach its equilibrium (0, 0), and at what cost.

Simultaneous gradient descent-ascent spirals out of the equilibrium, alternating GDA circles it forever; a look-ahead
through y's update (Metz et al. 2017) adds a damping term: with plain SGD, y^K = y + Kηx, so x descends
∂/∂x [x·(y + Kηx)] = y + 2Kηx. The other rules of ``common.py`` (extragradient, optimistic GD, consensus, SGA, and
the Discussion's extrapolation, symmetric and recursive unrolling) run on the same loop.

    python examples/games/bilinear.py --threads 1     # writes docs/results/games/bilinear.md and bilinear.png
"""

from __future__ import annotations

from pathlib import Path

import torch

import common

# ---- configuration ----
LEARNING_RATES = (0.05, 0.1, 0.2, 0.5, 1.0)  # shared by both players and by every look-ahead
ITERATIONS = 2000                            # per run, at most
TOL = 1e-3                                   # "reached the equilibrium": distance <= TOL
FIGURE_LR = 0.2
START = (1.0, 1.0)                           # (x0, y0); the equilibrium is (0, 0)
DOC = Path("docs/results/games/bilinear.md")
NOTES = "(verdict and notes: written by hand after a run; kept when the page is rewritten)"


def payoff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f(x, y) = x·y: x minimises, y maximises."""
    return (x * y).sum()


def main() -> None:
    args = common.parse_args(__doc__, DOC, ITERATIONS)
    z0 = {"x": torch.tensor([START[0]]), "y": torch.tensor([START[1]])}
    settings = (f"Game: f(x, y) = x·y, x minimises, y maximises, from (x, y) = {START}; equilibrium (0, 0). "
                + common.loop_settings(args.iterations))
    common.compare("Bilinear game min_x max_y x·y", payoff, z0, LEARNING_RATES, args.iterations, FIGURE_LR,
                   args.doc, "python examples/games/bilinear.py --threads 1", settings, NOTES, tol=TOL)


if __name__ == "__main__":
    main()
