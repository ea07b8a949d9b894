"""unroll: pure, differentiable optimizer steps and unrolled surrogate losses for PyTorch.

>>> import unroll
>>> opt = unroll.adam(1e-4, betas=(0.5, 0.999), maximize=False)
>>> surrogate = unroll.surrogate_loss(d_loss, K=5, optimizer=opt)     # doctest: +SKIP
>>> g_loss = surrogate(d_params, opt.init(d_params), g_params, real, z)  # doctest: +SKIP

The generator's gradient of ``g_loss`` has both terms of Eq. 12 of Metz, Poole, Pfau & Sohl-Dickstein,
"Unrolled Generative Adversarial Networks" (ICLR 2017).
"""

from . import distributed
from ._engine import NonFiniteLossError
from ._types import Grads, Params, State
from .adagrad import adagrad
from .adam import adam
from .adamax import adamax
from .adamw import adamw
from .custom import custom_optimizer
from .evolution import PES, PESState, es_gradient, pes
from .extrapolated import extrapolated_surrogate_loss
from .game import unrolled_game
from .implicit import ImplicitInfo, implicit_loss
from .interop import from_torch, to_torch
from .nadam import nadam
from .optimizer import Optimizer
from .param_groups import param_groups
from .radam import radam
from .rmsprop import rmsprop
from .sgd import sgd
from .unrolled import surrogate_loss, train_step, unrolled_params

__version__ = "0.3.0"

# Public classes read as ``unroll.X`` in reprs and tracebacks, not as the private module that defines them.
for _public in (ImplicitInfo, NonFiniteLossError, Optimizer, PES, PESState):
    _public.__module__ = __name__
del _public

__all__ = [
    "Grads",
    "ImplicitInfo",
    "NonFiniteLossError",
    "Optimizer",
    "PES",
    "PESState",
    "Params",
    "State",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "custom_optimizer",
    "distributed",
    "es_gradient",
    "extrapolated_surrogate_loss",
    "from_torch",
    "implicit_loss",
    "nadam",
    "param_groups",
    "pes",
    "radam",
    "rmsprop",
    "sgd",
    "surrogate_loss",
    "to_torch",
    "train_step",
    "unrolled_game",
    "unrolled_params",
]
