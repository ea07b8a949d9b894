"""Generator and discriminator of Metz et al. (2017), App. A, as pure functions of parameter dicts.

Pure functions (rather than ``nn.Module``) make the per-seed parameters trivially stackable for
``torch.func.vmap``; weights are stored ``[in, out]`` so a layer is ``x @ w + b``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Params = Dict[str, Tensor]

LATENT_DIM = 256
HIDDEN = 128
INIT_GAIN = 0.8
D_INPUT_SCALE = 0.25  # App. A: the discriminator scales its input down by 4, to roughly (-1, 1)

ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}
D_INITS = ("orthogonal", "pytorch")
"""The discriminator's initialisations (App. A leaves it open): G's orthogonal gain-0.8 init, or that of
``torch.nn.Linear`` (weights and biases uniform in ±1/√fan_in)."""


def _mlp_init(sizes: Sequence[int], generator: torch.Generator, gain: float) -> Params:
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = torch.empty(fan_out, fan_in)
        torch.nn.init.orthogonal_(weight, gain=gain, generator=generator)
        params[f"w{i}"] = weight.t().contiguous()
        params[f"b{i}"] = torch.zeros(fan_out)
    return params


def _linear_default_init(sizes: Sequence[int], generator: torch.Generator) -> Params:
    # torch.nn.Linear.reset_parameters, draw for draw: kaiming_uniform_(a=√5) is U(±1/√fan_in), then the bias.
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight, bias = torch.empty(fan_out, fan_in), torch.empty(fan_out)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.uniform_(bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
        params[f"w{i}"], params[f"b{i}"] = weight.t().contiguous(), bias
    return params


def init_generator(generator: torch.Generator, latent_dim: int = LATENT_DIM, hidden: int = HIDDEN,
                   gain: float = INIT_GAIN) -> Params:
    """z in R^latent -> hidden -> hidden -> 2, orthogonal weights scaled by ``gain``, zero biases."""
    return _mlp_init((latent_dim, hidden, hidden, 2), generator, gain)


def init_discriminator(generator: torch.Generator, hidden: int = HIDDEN, gain: float = INIT_GAIN,
                       init: str = "orthogonal") -> Params:
    """2 -> hidden -> 1 logit. App. A gives no init for D: ``"orthogonal"`` uses G's (orthogonal, scaled by
    ``gain``, zero biases), ``"pytorch"`` that of ``torch.nn.Linear`` (``gain`` unused); :data:`D_INITS`."""
    if init not in D_INITS:
        raise ValueError(f"init must be one of {', '.join(D_INITS)}, got {init!r}")
    sizes = (2, hidden, 1)
    return _mlp_init(sizes, generator, gain) if init == "orthogonal" else _linear_default_init(sizes, generator)


def generator_forward(params: Params, z: Tensor, activation: str = "relu") -> Tensor:
    """Samples [..., 2] from latents [..., latent]."""
    act = ACTIVATIONS[activation]
    h = act(z @ params["w0"] + params["b0"])
    h = act(h @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def discriminator_forward(params: Params, x: Tensor) -> Tensor:
    """Logits [...] of D(x) = sigmoid(logit) for points [..., 2]."""
    h = torch.relu((D_INPUT_SCALE * x) @ params["w0"] + params["b0"])
    return (h @ params["w1"] + params["b1"]).squeeze(-1)


def d_loss_from_logits(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D = -log D(x) - log(1 - D(G(z))), batch means; softplus keeps it finite for large logits."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """-log D(G(z)), the non-saturating generator loss of Goodfellow et al. (2014)."""
    return F.softplus(-fake_logits).mean()
