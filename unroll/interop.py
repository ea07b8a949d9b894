"""Mirror a :mod:`torch.optim` optimizer and its current state as a pure :class:`~unroll.Optimizer`."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from .adagrad import adagrad
from .adam import adam
from .adamax import adamax
from .adamw import adamw
from .nadam import nadam
from .optimizer import Optimizer, _step_dtype
from .radam import radam
from .rmsprop import rmsprop
from .sgd import sgd
from ._types import State

# torch.optim group options that change only how the update is computed, not its result.
_IMPLEMENTATION_OPTIONS = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr"}


def _sgd_from_group(group: Dict[str, Any]) -> Optimizer:
    return sgd(group["lr"], momentum=group["momentum"], dampening=group["dampening"],
               weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])


def _adam_from_group(group: Dict[str, Any]) -> Optimizer:
    return adam(group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"], maximize=group["maximize"],
                decoupled_weight_decay=group.get("decoupled_weight_decay", False))


def _adamw_from_group(group: Dict[str, Any]) -> Optimizer:
    return adamw(group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                 amsgrad=group["amsgrad"], maximize=group["maximize"])


def _rmsprop_from_group(group: Dict[str, Any]) -> Optimizer:
    return rmsprop(group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                   momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"])


def _adagrad_from_group(group: Dict[str, Any]) -> Optimizer:
    # initial_accumulator_value only shapes a fresh state; from_torch copies torch.optim's `sum` itself.
    return adagrad(group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                   initial_accumulator_value=group["initial_accumulator_value"], eps=group["eps"],
                   maximize=group["maximize"])


def _adamax_from_group(group: Dict[str, Any]) -> Optimizer:
    return adamax(group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                  maximize=group["maximize"])


def _nadam_from_group(group: Dict[str, Any]) -> Optimizer:
    return nadam(group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                 momentum_decay=group["momentum_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                 maximize=group["maximize"])


def _radam_from_group(group: Dict[str, Any]) -> Optimizer:
    return radam(group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                 decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"])


_CONVERTERS: Dict[type, Callable[[Dict[str, Any]], Optimizer]] = {
    torch.optim.SGD: _sgd_from_group,
    torch.optim.Adam: _adam_from_group,
    torch.optim.AdamW: _adamw_from_group,
    torch.optim.RMSprop: _rmsprop_from_group,
    torch.optim.Adagrad: _adagrad_from_group,
    torch.optim.Adamax: _adamax_from_group,
    torch.optim.NAdam: _nadam_from_group,
    torch.optim.RAdam: _radam_from_group,
}


def from_torch(torch_optimizer: torch.optim.Optimizer, module: nn.Module) -> Tuple[Optimizer, State]:
    """Return ``(optimizer, state)`` mirroring ``torch_optimizer`` (SGD, Adam or RMSprop) over ``module``'s parameters.

    The state is keyed by ``module.named_parameters()`` names and holds copies of torch.optim's buffers and step
    count, so ``optimizer.step`` continues exactly where ``torch_optimizer`` stands, e.g. to unroll the
    discriminator from its current Adam state (Metz et al., 2017, Sec. 2.2). Nothing is mutated or aliased.

    Raises ``TypeError`` for other optimizer classes and ``ValueError`` for what a single pure optimizer cannot
    represent: param groups with different hyperparameters, parameters that are not the module's (or module
    parameters the optimizer does not hold), parameters at different step counts, AdamW-style weight decay.
    """
    converter = _CONVERTERS.get(type(torch_optimizer))
    if converter is None:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in _CONVERTERS)
        raise TypeError(f"from_torch supports {supported}; got {type(torch_optimizer).__module__}."
                        f"{type(torch_optimizer).__qualname__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch needs the nn.Module whose parameters the optimizer holds, "
                        f"got {type(module).__name__}")
    groups = torch_optimizer.param_groups
    hyperparams = [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_OPTIONS} for g in groups]
    for i, other in enumerate(hyperparams[1:], start=1):
        if not _same_hyperparams(hyperparams[0], other):
            diff = sorted(k for k in set(hyperparams[0]) | set(other)
                          if not _same_value(hyperparams[0].get(k), other.get(k)))
            raise ValueError(f"from_torch: param group {i} differs from group 0 in {diff}; a pure optimizer has one "
                             f"set of hyperparameters (unroll each group separately)")
    optimizer = converter(groups[0])
    names = _parameter_names(torch_optimizer, module)
    return optimizer, _state_from_torch(torch_optimizer, optimizer, names)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _same_hyperparams(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)


def _parameter_names(torch_optimizer: torch.optim.Optimizer, module: nn.Module) -> List[Tuple[str, Tensor]]:
    by_id = {id(p): name for name, p in module.named_parameters()}
    held: List[Tuple[str, Tensor]] = []
    for group in torch_optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"from_torch: the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                                 f"a parameter of the given module")
            held.append((by_id[id(p)], p))
    missing = sorted(set(by_id.values()) - {name for name, _ in held})
    if missing:
        raise ValueError(f"from_torch: module parameters {missing} are not held by the optimizer; pass only the "
                         f"parameters it optimises")
    return held


def _state_from_torch(torch_optimizer: torch.optim.Optimizer, optimizer: Optimizer,
                      held: List[Tuple[str, Tensor]]) -> State:
    params = {name: p.detach() for name, p in held}
    state = optimizer.init(params)
    per_param = [torch_optimizer.state.get(p, {}) for _, p in held]
    steps = {_torch_step(s) for s in per_param}
    if len(steps) > 1:
        raise ValueError(f"from_torch: parameters are at different step counts {sorted(steps)} (some had no "
                         f"gradient on some steps); a pure optimizer keeps one step count")
    step = steps.pop()
    state["step"] = torch.tensor(float(step), dtype=_step_dtype(), device=state["step"].device)
    for (name, _), torch_state in zip(held, per_param):
        for buffer in optimizer.buffers:
            value = torch_state.get(buffer)
            if value is not None:
                state[buffer][name] = value.detach().clone()
    return state


def _torch_step(param_state: Dict[str, Any]) -> int:
    if "step" in param_state:
        step = param_state["step"]
        return int(step.item()) if isinstance(step, Tensor) else int(step)
    # torch.optim.SGD keeps no step count; its momentum buffer exists once a step was taken, and our SGD only
    # needs to know whether this is the first step.
    return 0 if param_state.get("momentum_buffer") is None else 1
