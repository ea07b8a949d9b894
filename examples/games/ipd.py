"""Iterated prisoner's dilemma with exact values: naive learners, LOLA, and look-ahead agents built on unroll.

Foerster et al., "Learning with Opponent-Learning Awareness" (AAMAS 2018), Sec. 5 ("-Ex": exact value
functions). Each agent's policy has 5 logits: its probability of cooperating at the start and after each joint
action of the last round, (own, other) in {CC, CD, DC, DD}. The discounted return V_i(θ1, θ2) is exact and
differentiable: with P the 4 x 4 transition matrix of the joint actions and s0 the first round's distribution,
V_i = s0ᵀ (I − γP)^{-1} r_i. Agents do gradient ascent on their own V_i, δ = 1, for 200 updates from θ ~ N(0, 1),
as in the paper's code (alshedivat/lola, ``lola/train_exact.py``); the look-ahead rate is η = 1.

Learners (each a function of (mine, theirs) returning the ascent direction of ``mine``):

- naive (NL): ∇_1 V1;
- LOLA, the paper's first-order rule: ∇_1 V1 + η (∇_2 V1)ᵀ ∇_1∇_2 V2 (written out with torch.func);
- look-ahead through ``unroll.surrogate_loss`` with the opponent as the inner player: ∇_1 V1(θ1, θ2^K(θ1)), where
  θ2^K = K naive steps of the opponent (``unroll.sgd(η)`` on −V2). K = 1 is LOLA without the Taylor expansion
  (its first-order terms are LOLA's shaping term plus the look-ahead term η ∇_1∇_2 V1 ∇_2 V2); ``stop_grad``
  keeps the look-ahead term only ("LA" in Letcher et al. 2019). K > 1 looks further.

Seeds run together under ``torch.func.vmap``; seed s gives both agents the same initial logits in every pairing.

    python examples/games/ipd.py --threads 1       # writes docs/results/games/ipd.md, ipd.png, ipd_per_seed.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import common
import unroll
from unroll_examples import report

# ---- configuration ----
GAMMA = 0.96            # discount (paper)
DELTA = 1.0             # each agent's learning rate (paper's exact runs: lr = 1)
ETA = 1.0               # the learning rate each agent assumes for its opponent (paper: lr_correction = 1)
UPDATES = 200           # paper's exact runs: 200 updates ("trace_length")
SEEDS = 50              # paper: 50 runs
REWARD = (-1.0, -3.0, 0.0, -2.0)  # own reward after (own, other) = CC, CD, DC, DD (paper's payoff matrix)
OWN_VIEW = (0, 2, 1, 3, 4)        # CC, CD, DC, DD, start seen by the other agent: CD and DC swap
DOC = Path("docs/results/games/ipd.md")
NOTES = "(verdict and notes: written by hand after a run; kept when the page is rewritten)"

Rule = Callable[[Tensor, Tensor], Tensor]
"""``rule(mine, theirs) -> ascent direction of mine`` (5 logits each)."""


def occupancy(mine: Tensor, theirs: Tensor) -> Tensor:
    """Discounted occupancy d = (I − γP)^{-T} s0 of the joint actions CC, CD, DC, DD, from my point of view."""
    p = torch.sigmoid(mine)                  # my P(cooperate) after CC, CD, DC, DD and at the start
    q = torch.sigmoid(theirs)[list(OWN_VIEW)]  # theirs, indexed by the same joint actions (mine first)

    def joint(a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([a * b, a * (1 - b), (1 - a) * b, (1 - a) * (1 - b)], -1)
    transition = joint(p[:4], q[:4])         # row: last joint action, column: next one
    start = joint(p[4], q[4])
    return torch.linalg.solve(torch.eye(4, dtype=mine.dtype) - GAMMA * transition.T, start)


def value(mine: Tensor, theirs: Tensor) -> Tensor:
    """My exact discounted return V(mine, theirs); the opponent's is value(theirs, mine)."""
    return occupancy(mine, theirs) @ torch.tensor(REWARD, dtype=mine.dtype)


def naive(mine: Tensor, theirs: Tensor) -> Tensor:
    """NL: ascend my own value, the opponent held fixed."""
    return torch.func.grad(value)(mine, theirs)


def lola(mine: Tensor, theirs: Tensor, eta: float = ETA) -> Tensor:
    """The LOLA paper's rule: ∇_1 V1 + η (∇_2 V1)ᵀ ∇_1∇_2 V2, with ∇_2 V1 held constant."""
    my_value_grad_theirs = torch.func.grad(value, argnums=1)(mine, theirs)  # ∇_2 V1, a constant below

    def their_step_alignment(m: Tensor) -> Tensor:
        their_grad = torch.func.grad(lambda t: value(t, m))(theirs)           # ∇_2 V2 as a function of θ1
        return my_value_grad_theirs @ their_grad
    return naive(mine, theirs) + eta * torch.func.grad(their_step_alignment)(mine)


