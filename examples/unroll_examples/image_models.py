"""Generators and discriminators of the image experiments of Metz et al. (2017), App. C-F.

* App. C (Sec. 3.2): :class:`LSTMGenerator`, an LSTM that emits one 28-pixel column of an MNIST digit per step,
  written as an explicit cell (:class:`LSTMCell`) rather than ``nn.LSTM``: the fused cuDNN kernels have no double
  backward, which unrolling the discriminator needs on a GPU. The discriminator is :class:`ConvDiscriminator`
  with 16, 32, 32 channels.
* App. D (CIFAR-10), E (Stacked MNIST) and F (colored MNIST): :class:`ConvGenerator` (fully connected to 4x4,
  three stride-2 transposed convolutions to 32x32, a last convolution to the output channels) and
  :class:`ConvDiscriminator` (three stride-2 convolutions, a linear logit), with the channel counts of each
  appendix scaled by a size multiplier ``X``.

What the appendices leave open, and what is used here (listed in every script's output and in the docs):
3x3 kernels everywhere (App. D says so for its models; App. C gives none), padding 1, batch normalization
after every convolution and after the generator's first projection but not on the output layers, ``tanh`` on
the generator outputs (the data lie in [-1, 1]), biases dropped where a batch normalization follows, and
Xavier-uniform ("Glorot") weights with zero biases for every model (App. C states Xavier; it is also
TensorFlow's default, which the authors used).
"""

from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LATENT_DIM = 256
LEAK = 0.3  # App. C/D: leaky rectifiers with a 0.3 leak in the discriminators
KERNEL = 3

Size = Union[int, float, Fraction]

# Channel counts at X = 1.
RNN_D_CHANNELS = (16, 32, 32)  # App. C
CIFAR_G_CHANNELS = (512, 256, 128, 64)  # App. D; App. F at X = 1
CIFAR_D_CHANNELS = (64, 128, 256)
STACKED_G_CHANNELS = (64, 32, 16, 8)  # App. E (the generator has no size parameter)
STACKED_D_CHANNELS = (8, 16, 32)  # App. E, times X in {1/4, 1/2}


# ------------------------------------------------------------------------------------------------ helpers


def parse_size(text: Union[str, Size]) -> Fraction:
    """A size multiplier ``X`` from ``"1/4"``, ``"0.5"``, ``"1"`` or a number; must be > 0."""
    try:
        value = Fraction(str(text)).limit_denominator(1000)
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"size multiplier must be a number or a fraction like 1/4, got {text!r}") from exc
    if value <= 0:
        raise ValueError(f"size multiplier must be > 0, got {text!r}")
    return value


def size_label(x: Size) -> str:
    """``Fraction(1, 4)`` -> ``"1/4"``, ``1`` -> ``"1"``."""
    value = Fraction(x).limit_denominator(1000)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def scaled(channels: Sequence[int], x: Size) -> Tuple[int, ...]:
    """``round(c * X)`` channels (at least 1) per layer."""
    factor = Fraction(x).limit_denominator(1000)
    return tuple(max(1, round(c * factor)) for c in channels)


def _xavier_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv / linear layer of ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# ------------------------------------------------------------------------------------ LSTM (App. C)


class LSTMCell(nn.Module):
    """One LSTM step from plain differentiable ops, so it has a double backward on every device.

    Same parametrisation and gate order (input, forget, cell, output) as :class:`torch.nn.LSTMCell`, with one
    bias vector (``b_ih + b_hh`` there). ``input_size=0`` gives a cell driven by its state alone (no input
    weights). Weights are Xavier-uniform per gate block; the forget-gate bias starts at ``forget_bias`` (App. C:
    1), the other biases at 0.
    """

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0) -> None:
        super().__init__()
        if input_size < 0 or hidden_size < 1:
            raise ValueError(f"need input_size >= 0 and hidden_size >= 1, got {input_size}, {hidden_size}")
        self.input_size, self.hidden_size, self.forget_bias = input_size, hidden_size, forget_bias
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size)) if input_size else None
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.weight_ih, self.weight_hh):
            if weight is not None:
                for block in weight.data.chunk(4, dim=0):  # each gate is its own linear map
                    nn.init.xavier_uniform_(block)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size:2 * self.hidden_size].fill_(self.forget_bias)

    def forward(self, x: Optional[Tensor], state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """``(h', c')`` from input ``x`` [N, input_size] (``None`` when ``input_size == 0``) and ``(h, c)``."""
        h, c = state
        gates = F.linear(h, self.weight_hh, self.bias)
        if self.weight_ih is not None:
            if x is None:
                raise ValueError("this cell has inputs (input_size > 0); x must be given")
            gates = gates + F.linear(x, self.weight_ih)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class LSTMGenerator(nn.Module):
    """App. C: z -> 256-unit ReLU layer -> initial state of a 256-unit LSTM run for ``width`` steps; each step's
    output goes through a linear layer with ``height`` tanh outputs, one image column per step.

    The appendix does not say what the LSTM reads at each step nor how the 256-D vector fills the (h, c) state:
    here it has no per-step input, ``h_0`` is the ReLU layer's output and ``c_0 = 0``.
    """

    def __init__(self, latent_dim: int = LATENT_DIM, hidden: int = 256, height: int = 28, width: int = 28,
                 forget_bias: float = 1.0) -> None:
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent_dim, hidden)
        self.cell = LSTMCell(0, hidden, forget_bias)
        self.readout = nn.Linear(hidden, height)
        nn.init.xavier_uniform_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        nn.init.xavier_uniform_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, z: Tensor) -> Tensor:
        """Images [N, 1, height, width] in (-1, 1) from latents [N, latent_dim]."""
        h = torch.relu(self.project(z))
        c = torch.zeros_like(h)
        hiddens: List[Tensor] = []
        for _ in range(self.width):
            h, c = self.cell(None, (h, c))
            hiddens.append(h)
        columns = torch.tanh(self.readout(torch.stack(hiddens, dim=1)))  # [N, width, height]
        return columns.transpose(1, 2).unsqueeze(1)


