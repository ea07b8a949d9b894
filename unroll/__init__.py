"""unroll: pure, differentiable optimizer steps and unrolled surrogate losses for PyTorch.

>>> import unroll
>>> opt = unroll.adam(1e-4, betas=(0.5, 0.999), maximize=False)
>>> surrogate = unroll.surrogate_loss(d_loss, K=5, optimizer=opt)     # doctest: +SKIP
>>> g_loss = surrogate(d_params, opt.init(d_params), g_params, real, z)  # doctest: +SKIP

The generator's gradient of ``g_loss`` has both terms of Eq. 12 of Metz, Poole, Pfau & Sohl-Dickstein,
"Unrolled Generative Adversarial Networks" (ICLR 2017).
"""

from .adam import adam
from .custom import custom_optimizer
from .interop import from_torch, to_torch
from .optimizer import Optimizer
from .param_groups import param_groups
from .rmsprop import rmsprop
from .sgd import sgd
from .unrolled import NonFiniteLossError, surrogate_loss, unrolled_params
from ._types import Grads, Params, State

__version__ = "0.1.0"

__all__ = [
    "Grads",
    "NonFiniteLossError",
    "Optimizer",
    "Params",
    "State",
    "adam",
    "custom_optimizer",
    "from_torch",
    "param_groups",
    "rmsprop",
    "sgd",
    "surrogate_loss",
    "to_torch",
    "unrolled_params",
]
