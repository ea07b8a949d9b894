"""Sample-diversity analyses of Metz et al. (2017), Sec. 3.4, as reusable functions.

* Inference via optimisation (Sec. 3.4.1, Table 3, Fig. 5): for each target image ``x`` find
  ``z* = argmin_z ||G(z) - x||^2`` with L-BFGS from several random starts (the paper uses 3) and keep the best;
  a model that dropped the mode ``x`` belongs to cannot reconstruct it. :func:`reconstruction_table` gives
  Table 3's mean MSE per model and "percent best rank" (the share of targets a model reconstructs best).
* Pairwise distances (Sec. 3.4.2, Fig. 6): histograms of l2 distances between random pairs of samples, against
  the data's; mode collapse shifts mass to short distances. The pair sampling and histograms are those of
  :mod:`image_metrics`.

:class:`DiversityProbe` bundles both for the training scripts: fixed targets and a fixed distance range from
the data, per-model evaluation, then a table and figures across models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import image_metrics as im
from . import runs
from .image_experiment import first_finished
from .plotting import from_uint8, image_grid, pyplot, save_figure, to_uint8
from .report import mean_and_se, plus_minus

Generator = Callable[[Tensor], Tensor]
"""``G(z) -> images``; must treat every latent independently (e.g. batch norm in evaluation mode)."""


# ------------------------------------------------------------------------------ inference via optimisation


class Reconstruction(NamedTuple):
    """Best of the restarts per target: ``mse`` [M] (mean over pixels), ``z`` [M, d], ``images`` like the
    targets; ``mse_per_restart`` [R, M]."""

    mse: Tensor
    z: Tensor
    images: Tensor
    mse_per_restart: Tensor


def _per_target_mse(images: Tensor, targets: Tensor) -> Tensor:
    return (images - targets).pow(2).flatten(1).mean(dim=1)


def _lbfgs(generator: Generator, targets: Tensor, z0: Tensor, max_iter: int) -> Tensor:
    """L-BFGS on ``sum_i mse(G(z_i), x_i)``: the targets' problems are independent (their gradients fall in
    separate blocks of ``z``), so one batched run solves them together, sharing the line search."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        loss = _per_target_mse(generator(z), targets).sum()
        # autograd.grad rather than backward(): the generator's own parameters must not accumulate gradients.
        (z.grad,) = torch.autograd.grad(loss, z)
        return loss.detach()

    with torch.enable_grad():
        opt.step(closure)
    return z.detach()


def reconstruct(generator: Generator, targets: Tensor, latent_dim: int, restarts: int = 3, max_iter: int = 100,
                seed: int = 0, chunk: int = 256) -> Reconstruction:
    """Inference via optimisation (Eq. 13-14): the best of ``restarts`` L-BFGS runs from ``z ~ N(0, I)`` per
    target image ``targets`` [M, ...]. Deterministic in ``seed``; targets are processed ``chunk`` at a time."""
    if restarts < 1 or max_iter < 1:
        raise ValueError(f"need restarts >= 1 and max_iter >= 1, got {restarts}, {max_iter}")
    gen = torch.Generator().manual_seed(seed)
    n = targets.shape[0]
    starts = torch.randn(restarts, n, latent_dim, generator=gen)  # drawn up front: independent of chunk
    mse_all = torch.empty(restarts, n)
    z_all = torch.empty(restarts, n, latent_dim)
    for i in range(0, n, chunk):
        target = targets[i:i + chunk]
        for r in range(restarts):
            z = _lbfgs(generator, target, starts[r, i:i + chunk].to(target.device), max_iter)
            with torch.no_grad():
                mse_all[r, i:i + chunk] = _per_target_mse(generator(z), target).cpu()
            z_all[r, i:i + chunk] = z.cpu()
    # A diverged line search can leave NaN: such a restart never wins.
    best = torch.nan_to_num(mse_all, nan=float("inf")).argmin(dim=0)
    z_best = z_all[best, torch.arange(n)]
    with torch.no_grad():
        images = torch.cat([generator(z_best[i:i + chunk].to(targets.device)).cpu() for i in range(0, n, chunk)])
    return Reconstruction(mse_all[best, torch.arange(n)], z_best, images, mse_all)