# ------------------------------------------------------------------------------ convolutional models


class ConvDiscriminator(nn.Module):
    """Stride-2 3x3 convolutions, each followed by batch normalization and a leaky ReLU (leak 0.3), then a
    linear logit. Returns logits [N]."""

    def __init__(self, channels: Sequence[int], in_channels: int, image_size: int, leak: float = LEAK) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        size, previous = image_size, in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, KERNEL, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.LeakyReLU(leak)]
            size, previous = (size + 1) // 2, width
        self.features = nn.Sequential(*layers)
        self.logit = nn.Linear(previous * size * size, 1)
        _xavier_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(self.features(x).flatten(1)).squeeze(1)


class ConvGenerator(nn.Module):
    """z -> linear to ``channels[0]`` x 4 x 4 -> stride-2 3x3 transposed convolutions to ``channels[1:]``
    (4 -> 8 -> 16 -> 32) -> 3x3 convolution to ``out_channels`` -> tanh. Batch normalization and ReLU after
    every layer but the last."""

    def __init__(self, channels: Sequence[int], out_channels: int, latent_dim: int = LATENT_DIM,
                 start_size: int = 4) -> None:
        super().__init__()
        self.start = (channels[0], start_size, start_size)
        self.project = nn.Linear(latent_dim, channels[0] * start_size * start_size, bias=False)
        layers: List[nn.Module] = [nn.BatchNorm2d(channels[0]), nn.ReLU()]
        for previous, width in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(previous, width, KERNEL, stride=2, padding=1, output_padding=1,
                                          bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.Conv2d(channels[-1], out_channels, KERNEL, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        _xavier_(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(-1, *self.start))


# ------------------------------------------------------------------------------------- per appendix


def rnn_generator() -> LSTMGenerator:
    """App. C generator (28x28 MNIST, one column per LSTM step)."""
    return LSTMGenerator()


def rnn_discriminator() -> ConvDiscriminator:
    """App. C discriminator: convolutions with 16, 32, 32 outputs on 28x28 digits."""
    return ConvDiscriminator(RNN_D_CHANNELS, in_channels=1, image_size=28)


def stacked_generator() -> ConvGenerator:
    """App. E generator: 4x4x64 -> 32 -> 16 -> 8 -> 3 channels at 32x32."""
    return ConvGenerator(STACKED_G_CHANNELS, out_channels=3)


def stacked_discriminator(x: Size) -> ConvDiscriminator:
    """App. E discriminator with 8X, 16X, 32X channels (the paper uses X = 1/4 and 1/2)."""
    return ConvDiscriminator(scaled(STACKED_D_CHANNELS, x), in_channels=3, image_size=32)


def cifar_generator(x: Size = 1, out_channels: int = 3) -> ConvGenerator:
    """App. D generator (X = 1), and App. F's with 512X, 256X, 128X, 64X channels."""
    return ConvGenerator(scaled(CIFAR_G_CHANNELS, x), out_channels=out_channels)


def cifar_discriminator(x: Size = 1, in_channels: int = 3) -> ConvDiscriminator:
    """App. D discriminator (X = 1), and App. F's with 64X, 128X, 256X channels."""
    return ConvDiscriminator(scaled(CIFAR_D_CHANNELS, x), in_channels=in_channels, image_size=32)
