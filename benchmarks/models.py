"""The two GANs the benchmark unrolls: the 2-D mixture of App. A and a small conv GAN on 28x28 images (App. D/E).

Both are built deterministically from a seed. The mixture GAN is App. A's networks and ring data as the
experiments define them (:mod:`unroll_examples.models`, :mod:`unroll_examples.data`), wrapped in modules so that
torch.optim, higher and torchopt can step them. The conv GAN's images are synthetic: the cost of a gradient does
not depend on the pixel values, and the suite must run offline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unroll_examples.data import make_mixture
from unroll_examples.models import (
    LATENT_DIM,
    discriminator_forward,
    generator_forward,
    init_discriminator,
    init_generator,
)

MODELS = ("mixture", "conv")

# Adam betas of the paper (App. A, C, D): beta1 = 0.5.
BETAS = (0.5, 0.999)
# Conv model sizes (stated in docs/benchmarks.md). App. D's discriminator has 64/128/256 channels; App. F scales it
# by X in {1/4, 1/2, 1}. We use X = 1/4 so that the full suite (4 methods, K up to 20, 2 thread counts) runs in
# minutes on a laptop CPU. The generator is App. E's (4*4*64 -> 32 -> 16 -> 8 -> 1 channel), with transposed
# convolutions sized 4 -> 7 -> 14 -> 28 to produce 28x28 images.
CONV_D_CHANNELS = (16, 32, 64)
CONV_G_CHANNELS = (64, 32, 16, 8)
CONV_BATCH = 64
MIXTURE_BATCH = 512
NOISE_DIM = 256


@dataclass
class Problem:
    """Everything one unrolled generator gradient needs; every method computes it from these same objects."""

    name: str
    generator: nn.Module
    discriminator: nn.Module
    real: Tensor
    noise: Tensor
    lr: float
    d_optimizer: torch.optim.Adam
    """The discriminator's Adam, holding its state (see :func:`steady_adam`); never stepped by the benchmark."""

    def describe(self) -> str:
        g = sum(p.numel() for p in self.generator.parameters())
        d = sum(p.numel() for p in self.discriminator.parameters())
        return f"{self.name}: G {g:,} params, D {d:,} params, batch {self.real.shape[0]}"


def d_loss(disc: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss L_D = -log D(x) - log(1 - D(G(z))) of App. A, from logits (softplus form)."""
    return F.softplus(-disc(real)).mean() + F.softplus(disc(fake)).mean()


class ParameterDictModule(nn.Module):
    """A module whose parameters are the tensors of a parameter dict, registered under the dict's names.

    ``forward`` passes them back as a dict (:meth:`params`) to a pure function of :mod:`unroll_examples.models`.
    Reading each one by attribute is what lets higher's patched copies, torchopt's rebound parameters and
    ``torch.func.functional_call`` substitute their own tensors.
    """

    def __init__(self, params: Dict[str, Tensor]) -> None:
        super().__init__()
        self.names = tuple(params)
        for name, tensor in params.items():
            self.register_parameter(name, nn.Parameter(tensor))

    def params(self) -> Dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.names}


class MixtureGenerator(ParameterDictModule):
    """App. A's generator (:func:`unroll_examples.models.generator_forward`): 256 -> 128 -> 128 -> 2, ReLU,
    orthogonal weights scaled by 0.8 drawn from ``generator``."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__(init_generator(generator))

    def forward(self, z: Tensor) -> Tensor:
        return generator_forward(self.params(), z)


class MixtureDiscriminator(ParameterDictModule):
    """App. A's discriminator (:func:`unroll_examples.models.discriminator_forward`): x / 4 -> 128 ReLU -> 1 logit,
    orthogonal weights scaled by 0.8 drawn from ``generator``."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__(init_discriminator(generator))

    def forward(self, x: Tensor) -> Tensor:
        return discriminator_forward(self.params(), x)


RING = make_mixture("ring")  # App. A's data: 8 Gaussians (std 0.02) evenly spaced on a circle of radius 2


class ConvGenerator(nn.Module):
    """App. E's generator for 1-channel 28x28 images: FC 4*4*64, TConv 32/16/8 (stride 2), Conv 1, BN + ReLU."""

    def __init__(self, channels: Tuple[int, ...] = CONV_G_CHANNELS) -> None:
        super().__init__()
        c0 = channels[0]
        self.fc = nn.Sequential(nn.Linear(NOISE_DIM, 4 * 4 * c0, bias=False),
                                nn.BatchNorm1d(4 * 4 * c0, track_running_stats=False), nn.ReLU())
        layers = []
        # output_padding 0, 1, 1 gives 4 -> 7 -> 14 -> 28 with 3x3 kernels, stride 2, padding 1.
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=0 if i == 0 else 1,
                                          bias=False),
                       nn.BatchNorm2d(c_out, track_running_stats=False), nn.ReLU()]
        layers += [nn.Conv2d(channels[-1], 1, 3, padding=1), nn.Tanh()]
        self.convs = nn.Sequential(*layers)
        self.c0 = c0

    def forward(self, z: Tensor) -> Tensor:
        return self.convs(self.fc(z).view(-1, self.c0, 4, 4))


