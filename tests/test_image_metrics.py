"""Mode-count/KL arithmetic (Table 1), k-means colour recovery, KDE and JS divergence (Table 2), pairwise
distances (Sec. 3.4.2)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, special

from unroll_examples import image_metrics as im
from unroll_examples import mnist_data as md

# ------------------------------------------------------------------------------------- modes and KL


def test_all_samples_in_one_mode() -> None:
    labels = torch.full((256,), 417)
    assert im.modes_covered(labels) == 1
    assert im.kl_to_uniform(labels) == pytest.approx(math.log(1000))


def test_every_mode_once_is_uniform() -> None:
    labels = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert im.modes_covered(labels) == 1000
    assert im.kl_to_uniform(labels) == pytest.approx(0.0, abs=1e-12)


def test_uneven_histogram_by_hand() -> None:
    # counts 2, 1, 1 of 4 samples: p = 1/2, 1/4, 1/4 -> KL = 1/2 ln(500) + 2 * 1/4 ln(250).
    labels = torch.tensor([5, 5, 999, 0])
    stats_ = im.stacked_mode_stats(labels)
    assert stats_.modes == 3 and stats_.n_samples == 4
    assert stats_.kl == pytest.approx(0.5 * math.log(500) + 0.5 * math.log(250))
    # Two modes hit equally: KL = ln(1000 / 2).
    assert im.kl_to_uniform(torch.tensor([1, 2, 1, 2])) == pytest.approx(math.log(500))


def test_mode_counts_rejects_out_of_range_labels() -> None:
    assert im.mode_counts(torch.tensor([0, 9, 9]), n_modes=10).tolist() == [1] + [0] * 8 + [2]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\)"):
        im.modes_covered(torch.tensor([1000]))


# -------------------------------------------------------------------------------- foreground colours


def masked_images(colors: torch.Tensor, seed: int, noise_std: float = md.PIXEL_NOISE_STD) -> torch.Tensor:
    """Binary-stroke digits (random rectangles covering 10-25% of a 32x32 image) coloured by App. F's rule."""
    gen = torch.Generator().manual_seed(seed)
    n = colors.shape[0]
    masks = torch.zeros(n, 32, 32)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(10, 17, (2,), generator=gen))
        top, left = (int(v) for v in torch.randint(0, 32 - 16, (2,), generator=gen))
        masks[i, top:top + h, left:left + w] = 1.0
    noise = noise_std * torch.randn(n, 3, 32, 32, generator=gen)
    return md.colorize(masks, colors, noise)


def test_kmeans_recovers_the_colour_of_constructed_images() -> None:
    gen = torch.Generator().manual_seed(1)
    colors = torch.rand(200, 3, generator=gen) * 1.4 - 0.7  # inside (-1, 1): no clipping of the stroke colour
    recovered = im.foreground_colors(masked_images(colors, seed=2))
    error = (recovered - colors).abs()
    # ~100-250 stroke pixels with noise 0.2 each: the centroid is within a few hundredths of C.
    assert float(error.max()) < 0.1 and float(error.mean()) < 0.02


def test_kmeans_picks_the_smaller_cluster_even_for_dark_strokes() -> None:
    colors = torch.tensor([[-0.4, -0.5, -0.45], [0.9, 0.9, 0.9], [-0.9, 0.8, -0.9]])
    recovered = im.foreground_colors(masked_images(colors, seed=3, noise_std=0.05))
    torch.testing.assert_close(recovered, colors, atol=0.03, rtol=0)


def test_kmeans_on_real_colored_mnist_tracks_the_true_colour() -> None:
    colored = md.ColoredMNIST(digit_source(), size=32)
    images, colors = colored.sample(300, torch.Generator().manual_seed(4))
    recovered = im.foreground_colors(images)
    for channel in range(3):  # anti-aliased stroke edges pull the centroid towards -1, but linearly
        corr = np.corrcoef(recovered[:, channel].numpy(), colors[:, channel].clamp(-1, 1).numpy())[0, 1]
        assert corr > 0.95


def digit_source() -> md.MNIST:
    """The real test split if present, else synthetic 'digits' (a thick bar), so the test always runs."""
    try:
        return md.load_mnist("test", download=False)
    except md.DatasetError:
        images = torch.zeros(50, 28, 28, dtype=torch.uint8)
        images[:, 4:24, 11:17] = 255
        images[:, 4:24, 10] = 128  # an anti-aliased edge
        return md.MNIST(images=images, labels=torch.zeros(50, dtype=torch.long), split="test", folder=Path("."))


