"""Mode-coverage metrics for 2-D Gaussian mixtures (VEEGAN/PacGAN conventions) and an energy distance.

Definitions (used by every mixture experiment):

- a sample is *high quality* (HQ) if it lies within ``hq_stds`` (3) standard deviations of its nearest mode;
- a mode is *covered* if it is the nearest mode of at least one HQ sample; the *strict* count requires at least
  ``strict_fraction`` (1%) of the HQ samples the true weights predict for that mode (``w_i * n``);
- *reverse KL* is KL(q || p) between q, the histogram of every sample's nearest mode, and p, the true weights
  (finite even when modes are missed, since p > 0; all mass on mode i gives log(1 / p_i));
- *energy distance* 2E|X-Y| - E|X-X'| - E|Y-Y'| between (sub-sampled) generator and data samples;
- *steps to stable coverage*: the first evaluation from which a run keeps every mode strictly covered with a
  minimum share of HQ samples until its end (the App. B ablations' measure of convergence).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

METRIC_NAMES = ("hq", "modes", "modes_strict", "reverse_kl", "energy")


def nearest_mode(samples: Tensor, centers: Tensor) -> Tuple[Tensor, Tensor]:
    """(index [N], Euclidean distance [N]) of each sample's nearest centre."""
    dist = torch.cdist(samples.double(), centers.double())
    distance, index = dist.min(dim=1)
    return index, distance


def reverse_kl(q: Tensor, p: Tensor) -> float:
    """KL(q || p) for histograms ``q`` (may contain zeros) and ``p`` (strictly positive), in nats."""
    q = q.double() / q.sum()
    p = p.double() / p.sum()
    present = q > 0
    return float((q[present] * (q[present] / p[present]).log()).sum())


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Unbiased (U-statistic) squared energy distance between samples ``x`` [n, d] and ``y`` [m, d]."""
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    # The diagonals are zero, so dividing by n(n-1) excludes them.
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def mode_metrics(samples: Tensor, centers: Tensor, std: float, weights: Tensor, hq_stds: float = 3.0,
                 strict_fraction: float = 0.01) -> Dict[str, float]:
    """``hq`` (fraction in [0, 1]), ``modes``, ``modes_strict`` and ``reverse_kl`` for samples [N, 2]."""
    if not torch.isfinite(samples).all():
        # A diverged generator: nothing is high quality, nothing is covered.
        return {"hq": 0.0, "modes": 0, "modes_strict": 0, "reverse_kl": float("nan")}
    n = samples.shape[0]
    index, distance = nearest_mode(samples, centers)
    hq = distance <= hq_stds * std
    n_modes = centers.shape[0]
    hq_counts = torch.bincount(index[hq], minlength=n_modes)
    expected = weights.double() * n
    return {
        "hq": float(hq.double().mean()),
        "modes": int((hq_counts >= 1).sum()),
        "modes_strict": int((hq_counts.double() >= strict_fraction * expected).sum()),
        "reverse_kl": reverse_kl(torch.bincount(index, minlength=n_modes), weights),
    }


def all_metrics(samples: Tensor, reference: Tensor, centers: Tensor, std: float, weights: Tensor,
                energy_samples: int = 2000) -> Dict[str, float]:
    """:func:`mode_metrics` plus ``energy`` on the first ``energy_samples`` of ``samples`` and ``reference``."""
    metrics = mode_metrics(samples, centers, std, weights)
    sub = samples[:energy_samples]
    metrics["energy"] = energy_distance(sub, reference[:energy_samples]) if torch.isfinite(sub).all() \
        else float("nan")
    return metrics


def metric_records(records: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Each evaluation's step, seed and metrics (:data:`METRIC_NAMES`), without the losses: the per-seed numbers
    that results pages commit beside them."""
    return [{"step": r["step"], "seed": r["seed"], **{k: r.get(k) for k in METRIC_NAMES}} for r in records]


def fully_covered(record: Mapping[str, Any], n_modes: int, min_hq: float = 0.05) -> bool:
    """One evaluation (``modes_strict``, ``hq``) covers all ``n_modes`` modes by the strict count, with at least
    ``min_hq`` of its samples high quality."""
    return record["modes_strict"] == n_modes and record["hq"] >= min_hq


def steps_to_stable_coverage(records: Sequence[Mapping[str, Any]], n_modes: int, min_hq: float = 0.05
                             ) -> Optional[int]:
    """The first evaluation step from which every later evaluation of one run covers all ``n_modes`` modes by
    the strict count, with at least ``min_hq`` of its samples high quality; ``None`` if the run never settles.

    ``records`` are one run's evaluations (``step``, ``modes_strict``, ``hq``), in any order. A run that reaches
    coverage and then drops a mode again restarts the clock: mode hopping is not convergence.
    """
    settled: Optional[int] = None
    for record in sorted(records, key=lambda r: r["step"]):
        if not fully_covered(record, n_modes, min_hq):
            settled = None
        elif settled is None:
            settled = int(record["step"])
    return settled
