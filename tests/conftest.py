"""Shared fixtures for the unroll test suite.

Helpers are exposed as fixtures returning functions (rather than imported from this module) so that test files
work whether or not ``tests/`` is a package.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import pytest
import torch
from torch import Tensor

MlpParams = Callable[..., Dict[str, Tensor]]
MlpForward = Callable[..., Tensor]
RandomGrads = Callable[..., List[Dict[str, Tensor]]]


def _mlp_params(sizes: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float64) -> Dict[str, Tensor]:
    """``{"w0", "b0", "w1", "b1", ...}`` for an MLP with layer widths ``sizes``, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    params: Dict[str, Tensor] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        # Scaled so activations stay O(1) and finite differences stay well conditioned.
        params[f"w{i}"] = (torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) / fan_in ** 0.5).to(dtype)
        params[f"b{i}"] = (0.1 * torch.randn(fan_out, generator=gen, dtype=torch.float64)).to(dtype)
    return params


def _mlp_forward(params: Mapping[str, Tensor], x: Tensor,
                 activation: Callable[[Tensor], Tensor] = torch.tanh) -> Tensor:
    """MLP on the ``w{i}``/``b{i}`` entries of ``params`` (other entries, e.g. buffers, are ignored)."""
    n_layers = sum(1 for name in params if name.startswith("w") and name[1:].isdigit())
    for i in range(n_layers):
        x = torch.nn.functional.linear(x, params[f"w{i}"], params[f"b{i}"])
        if i < n_layers - 1:
            x = activation(x)
    return x


def _random_grads(params: Mapping[str, Tensor], steps: int, seed: int = 0,
                  zero_fraction: float = 0.2) -> List[Dict[str, Tensor]]:
    """``steps`` dicts of random gradients shaped like ``params``, with about ``zero_fraction`` of the entries
    exactly zero (as from dead ReLUs); the first entry of every tensor is zero at every step."""
    gen = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = {}
        for name, p in params.items():
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            g = torch.where(torch.rand(p.shape, generator=gen, dtype=torch.float64) < zero_fraction, 0.0, g)
            # An entry that never gets a gradient keeps Adam's/RMSProp's second moment exactly at zero.
            g.view(-1)[:1] = 0.0
            grads[name] = g.to(p.dtype)
        sequence.append(grads)
    return sequence


@pytest.fixture
def random_grads() -> RandomGrads:
    """Factory: ``random_grads(params, steps, seed=0, zero_fraction=0.2) -> [grads_step_0, ...]``."""
    return _random_grads


@pytest.fixture
def mlp_params() -> MlpParams:
    """Factory: ``mlp_params(sizes, seed=0, dtype=torch.float64) -> dict`` of small MLP parameters."""
    return _mlp_params


@pytest.fixture
def mlp_forward() -> MlpForward:
    """``mlp_forward(params, x, activation=torch.tanh)``: the MLP matching :func:`mlp_params`."""
    return _mlp_forward


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one thread (training tests: the machine is shared), restoring the setting for the tests after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
