"""Metrics and datasets of examples/gan on distributions whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from unroll_examples.data import DATASETS, make_mixture, mode_weights, ring_centers
from unroll_examples.metrics import all_metrics, energy_distance, mode_metrics, reverse_kl

# P(|N(0, I_2)| <= 3) = 1 - exp(-9/2): the HQ fraction of exact samples of an isotropic 2-D Gaussian.
HQ_EXACT = 1 - math.exp(-4.5)


def test_paper_ring_has_eight_distinct_equally_spaced_modes() -> None:
    m = make_mixture("ring")
    assert m.n_modes == 8 and m.std == 0.02
    assert torch.allclose(m.centers.norm(dim=1), torch.full((8,), 2.0))
    distances = torch.cdist(m.centers, m.centers) + torch.eye(8) * 100
    # Neighbours are 2 r sin(pi / 8) apart; with the end point included two centres would coincide.
    assert distances.min().item() == pytest.approx(2 * 2.0 * math.sin(math.pi / 8), rel=1e-5)
    assert len({tuple(c) for c in m.centers.mul(1e4).round().tolist()}) == 8


def test_veegan_ring_and_grid_geometry() -> None:
    ring = make_mixture("ring-veegan")
    assert ring.std == 0.01 and torch.allclose(ring.centers, ring_centers(8, 1.0))
    grid = make_mixture("grid")
    assert grid.n_modes == 25 and grid.std == 0.05
    assert sorted(set(grid.centers[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert len({tuple(c) for c in grid.centers.tolist()}) == 25


@pytest.mark.parametrize("name", DATASETS)
def test_exact_samples_score_as_the_data(name: str) -> None:
    m = make_mixture(name)
    gen = torch.Generator().manual_seed(0)
    samples, reference = m.sample(10_000, gen), m.sample(2_000, gen)
    metrics = all_metrics(samples, reference, m.centers, m.std, m.weights)
    assert metrics["hq"] == pytest.approx(HQ_EXACT, abs=0.006)
    assert metrics["modes"] == m.n_modes and metrics["modes_strict"] == m.n_modes
    assert metrics["reverse_kl"] < 0.01
    # Sampling noise only: small next to the distance of a generator collapsed onto one mode.
    collapsed = m.centers[0] + m.std * torch.randn(2_000, 2, generator=gen)
    assert abs(metrics["energy"]) < 0.02 * energy_distance(collapsed, reference)


@pytest.mark.parametrize("weight_std", [0.0, 0.05])
def test_all_mass_on_one_mode(weight_std: float) -> None:
    m = make_mixture("ring", weight_std=weight_std, weight_seed=3)
    mode = 5
    gen = torch.Generator().manual_seed(1)
    samples = m.centers[mode] + m.std * torch.randn(4000, 2, generator=gen)
    metrics = mode_metrics(samples, m.centers, m.std, m.weights)
    assert metrics["modes"] == 1 and metrics["modes_strict"] == 1
    # KL(delta_i || p) = log(1 / p_i), computed by hand.
    assert metrics["reverse_kl"] == pytest.approx(-math.log(float(m.weights[mode])), rel=1e-6)
    if weight_std == 0.0:
        assert metrics["reverse_kl"] == pytest.approx(math.log(8), rel=1e-6)


def test_far_samples_are_not_high_quality_and_cover_nothing() -> None:
    m = make_mixture("ring")
    samples = torch.zeros(1000, 2)  # the ring's centre: 2 (= 100 std) from every mode
    metrics = mode_metrics(samples, m.centers, m.std, m.weights)
    assert metrics["hq"] == 0.0 and metrics["modes"] == 0 and metrics["modes_strict"] == 0


def test_strict_count_needs_one_percent_of_the_expected_samples() -> None:
    m = make_mixture("ring")
    n = 10_000
    # mode 0 gets 12 samples (< 1% of the expected 1250), mode 1 gets 13 (>= 12.5), the rest mode 2.
    counts = [12, 13, n - 25]
    samples = torch.cat([m.centers[i].expand(c, 2) for i, c in enumerate(counts)])
    metrics = mode_metrics(samples, m.centers, m.std, m.weights)
    assert metrics["modes"] == 3 and metrics["modes_strict"] == 2


def test_reverse_kl_by_hand() -> None:
    q, p = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.5, 0.25, 0.25])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.25)
    assert reverse_kl(q, p) == pytest.approx(expected, rel=1e-12)


def test_energy_distance_separates_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 2, generator=gen), torch.randn(1500, 2, generator=gen)
    shifted = y + torch.tensor([1.0, 0.0])
    assert abs(energy_distance(x, y)) < 0.02
    assert energy_distance(x, shifted) > 0.3
    assert energy_distance(x, shifted) == pytest.approx(energy_distance(shifted, x), rel=1e-9)


def test_mode_weights() -> None:
    assert torch.equal(mode_weights(8), torch.full((8,), 1 / 8))
    w = mode_weights(8, 0.05, seed=2)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and (w > 0).all() and w.std() > 0.01
    assert torch.equal(w, mode_weights(8, 0.05, seed=2)) and not torch.equal(w, mode_weights(8, 0.05, seed=3))
    with pytest.raises(ValueError):
        mode_weights(8, -0.1)


def test_nonfinite_samples_count_as_nothing() -> None:
    m = make_mixture("ring")
    samples = torch.full((100, 2), float("nan"))
    metrics = mode_metrics(samples, m.centers, m.std, m.weights)
    assert metrics["modes"] == 0 and metrics["hq"] == 0.0 and math.isnan(metrics["reverse_kl"])
