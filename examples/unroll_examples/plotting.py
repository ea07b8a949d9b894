"""Figures of the experiments: Fig. 2-style density grids of the 2-D mixtures, sample grids over training
(Fig. 3), sample panels and loss curves of the image GANs. Every PNG is written atomically."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .data import Mixture
from .runs import atomic_write_bytes

# ------------------------------------------------------------------------------------ figures during a run


class FigureBudget:
    """When to redraw a figure that a running experiment keeps up to date (at every evaluation or snapshot): the
    first time, the last time (``force``), and whenever the time since the last drawing is at least ``ratio`` times
    what that drawing took, so the figures cost at most about ``1 / ratio`` of the run (matplotlib takes seconds
    on a loaded machine, more than a few fast iterations)."""

    def __init__(self, ratio: float = 10.0, assumed_cost: Optional[float] = None) -> None:
        """``assumed_cost``: with a value, the first drawing waits as if one of that cost had just been made (for
        figures that only help a run that lasts); without, the first call draws."""
        self.ratio = ratio
        self.last_end: Optional[float] = None if assumed_cost is None else time.perf_counter()
        self.last_cost = assumed_cost or 0.0

    def draw(self, plot: Callable[[], None], force: bool = False) -> bool:
        """Call ``plot()`` if it is due; returns whether it was."""
        now = time.perf_counter()
        if not force and self.last_end is not None and now - self.last_end < self.ratio * self.last_cost:
            return False
        plot()
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - now
        return True


# ------------------------------------------------------------------------------------------ image tensors


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 (compact snapshots)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1


# ------------------------------------------------------------------------------------ 2-D densities


def histogram_extent(mixture: Mixture) -> float:
    """Half-width of the square the density figures show."""
    return float(mixture.centers.abs().max()) + 1.0


def density_histogram(samples: Tensor, extent: float, bins: int = 100) -> Tensor:
    """2-D histogram counts [bins, bins] (x along rows) of ``samples`` inside [-extent, extent]^2."""
    finite = samples[torch.isfinite(samples).all(dim=1)].float()
    hist, _ = torch.histogramdd(finite, bins=[bins, bins], range=[-extent, extent, -extent, extent])
    return hist.to(torch.int32)


def _smooth(hist: Tensor, sigma_bins: float = 1.0) -> Tensor:
    radius = int(3 * sigma_bins)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_bins) ** 2)
    kernel = kernel / kernel.sum()
    image = hist.double()[None, None]
    image = torch.nn.functional.conv2d(image, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    image = torch.nn.functional.conv2d(image, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return image[0, 0]


def plot_density_grid(rows: Sequence[Tuple[str, Sequence[Tuple[int, Tensor]]]], data_hist: Tensor, extent: float,
                      path: Path, max_cols: int = 8, title: str = "") -> None:
    """Fig. 2-style grid: one row per run (label, [(step, hist), ...]); the last column is the data."""
    plt = pyplot()
    n_cols = min(max_cols, max(len(snaps) for _, snaps in rows)) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (label, snaps) in enumerate(rows):
        # Evenly spaced snapshots, always including the last one.
        picks = sorted({round(i * (len(snaps) - 1) / max(n_cols - 2, 1)) for i in range(n_cols - 1)})
        panels = [(f"{snaps[i][0]}", snaps[i][1]) for i in picks] + [("data", data_hist)]
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels) - 1 and c != n_cols - 1:
                ax.axis("off")
                continue
            name, hist = panels[-1] if c == n_cols - 1 else panels[c]
            # A light blur (a KDE on the histogram grid, as the paper's heatmaps) and sqrt scaling keep narrow,
            # low-mass modes visible; transpose so x runs left to right.
            ax.imshow(_smooth(hist).sqrt().t().numpy(), origin="lower", cmap="viridis",
                      extent=(-extent, extent, -extent, extent), interpolation="bilinear")
            if r == 0:
                ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    # Leave the title its own strip above the column labels.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
    # A 64-colour palette shrinks the noisy heatmaps about five-fold, with no visible change.
    save_figure(fig, path, dpi=80, colors=64)


# ------------------------------------------------------------------------------------------ matplotlib



def image_grid(images: Tensor, ncol: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] (or uint8) -> one [rows*(H+pad), ncol*(W+pad), 3] float array in [0, 1]."""
    if images.dtype == torch.uint8:
        images = from_uint8(images)
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + pad) - pad, ncol * (w + pad) - pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def save_figure(fig: Any, path: Path, dpi: int = 100, colors: Optional[int] = None) -> None:
    """Write ``fig`` as a PNG atomically and close it; ``colors``: quantise to that many palette colours."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    if colors is not None:
        from PIL import Image

        buffer.seek(0)
        small = io.BytesIO()
        Image.open(buffer).convert("RGB").quantize(colors=colors).save(small, format="PNG", optimize=True)
        buffer = small
    atomic_write_bytes(Path(path), buffer.getvalue())


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_samples_over_training(rows: Sequence[Tuple[str, Sequence[Tuple[int, Tensor]]]], path: Path,
                               max_cols: int = 8, per_cell: int = 16, title: str = "") -> None:
    """Fig. 3: one row per run (label, [(iteration, samples), ...]), evenly spaced snapshots as columns."""
    plt = pyplot()
    n_cols = max(1, min(max_cols, max(len(snaps) for _, snaps in rows)))
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.7 * n_cols, 1.8 * len(rows) + 0.4), squeeze=False)
    for r, (label, snaps) in enumerate(rows):
        picks = sorted({round(i * (len(snaps) - 1) / max(n_cols - 1, 1)) for i in range(n_cols)})
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
                continue
            step, images = snaps[picks[c]]
            ax.imshow(image_grid(images[:per_cell]), interpolation="nearest")
            ax.set_title(f"{step}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sample_panels(panels: Sequence[Tuple[str, Tensor]], path: Path, ncol: int = 4, title: str = "") -> None:
    """One panel of samples per model (Fig. 4, App. F.5), ``ncol`` panels a row."""
    plt = pyplot()
    nrow = math.ceil(len(panels) / ncol)
    ncol = min(ncol, len(panels))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.8 * nrow + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(panels):
            ax.axis("off")
            continue
        label, images = panels[i]
        ax.imshow(image_grid(images), interpolation="nearest")
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_loss_curves(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """D and G losses over training, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for record in records:
        curve = record.get("losses") or []
        steps = [p["step"] for p in curve]
        for ax, which in zip(axes, ("d_loss", "g_loss")):
            ax.plot(steps, [p[which] for p in curve], lw=0.8, label=record["run"])
    for ax, which in zip(axes, ("discriminator loss L_D", "generator loss (at the unrolled D)")):
        ax.set_title(which, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    axes[1].legend(fontsize=5, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