class ConvDiscriminator(nn.Module):
    """App. D's discriminator at width X = 1/4: Conv 16/32/64 (3x3, stride 2, BN, leaky ReLU 0.3), FC 1."""

    def __init__(self, channels: Tuple[int, ...] = CONV_D_CHANNELS) -> None:
        super().__init__()
        layers = []
        for c_in, c_out in zip((1,) + channels[:-1], channels):
            # No bias before BN: BN removes it, so its gradient is pure rounding noise, which the unrolled Adam
            # amplifies by ~lr/eps in the meta-gradient and the methods would then disagree on noise. Batch
            # statistics only (no running buffers), so every method sees a parameters-only module.
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.3)]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(channels[-1] * 4 * 4, 1)  # 28 -> 14 -> 7 -> 4

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x).flatten(1))


STEADY_STEP = 10_000
STEADY_BATCHES = 8


def steady_adam(G: nn.Module, D: nn.Module, lr: float, batch: Callable[[], Tuple[Tensor, Tensor]]) -> torch.optim.Adam:
    """A torch.optim.Adam over ``D`` in a late-training state: step 10 000, moments from 8 minibatch gradients.

    ``exp_avg`` and ``exp_avg_sq`` are the mean gradient and mean squared gradient over the minibatches, the
    stationary values of Adam's running averages. Starting from the zero state instead makes the benchmark
    meaningless as a check: at step 1 the update is lr * g / (|g| + eps), whose derivative ~ lr / eps for
    |g| << eps lets the few entries whose gradient happens to be ~1e-8 dominate the meta-gradient, and the
    methods then agree only on rounding noise. A late step also makes higher's Adam, which adds eps before
    the sqrt(1 - beta2^t) bias correction, coincide with torch.optim's.
    """
    params = list(D.parameters())
    total = [torch.zeros_like(p) for p in params]
    total_sq = [torch.zeros_like(p) for p in params]
    for _ in range(STEADY_BATCHES):
        real, noise = batch()
        with torch.no_grad():
            fake = G(noise)
        grads = torch.autograd.grad(d_loss(D, real, fake), params)
        for t, t_sq, g in zip(total, total_sq, grads):
            t += g / STEADY_BATCHES
            t_sq += g * g / STEADY_BATCHES
    opt = torch.optim.Adam(params, lr=lr, betas=BETAS)
    for p, m, v in zip(params, total, total_sq):
        opt.state[p] = {"step": torch.tensor(float(STEADY_STEP)), "exp_avg": m, "exp_avg_sq": v}
    return opt


def make_problem(name: str, seed: int = 0, device: str = "cpu") -> Problem:
    """Build the named problem ("mixture" or "conv") with deterministic weights, data, noise and D state.

    Everything is built on the CPU (the same numbers for every device), then moved to ``device``.
    """
    torch.manual_seed(seed)
    data_rng = torch.Generator().manual_seed(seed + 1)
    G: nn.Module
    D: nn.Module
    if name == "mixture":
        weights_rng = torch.Generator().manual_seed(seed)
        G, D, lr = MixtureGenerator(weights_rng), MixtureDiscriminator(weights_rng), 1e-4

        def batch() -> Tuple[Tensor, Tensor]:
            return RING.sample(MIXTURE_BATCH, data_rng), torch.randn(MIXTURE_BATCH, LATENT_DIM, generator=data_rng)
    elif name == "conv":
        G, D, lr = ConvGenerator(), ConvDiscriminator(), 2e-4  # App. D: discriminator learning rate 2e-4

        def batch() -> Tuple[Tensor, Tensor]:
            # Synthetic images in [-1, 1], the range of App. C/D's scaled MNIST.
            return (torch.rand(CONV_BATCH, 1, 28, 28, generator=data_rng) * 2 - 1,
                    torch.randn(CONV_BATCH, NOISE_DIM, generator=data_rng))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    real, noise = batch()
    problem = Problem(name, G, D, real, noise, lr, steady_adam(G, D, lr, batch))
    return problem if torch.device(device) == torch.device("cpu") else to_device(problem, device)


def to_device(problem: Problem, device: str) -> Problem:
    """``problem`` with models, data and the Adam state on ``device`` (the modules and the optimizer move in place)."""
    # Module.to keeps the Parameter objects (it replaces their .data), so the optimizer's state keys stay valid;
    # load_state_dict moves the state to its parameters' device by torch.optim's own rule (the step count stays).
    problem.generator.to(device)
    problem.discriminator.to(device)
    problem.d_optimizer.load_state_dict(problem.d_optimizer.state_dict())
    return replace(problem, real=problem.real.to(device), noise=problem.noise.to(device))
