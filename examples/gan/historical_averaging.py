"""Is unrolling just averaging discriminators over time? The App. B.1 ablation of Metz et al. (2017), Figs. App.1
and App.2.

No unrolling: the generator trains against an *ensemble* of past discriminators,

- the last N discriminators, N in {1, 5, 20, 50} (N = 1 is the plain GAN; Fig. App.1);
- 5 discriminators, a snapshot taken every P discriminator updates, P in {1, 10, 100, 1000} (P = 1 is the
  last 5; Fig. App.2: "longer time delays ... less and less stable");

next to unrolled runs (K = 1 and 5, full gradient) of measured cost, so the comparison is at known compute.

**How the ensemble combines.** The ensemble's probability that a point is real is the mean of its members'
probabilities, D_ens(x) = (1/N) Σ_i σ(l_i(x)), and the generator's loss is App. A's saturating loss
log(1 - D_ens(G(z))) (or -log D_ens(G(z)) with ``--loss nonsaturating``), computed stably with logsumexp.
Averaging probabilities keeps every member's vote bounded: with a mean of logits (``--combine logits``), one
old, very confident discriminator (a large |logit| on a region it was trained on long ago) outvotes all the
others, which is the failure App. B.1 describes rather than a property of averaging. Until N snapshots exist,
the ensemble holds the ones taken so far.

    python examples/gan/historical_averaging.py                 # the sweep behind docs/results/historical_averaging.md
    python examples/gan/historical_averaging.py --resume        # continue it after a kill
    python examples/gan/historical_averaging.py --report-only   # rewrite the page from the runs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from unroll_examples import ablations as ab
from unroll_examples import report
from unroll_examples.models import discriminator_forward
from unroll_examples.sweeps import Cell
from unroll_examples.training import LOSSES, SIZE_FLAGS, GeneratorRule, StepInputs, Strategies

# ---- configuration: TRAINING's fields in FLAGS are flags of their names (--d-lr ...) whose defaults are its values
# here (ablations.add_common_flags); the cells vary K and the discriminator ensembles ----
TRAINING = dataclasses.replace(ab.COMMON, steps=3000)
FLAGS = ab.COMMON_FLAGS + ("loss",)
SIZES = (1, 5, 20, 50)  # Fig. App.1: ensembles of the last N discriminators
PERIODS = (1, 10, 100, 1000)  # Fig. App.2: 5 discriminators, one snapshot every P discriminator updates
PERIOD_ENSEMBLE = 5
UNROLLED_KS = (1, 5)  # the unrolled runs the ensembles are compared with
COMBINES = ("probabilities", "logits")
PAPER_CLAIM = ("historical averaging does not visibly increase stability (Fig. App.1); with longer time delays "
               "between the ensemble's discriminators the model becomes less and less stable (Fig. App.2)")


# ---- the ensemble, as the generator's rule in the training loop (pure functions of per-seed tensors: vmap-able) ----
@dataclass(frozen=True)
class HistoricalAverage(GeneratorRule):
    """Historical averaging (App. B.1): no unrolling, G descends its loss against the ensemble of the last ``size``
    snapshots of D, one taken every ``period`` D updates, combined by ``combine`` (:func:`ensemble_log_probs`).

    ``extra`` holds ``history`` (each D parameter stacked ``[size, ...]``, newest first), ``valid`` (``[size]``,
    1 where a snapshot exists) and ``updates`` (D updates so far). Snapshots are taken after the D update, so with
    ``period == 1`` the newest member is the current D and ``size == 1`` is the plain GAN.
    """

    size: int
    period: int = 1
    combine: str = "probabilities"
    loss: str = "saturating"
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.size < 1 or self.period < 1:
            raise ValueError(f"ensemble size and period must be >= 1, got size={self.size}, period={self.period}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def init_extra(self, d: Dict[str, Tensor]) -> Dict[str, Tensor]:
        history = {name: torch.zeros(self.size, *p.shape, dtype=p.dtype) for name, p in d.items()}
        return {"history": history, "valid": torch.zeros(self.size), "updates": torch.zeros(())}

    def after_d_step(self, extra: Dict[str, Tensor], d: Dict[str, Tensor], d_state: object) -> Dict[str, Tensor]:
        updates = extra["updates"] + 1
        take = (updates - 1) % self.period == 0  # the first update is always taken

        def push(stack: Tensor, new: Tensor) -> Tensor:
            # A shift, not an in-place write: the history is a vmapped, checkpointed input.
            return torch.where(take, torch.cat([new[None], stack[:-1]]), stack)

        history = {name: push(extra["history"][name], d[name]) for name in d}
        valid = push(extra["valid"], torch.ones(()))
        return {"history": history, "valid": valid, "updates": updates}

    def sample_loss(self, fake: Tensor, d: Dict[str, Tensor], d_state: object, extra: Dict[str, Tensor],
                    inputs: StepInputs) -> Tensor:
        logits = torch.func.vmap(discriminator_forward, in_dims=(0, None))(extra["history"], fake)  # [size, B]
        log_real, log_fake = ensemble_log_probs(logits, extra["valid"], self.combine)
        # App. A's saturating loss log(1 - D(G(z))) (the real term does not depend on G), or -log D(G(z)).
        return log_fake.mean() if self.loss == "saturating" else -log_real.mean()


def ensemble_log_probs(logits: Tensor, valid: Tensor, combine: str) -> Tuple[Tensor, Tensor]:
    """(log D_ens, log(1 - D_ens)) per sample from member logits ``[N, B]``; members with ``valid == 0`` are out.

    ``probabilities``: D_ens = mean of σ(logit) over valid members (logsumexp of log σ, no overflow);
    ``logits``: D_ens = σ(mean of the valid members' logits).
    """
    mask = valid[:, None]
    count = valid.sum()
    if combine == "logits":
        mean_logit = (logits * mask).sum(0) / count
        return F.logsigmoid(mean_logit), F.logsigmoid(-mean_logit)
    log_mask = torch.log(mask)  # -inf drops a member from the logsumexp
    log_count = torch.log(count)
    return (torch.logsumexp(F.logsigmoid(logits) + log_mask, 0) - log_count,
            torch.logsumexp(F.logsigmoid(-logits) + log_mask, 0) - log_count)


# ---- the sweep ----
def build_parser() -> argparse.ArgumentParser:
    p = ab.parser(__doc__)
    ab.add_common_flags(p, TRAINING, out="runs/historical_averaging", doc="docs/results/historical_averaging.md",
                        fields=FLAGS)
    p.add_argument("--sizes", type=SIZE_FLAGS["ensemble"], nargs="+", default=list(SIZES),
                   help="ensembles of the last N")
    p.add_argument("--periods", type=int, nargs="+", default=list(PERIODS),
                   help=f"ensembles of {PERIOD_ENSEMBLE}, one snapshot every P discriminator updates")
    p.add_argument("--unrolled-ks", type=SIZE_FLAGS["K"], nargs="+", default=list(UNROLLED_KS),
                   help="unrolled runs to compare with (full gradient)")
    p.add_argument("--combine", choices=COMBINES, default="probabilities",
                   help="average the members' probabilities or their logits")
    ab.add_timing_flags(p)
    return p


def build_cells(args: argparse.Namespace) -> List[Cell]:
    if any(n < 1 for n in args.sizes + args.periods) or any(k < 1 for k in args.unrolled_ks):
        raise ValueError("--sizes, --periods and --unrolled-ks must be >= 1")
    cfg = dataclasses.replace(ab.base_config(args, TRAINING, FLAGS), K=0)
    suffix = "" if args.combine == "probabilities" else "_logits"

    def ensemble(label: str, size: int, period: int) -> Cell:
        # The folder depends on what is trained, not on the row: "5 every P=1" is "last N=5" and shares its runs.
        return Cell("ensembles", label, cfg, args.seed_list, tag=f"size{size}_every{period}{suffix}",
                    strategies=Strategies(generator=HistoricalAverage(size, period, args.combine, args.loss,
                                                                 cfg.activation)))

    cells = [ensemble(f"last N={n}", n, 1) for n in args.sizes]
    cells += [ensemble(f"{PERIOD_ENSEMBLE} every P={p}", PERIOD_ENSEMBLE, p) for p in args.periods]
    cells += [Cell("unrolled", f"unrolled K={k}", dataclasses.replace(cfg, K=k), args.seed_list)
              for k in args.unrolled_ks]
    return cells


def timing_warmup(args: argparse.Namespace) -> int:
    """Untimed iterations before the cost is timed: enough to fill the largest ensemble of the last N."""
    return max(args.sizes + [PERIOD_ENSEMBLE])


def write_report(args: argparse.Namespace, cells: List[Cell], log: Sequence[dict], command: str,
                 complete: bool) -> None:
    warmup = timing_warmup(args)
    intro = (f"The generator trains against an ensemble of past discriminators (no unrolling); the ensemble "
             f"combines by averaging its members' **{args.combine}** (see `historical_averaging.py` for why "
             f"probabilities by default). Snapshots are taken after a D update; until an ensemble is full it "
             f"holds the snapshots taken so far. Paper: {PAPER_CLAIM}. **cost vs {cells[0].label}**: each cell's "
             f"iteration (all seeds vmapped, no evaluation) timed in one process after training, the cells "
             f"interleaved over {args.timing_rounds} rounds of {args.timing_iterations} iterations (median), after "
             f"{warmup} untimed iterations so that every ensemble of the last N is full (an ensemble "
             f"of {PERIOD_ENSEMBLE} every P holds fewer members while P > {warmup // PERIOD_ENSEMBLE}; "
             f"once full it costs what the last {PERIOD_ENSEMBLE} do), divided by {cells[0].label}'s; the "
             f"s / iteration column is the training wall time (evaluations and checkpoints included), taken while "
             f"other jobs shared the machine.")
    metas, n_modes, lines = ab.start_page(
        "Historical averaging vs unrolling (Metz et al. 2017, App. B.1): measured over seeds", intro, args, cells,
        command, complete)
    costs = ab.timings(args, cells, complete, warmup=warmup) or {}
    sections = [("last N=", "Ensembles of the last N discriminators (Fig. App.1)", "historical_averaging_last_n"),
                (f"{PERIOD_ENSEMBLE} every P=", f"Ensembles of {PERIOD_ENSEMBLE}, one snapshot every P discriminator "
                                                f"updates (Fig. App.2)", "historical_averaging_period"),
                ("unrolled", "Unrolled, for comparison (full gradient of Eq. 12)", "historical_averaging_unrolled")]
    main_figure = None  # the first section's figure opens the page, after its verdict
    for prefix, title, figure in sections:
        rows = [(c, m) for c, m in metas if c.label.startswith(prefix)]
        if not rows:
            continue
        lines += [f"## {title}", "", ab.timed_results_table(rows, args, n_modes, log, costs,
                                                             reference=(cells[0].folder, cells[0].label)), ""]
        drawn = ab.draw_figure(rows, Path(args.out), args, figure, f"{args.dataset}: {title} (seed "
                                                                   f"{args.seed_list[0]})")
        if main_figure is None:
            main_figure = drawn
        elif drawn is not None:
            lines += [report.figure(Path(args.doc), *drawn), ""]
    lines += ab.per_seed_json(args, metas, n_modes, command, costs)
    ab.write_page(Path(args.doc), lines, log, report.opening(Path(args.doc), main_figure))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return ab.main_for("historical_averaging.py", build_parser(), build_cells, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