def percent_best_rank(mse: Tensor) -> Tensor:
    """[n_models] percent of targets each model reconstructs best, from ``mse`` [n_models, M]; ties share the
    credit, so the percentages sum to 100."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    mse = torch.nan_to_num(mse, nan=float("inf"))
    winners = (mse == mse.min(dim=0, keepdim=True).values).double()
    return 100.0 * (winners / winners.sum(dim=0, keepdim=True)).mean(dim=1)


def reconstruction_table(mse: Mapping[str, Sequence[Tensor]]) -> Dict[str, Dict[str, float]]:
    """Table 3 from per-target MSEs ``{model: [mse of run 0 [M], run 1, ...]}`` (same targets everywhere).

    ``mse`` / ``mse_se``: mean over runs of each run's mean MSE, and its standard error (NaN for one run:
    undefined); ``percent_best``: for run index i, the models' i-th runs compete per target (as App. G groups runs
    by index), averaged over i (only indices every model has are compared).
    """
    if not mse:  # every run diverged: no model to compare
        return {}
    names = list(mse)
    n_runs = min(len(model_runs) for model_runs in mse.values())
    best = torch.zeros(len(names), dtype=torch.float64)
    for i in range(n_runs):
        best += percent_best_rank(torch.stack([torch.as_tensor(mse[name][i]) for name in names]))
    best /= max(n_runs, 1)
    table = {}
    for j, name in enumerate(names):
        means = [float(torch.as_tensor(run).double().mean()) for run in mse[name]]
        mean, se = mean_and_se(means)  # no standard error for one run (NaN; null in results.json)
        table[name] = {"mse": mean, "mse_se": se, "percent_best": float(best[j]), "runs": len(means)}
    return table


def fractional_difference(first: Tensor, last: Tensor) -> Tensor:
    """``|a - b| / ((a + b) / 2)``: Sec. 3.4.1's key for showing where two models differ most (Fig. 5)."""
    return (first - last).abs() / (0.5 * (first + last)).clamp_min(1e-12)


# ------------------------------------------------------------------------------------ pairwise distances


def distance_profile(images: Tensor, n_pairs: int, seed: int, value_range: Tuple[float, float],
                     bins: int = 50) -> Dict[str, Any]:
    """Mean and quartiles of the l2 distances of ``n_pairs`` random pairs, and their density histogram on
    ``value_range`` (pass the same range for data and every model)."""
    distances = im.pairwise_l2_distances(images, n_pairs, torch.Generator().manual_seed(seed))
    density, edges = im.distance_histogram(distances, bins=bins, value_range=value_range)
    q = torch.quantile(distances.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"mean_distance": float(distances.mean()), "distance_quartiles": [float(v) for v in q],
            "histogram": [float(v) for v in density], "edges": [float(v) for v in edges]}


# ----------------------------------------------------------------------------------- for the scripts


@dataclass
class DiversityProbe:
    """Fixed targets and distance range drawn from ``data`` [N, ...] (images in [-1, 1]); evaluates models.

    ``n_targets`` images (paper: 1280 training images) are reconstructed with ``restarts`` L-BFGS starts of up to
    ``max_iter`` iterations; ``n_pairs`` random pairs give the distance histograms.
    """

    data: Tensor
    n_targets: int = 128
    restarts: int = 3
    max_iter: int = 100
    n_pairs: int = 5000
    n_samples: int = 2000
    bins: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n = self.data.shape[0]
        if self.n_targets > n:
            raise ValueError(f"n_targets = {self.n_targets} exceeds the {n} data images")
        self.targets = self.data[torch.randperm(n, generator=gen)[:self.n_targets]]
        pool = self.data[torch.randperm(n, generator=gen)[:self.n_samples]]
        data_distances = im.pairwise_l2_distances(pool, self.n_pairs, torch.Generator().manual_seed(self.seed))
        # A range that holds the data's distances with room for more spread-out models.
        self.value_range = (0.0, 1.25 * float(data_distances.max()))
        self.data_profile = distance_profile(pool, self.n_pairs, self.seed, self.value_range, self.bins)

    def evaluate(self, generator: Generator, samples: Tensor, latent_dim: int) -> Tuple[Dict[str, Any], Tensor]:
        """``(metrics, reconstructed images)`` of one model: ``samples`` give its distance profile."""
        rec = reconstruct(generator, self.targets, latent_dim, self.restarts, self.max_iter, seed=self.seed)
        metrics = {"recon_mse": float(rec.mse.mean()), "recon_mse_per_target": [float(v) for v in rec.mse],
                   **distance_profile(samples[:self.n_samples], self.n_pairs, self.seed, self.value_range,
                                      self.bins)}
        return metrics, rec.images

    @staticmethod
    def table(records: Sequence[Mapping[str, Any]], model_key: str) -> Dict[str, Dict[str, float]]:
        """Table 3 over finished ``records`` grouped by ``record[model_key]`` (runs ordered by seed)."""
        by_model: Dict[str, List[Tuple[int, Tensor]]] = {}
        for r in records:
            if r.get("status") == "done" and "recon_mse_per_target" in r:
                by_model.setdefault(str(r[model_key]), []).append((r["seed"],
                                                                   torch.tensor(r["recon_mse_per_target"])))
        return reconstruction_table({name: [m for _, m in sorted(v, key=lambda t: t[0])]
                                     for name, v in by_model.items()})


