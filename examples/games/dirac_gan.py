"""The Dirac-GAN of Mescheder, Geiger & Nowozin (ICML 2018): which update rules reach its equilibrium (0, 0).

The data is a point mass at 0, the generator a point mass at θ, the discriminator D(x) = ψ·x, and the GAN loss
L(θ, ψ) = f(ψθ) + f(0) with f(t) = −log(1 + e^{−t}) (the standard GAN); G minimises over θ, D maximises over ψ.
Near (0, 0) it is the bilinear game ψθ/2 (f'(0) = 1/2), so unregularised GDA does not converge (Mescheder et al.,
Sec. 2.2); far from it the gradients saturate. Same rules and loop as ``bilinear.py`` (``common.py``).

    python examples/games/dirac_gan.py --threads 1    # writes docs/results/games/dirac_gan.md and dirac_gan.png
"""

from __future__ import annotations

from pathlib import Path

import torch

import common

# ---- configuration ----
LEARNING_RATES = (0.1, 0.2, 0.5, 1.0, 2.0)  # shared by both players and by every look-ahead
ITERATIONS = 2000                           # per run, at most
TOL = 1e-3                                  # "reached the equilibrium": distance <= TOL
FIGURE_LR = 0.5
START = (1.0, 1.0)                          # (θ0, ψ0); the equilibrium is (0, 0)
DOC = Path("docs/results/games/dirac_gan.md")
NOTES = "(verdict and notes: written by hand after a run; kept when the page is rewritten)"


def payoff(theta: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """L(θ, ψ) = f(ψθ) with f(t) = −log(1 + e^{−t}) = log sigmoid(t) (the constant f(0) is dropped)."""
    return torch.nn.functional.logsigmoid(psi * theta).sum()


def main() -> None:
    args = common.parse_args(__doc__, DOC, ITERATIONS)
    z0 = {"x": torch.tensor([START[0]]), "y": torch.tensor([START[1]])}
    settings = (f"Game: the Dirac-GAN, L(θ, ψ) = log σ(ψθ), the generator θ (x in the code) minimises, the "
                f"discriminator ψ (y) maximises, from (θ, ψ) = {START}; equilibrium (0, 0). "
                + common.loop_settings(args.iterations))
    common.compare("Dirac-GAN (Mescheder et al. 2018)", payoff, z0, LEARNING_RATES, args.iterations, FIGURE_LR,
                   args.doc, "python examples/games/dirac_gan.py --threads 1", settings, NOTES, tol=TOL)


if __name__ == "__main__":
    main()