def look_ahead(K: int, stop_grad: bool = False, eta: float = ETA) -> Rule:
    """Ascend V1(θ1, θ2^K(θ1)): the opponent, a naive learner, is the inner player of unroll.surrogate_loss."""
    def their_loss(theirs: Dict[str, Tensor], mine: Tensor) -> Tensor:  # what the opponent minimises
        return -value(theirs["theta"], mine)

    def my_loss(theirs: Dict[str, Tensor], mine: Tensor) -> Tensor:  # mine, at the opponent's look-ahead
        return -value(mine, theirs["theta"])

    surrogate = unroll.surrogate_loss(their_loss, K, stop_grad, optimizer=unroll.sgd(eta), outer_fn=my_loss)

    def rule(mine: Tensor, theirs: Tensor) -> Tensor:
        state = unroll.sgd(eta).init({"theta": theirs})
        return -torch.func.grad(lambda m: surrogate({"theta": theirs}, state, m))(mine)
    return rule


PAIRINGS: Dict[str, Tuple[Rule, Rule]] = {
    "NL vs NL": (naive, naive),
    "LOLA vs LOLA": (lola, lola),
    "LA (K=1, stop_grad) vs LA": (look_ahead(1, True), look_ahead(1, True)),
    "look-ahead K=1 vs K=1": (look_ahead(1), look_ahead(1)),
    "look-ahead K=2 vs K=2": (look_ahead(2), look_ahead(2)),
    "look-ahead K=5 vs K=5": (look_ahead(5), look_ahead(5)),
    "LOLA vs NL": (lola, naive),
    "look-ahead K=1 vs NL": (look_ahead(1), naive),
}