# ------------------------------------------------------------------------------------------ KDE and JS


def test_kde_logpdf_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(400, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.5, 0.1], [0.0, 0.0, 0.2]])
    kde = im.fit_kde(torch.from_numpy(points))
    queries = rng.normal(size=(3, 200)) * 1.5
    np.testing.assert_allclose(im.kde_logpdf(kde, queries, chunk=64), kde.logpdf(queries), atol=1e-4)


def test_monte_carlo_js_matches_integration_of_the_two_kdes() -> None:
    # In 1-D the JS divergence between the two fitted KDEs can be integrated numerically; the estimator must agree
    # up to its Monte Carlo error.
    gen = torch.Generator().manual_seed(0)
    p_points = torch.randn(500, 1, generator=gen, dtype=torch.float64)
    q_points = 0.6 * torch.randn(500, 1, generator=gen, dtype=torch.float64) + 1.0
    kde_p, kde_q = im.fit_kde(p_points), im.fit_kde(q_points)
    grid = np.linspace(-8.0, 8.0, 40_001)  # both densities are smooth on a scale of ~0.3: a dense grid is exact
    p, q = kde_p.pdf(grid), kde_q.pdf(grid)
    m = 0.5 * (p + q)
    exact = integrate.trapezoid(0.5 * (special.xlogy(p, p / m) + special.xlogy(q, q / m)), grid)  # 0 log 0 = 0
    assert exact == pytest.approx(0.2, abs=0.05)  # sanity of the reference itself
    assert im.js_divergence_kde(p_points, q_points, n_samples=20_000, seed=0) == pytest.approx(exact, abs=0.005)


def test_js_limits() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 3, generator=gen), torch.randn(2000, 3, generator=gen)
    # Same distribution: only the finite-sample (plug-in) bias remains, ~0.015 nats for 2,000 points in 3-D.
    assert im.js_divergence_kde(a, b, n_samples=2000) < 0.03
    assert im.js_divergence_kde(a, b + 20.0, n_samples=2000) == pytest.approx(math.log(2), abs=1e-3)
    assert im.js_divergence_kde(a, b, n_samples=2000, seed=3) == im.js_divergence_kde(a, b, n_samples=2000, seed=3)


def test_colour_js_sees_a_narrower_colour_distribution() -> None:
    gen = torch.Generator().manual_seed(5)
    data = masked_images(0.5 * torch.randn(400, 3, generator=gen), seed=6)
    same = masked_images(0.5 * torch.randn(400, 3, generator=gen), seed=7)
    collapsed = masked_images(0.2 * torch.randn(400, 3, generator=gen), seed=8)
    js_same = im.color_js_divergence(data, same, n_samples=2000)
    js_collapsed = im.color_js_divergence(data, collapsed, n_samples=2000)
    assert js_same < 0.05 and js_collapsed > 0.1


# --------------------------------------------------------------------------------- pairwise distances


def test_pairwise_distances_of_constructed_images() -> None:
    # Three images at known mutual distances: |a-b| = 3, |a-c| = 4, |b-c| = 5.
    images = torch.zeros(3, 1, 2, 2)
    images[1, 0, 0, 0] = 3.0
    images[2, 0, 1, 1] = 4.0
    distances = im.pairwise_l2_distances(images, 3000, torch.Generator().manual_seed(0))
    assert set(torch.round(distances).long().unique().tolist()) == {3, 4, 5}  # never an image with itself
    density, edges = im.distance_histogram(distances, bins=3, value_range=(2.5, 5.5))  # unit-wide bins
    assert float((density * np.diff(edges)).sum()) == pytest.approx(1.0)
    assert density == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.04)  # each pair equally likely


def test_collapsed_samples_have_shorter_pairwise_distances() -> None:
    gen = torch.Generator().manual_seed(2)
    spread, collapsed = torch.randn(500, 16, generator=gen), 0.3 * torch.randn(500, 16, generator=gen)
    d_spread = im.pairwise_l2_distances(spread, 2000, gen)
    d_collapsed = im.pairwise_l2_distances(collapsed, 2000, gen)
    assert float(d_collapsed.mean()) < 0.5 * float(d_spread.mean())
    # E|x - y| for x, y ~ N(0, I_16) is about sqrt(2 * 16).
    assert float(d_spread.mean()) == pytest.approx(math.sqrt(32), rel=0.05)