def plot_distance_histograms(data_profile: Mapping[str, Any], profiles: Sequence[Tuple[str, Mapping[str, Any]]],
                             path: Path, title: str = "") -> None:
    """Fig. 6: density of pairwise l2 distances for the data (black) and each model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    edges = np.asarray(data_profile["edges"])
    centers = 0.5 * (edges[1:] + edges[:-1])
    ax.plot(centers, data_profile["histogram"], color="black", lw=2, label="data")
    for label, profile in profiles:
        ax.plot(centers, profile["histogram"], lw=1.2, label=label)
    ax.set_xlabel("l2 distance between random pairs", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_reconstructions(targets: Tensor, models: Sequence[Tuple[str, Tensor, Tensor]], path: Path, n: int = 8,
                         title: str = "") -> None:
    """Fig. 5: targets (first column) and each model's reconstruction with its MSE; ``models`` are
    ``(label, images [M, ...], mse [M])``. Shows the ``n`` targets with the largest fractional MSE difference
    between the first and the last model."""
    plt = pyplot()
    order = torch.argsort(fractional_difference(models[0][2], models[-1][2]), descending=True)[:n]
    fig, axes = plt.subplots(len(order), len(models) + 1, figsize=(1.2 * (len(models) + 1), 1.3 * len(order) + 0.4),
                             squeeze=False)
    for r, i in enumerate(order.tolist()):
        cells = [("data", targets[i], None)] + [(label, images[i], mse[i]) for label, images, mse in models]
        for c, (label, image, err) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(image_grid(image[None], ncol=1, pad=0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=7)
            if err is not None:
                ax.set_xlabel(f"{float(err):.4f}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------ shared by the training scripts

RECONSTRUCTIONS = "reconstructions.pt"


def script_evaluator(probe: DiversityProbe, extra: Optional[Callable[..., Dict[str, Any]]] = None
                     ) -> Callable[..., Dict[str, Any]]:
    """An ``evaluate(trainer, spec, run_dir)`` for :func:`image_training.run_experiment`: the probe's metrics
    (plus ``extra(trainer, spec, run_dir)``'s), the reconstructions saved to ``run_dir`` for the figure."""
    def evaluate(trainer: Any, spec: Any, run_dir: Path) -> Dict[str, Any]:
        samples = trainer.samples(probe.n_samples)
        # Targets stay on the CPU; the generator may run on another device.
        metrics, images = probe.evaluate(lambda z: trainer.forward_eval(z).cpu(), samples, trainer.gan.latent_dim)
        runs.save_checkpoint({"images": to_uint8(images)}, Path(run_dir) / RECONSTRUCTIONS)
        return {**metrics, **(extra(trainer, spec, run_dir) if extra is not None else {})}

    return evaluate


def script_outputs(probe: DiversityProbe, records: Sequence[Mapping[str, Any]], specs: Sequence[Any],
                   trainers: Mapping[str, Any], out: Path, model_key: str = "K",
                   paper: Optional[Mapping[str, str]] = None) -> Tuple[Dict[str, Dict[str, float]], str]:
    """Table 3 (returned, with its markdown) and the figures ``pairwise_distances.png`` (Fig. 6) and
    ``reconstructions.png`` (Fig. 5) from the first finished seed of every model."""
    table = DiversityProbe.table(records, model_key)
    lines = [f"| {model_key} | reconstruction MSE | percent best rank | runs |" + (" paper |" if paper else ""),
             "|---|---|---|---|" + ("---|" if paper else "")]
    for name, row in table.items():
        lines.append(f"| {name} | {plus_minus(row['mse'], row['mse_se'], '.4f')} | {row['percent_best']:.2f}% | "
                     f"{row['runs']} |" + (f" {paper.get(name, '—')} |" if paper else ""))
    first = first_finished(specs, trainers)
    by_run = {r["run"]: r for r in records if r.get("status") == "done"}
    profiles = [(f"{label}, seed {spec.cfg.seed}", by_run[spec.folder]) for label, (spec, _) in first.items()
                if spec.folder in by_run]
    if profiles:
        plot_distance_histograms(probe.data_profile, profiles, out / "pairwise_distances.png",
                                 title="pairwise l2 distances between random samples (Fig. 6)")
    recons = []
    for label, (spec, _) in first.items():
        path = Path(out) / spec.folder / RECONSTRUCTIONS
        if spec.folder in by_run and path.is_file():
            images = from_uint8(runs.load_checkpoint(path, ("images",))["images"])
            recons.append((label, images, torch.tensor(by_run[spec.folder]["recon_mse_per_target"])))
    if recons:
        plot_reconstructions(probe.targets, recons, out / "reconstructions.png",
                             title="inference via optimisation (Fig. 5)")
    return table, "\n".join(lines)