def train(first: Rule, second: Rule, theta1: Tensor, theta2: Tensor, updates: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Both agents step together from the same point, every seed at once. Returns the final logits and the
    per-step rewards (1 − γ)·V of both agents after every update, shape (updates + 1, seeds, 2)."""
    def step(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        return a + DELTA * first(a, b), b + DELTA * second(b, a)
    both_steps = torch.func.vmap(step)

    def rewards(a: Tensor, b: Tensor) -> Tensor:
        return (1 - GAMMA) * torch.stack([torch.func.vmap(value)(a, b), torch.func.vmap(value)(b, a)], -1)

    history = [rewards(theta1, theta2)]
    for _ in range(updates):
        theta1, theta2 = both_steps(theta1, theta2)
        history.append(rewards(theta1, theta2))
    return theta1, theta2, torch.stack(history)


def cooperation(mine: Tensor, theirs: Tensor) -> Tensor:
    """My discounted frequency of cooperating: (1 − γ)·(d_CC + d_CD)."""
    d = torch.func.vmap(occupancy)(mine, theirs)
    return (1 - GAMMA) * (d[:, 0] + d[:, 1])


def mean_sd(values: Tensor) -> str:
    """``"mean ± sd"`` over seeds; the value alone for one seed (its sd is undefined: report.py's convention)."""
    return report.plus_minus(float(values.mean()), float(values.std()) if len(values) > 1 else math.nan)


def per_seed_path(doc: Path) -> Path:
    """Where every seed's final numbers go: beside the page, ``<page>_per_seed.json``."""
    return doc.with_name(f"{doc.stem}_per_seed.json")


def per_seed_row(name: str, final: Tensor, cooperation_1: Tensor, cooperation_2: Tensor,
                 p_cooperate_1: Tensor) -> Dict[str, Any]:
    """One pairing's final numbers, seed by seed (index = seed), rounded to 6 decimals: what the table's means,
    standard deviations and paired gaps are computed from."""
    def rounded(values: Tensor) -> List[Any]:
        return [round(v, 6) if isinstance(v, float) else [round(x, 6) for x in v] for v in values.tolist()]
    return {"agents": name, "reward_1": rounded(final[:, 0]), "reward_2": rounded(final[:, 1]),
            "cooperation_1": rounded(cooperation_1), "cooperation_2": rounded(cooperation_2),
            "p_cooperate_1": rounded(p_cooperate_1)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help="runs per pairing, seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--updates", type=int, default=UPDATES, help="updates per run (default: %(default)s)")
    parser.add_argument("--doc", type=Path, default=DOC, help="the page to write; the figure and the per-seed "
                        "numbers (<page>_per_seed.json) go beside it (default: %(default)s)")
    args = parser.parse_args(argv)
    command = report.command_line("examples/games/ipd.py", argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)

    inits = [torch.randn(2, 5, generator=torch.Generator().manual_seed(s)) for s in range(args.seeds)]
    theta1, theta2 = torch.stack([i[0] for i in inits]), torch.stack([i[1] for i in inits])
    header = ["agents (1 vs 2)", "reward / step, agent 1", "agent 2", "agent 1 − agent 2 (paired)",
              "cooperation, agent 1", "agent 2", "agent 1's P(C) after CC, CD, DC, DD, start", "CPU s / run"]
    rows: List[List[str]] = []
    curves: Dict[str, Tensor] = {}
    policies: Dict[str, Tensor] = {}
    per_seed: List[Dict[str, Any]] = []
    started = time.process_time()
    for name, (first, second) in PAIRINGS.items():
        begin = time.process_time()
        end1, end2, history = train(first, second, theta1, theta2, args.updates)
        seconds = time.process_time() - begin
        curves[name] = history
        final = history[-1]
        p_cooperate = torch.sigmoid(end1)
        policies[name] = policy = p_cooperate.mean(0)
        gap = final[:, 0] - final[:, 1]
        coop1, coop2 = cooperation(end1, end2), cooperation(end2, end1)
        per_seed.append(per_seed_row(name, final, coop1, coop2, p_cooperate))
        rows.append([name, mean_sd(final[:, 0]), mean_sd(final[:, 1]),
                     report.plus_minus(*report.mean_and_se(gap.tolist()), "+.3f", ".3f"),
                     mean_sd(coop1), mean_sd(coop2), ", ".join(f"{p:.2f}" for p in policy), f"{seconds:.1f}"])
        print(report.table(rows[-1:], header).splitlines()[-1], flush=True)
    minutes = (time.process_time() - started) / 60

    image = args.doc.with_suffix(".png")
    plot(curves, policies, image)
    numbers_line = report.write_per_seed(args.doc, per_seed_path(args.doc), {
        "command": command, "seeds": args.seeds, "updates": args.updates,
        "p_cooperate_order": ["after CC", "after CD", "after DC", "after DD", "start"], "pairings": per_seed},
        "Every seed's final numbers:")
    settings = (f"Iterated prisoner's dilemma, rewards (own, other) CC −1, CD −3, DC 0, DD −2, discount γ = {GAMMA}; "
                f"exact values; both agents update together with learning rate δ = {DELTA:g} for {args.updates} "
                f"updates, from logits ~ N(0, 1) (seed s: the same start in every row); look-ahead learning rate "
                f"η = {ETA:g}; {args.seeds} seeds, all at once under `torch.func.vmap`. Reward / step: (1 − γ)·V "
                f"at the end, mean ± standard deviation over seeds (−1: mutual cooperation, −2: mutual "
                f"defection); the paired gap is mean ± standard error over seeds. Cooperation: (1 − γ)·(discounted "
                f"frequency of the agent's C), mean ± sd. P(C) after XY: X is the agent's own last action.")
    common.write_page(args.doc, "Iterated prisoner's dilemma: LOLA and look-ahead agents on unroll",
                      command, settings, notes=NOTES, main_figure=(image, "reward per step over updates"),
                      sections=["## Final rewards and cooperation", "", report.table(rows, header), "",
                                numbers_line, "",
                                f"All pairings took {minutes:.1f} min of CPU time on one thread."])


def plot(curves: Dict[str, Tensor], policies: Dict[str, Tensor], path: Path) -> None:
    """Left: agent 1's reward per step over updates (mean over seeds; dashed: against a naive learner). Right:
    agent 1's final P(cooperate) per state (mean over seeds) for the pairings of two identical learners."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def against_naive(name: str) -> bool:
        return name.endswith(" vs NL") and not name.startswith("NL ")

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, history) in enumerate(curves.items()):
        left.plot(history[:, :, 0].mean(1), color=f"C{i}", label=name, ls="--" if against_naive(name) else "-")
    left.set_xlabel("update")
    left.set_ylabel("agent 1's reward per step, (1 − γ)·V1, mean over seeds")
    left.set_ylim(-2.1, -0.9)
    left.legend(fontsize=8)
    same = [name for name in policies if not against_naive(name)]
    width = 0.8 / len(same)
    for i, name in enumerate(same):
        right.bar([s + i * width for s in range(5)], policies[name], width, color=f"C{list(curves).index(name)}",
                  label=name)
    right.set_xticks([s + 0.4 - width / 2 for s in range(5)], ["after CC", "after CD", "after DC", "after DD",
                                                                "start"])
    right.set_ylabel("agent 1's final P(cooperate), mean over seeds")
    right.set_title("tit-for-tat would be 1, 0, 1, 0, 1 (after XY: X own action, Y the other's)", fontsize=9)
    right.set_ylim(0, 1.3)
    right.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle("Iterated prisoner's dilemma, exact values")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
