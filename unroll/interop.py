"""Round trips with :mod:`torch.optim`: mirror an optimizer and its state (``from_torch``), write them back
(``to_torch``)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, cast

import torch
from torch import Tensor, nn

from ._checks import check_same_keys, check_shapes, check_tensor_mapping
from ._types import Params, State
from .adagrad import adagrad
from .adam import adam
from .adamax import adamax
from .adamw import adamw
from .nadam import nadam
from .optimizer import Optimizer, step_dtype
from .param_groups import ParamGroups, param_groups
from .radam import radam
from .rmsprop import rmsprop
from .sgd import sgd

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
    """Return ``(optimizer, state)`` mirroring ``torch_optimizer`` over ``module``'s parameters.

    The state is keyed by ``module.named_parameters()`` names and holds copies of torch.optim's buffers and step
    count, so ``optimizer.step`` continues exactly where ``torch_optimizer`` stands, e.g. to unroll the
    discriminator from its current Adam state (Metz et al., 2017, Sec. 2.2). Nothing is mutated or aliased.
    Param groups with different hyperparameters (e.g. two learning rates) give a :func:`~unroll.param_groups`
    optimizer with one member per group; groups that differ in nothing give one plain optimizer.

    Raises ``TypeError`` for optimizer classes without a pure mirror and ``ValueError`` for what the pure
    state cannot represent: parameters that are not the module's (or module parameters the optimizer does not
    hold), parameters at different step counts, AdamW-style weight decay in Adam.
    """
    held = _held_parameters(torch_optimizer, module, "from_torch")
    optimizer = _mirror(torch_optimizer, held)
    return optimizer, _state_from_torch(torch_optimizer, optimizer, held)


def to_torch(optimizer: Optimizer, state: State, torch_optimizer: torch.optim.Optimizer, module: nn.Module,
             params: Optional[Params] = None) -> None:
    """Write ``state`` (every buffer and the step count) back into ``torch_optimizer.state``; the inverse of
    :func:`from_torch`.

    ``from_torch`` -> steps of ``optimizer.step`` -> ``to_torch`` -> ``torch_optimizer.step()`` continues as if
    every step had been taken by ``torch_optimizer``. Entries follow torch.optim's conventions: buffers in each
    parameter's dtype and device (as ``load_state_dict`` casts them), the step count as the tensor torch.optim
    keeps (e.g. float32 on the CPU for Adam), no entry at all for SGD before its first step. Tensors are copied
    and detached, never aliased.

    Module parameters are left untouched unless ``params`` is given (e.g. the unrolled ``theta^K``): then they
    are copied into ``module``'s parameters in place, without recording gradients.

    Refuses, before changing anything: another optimizer class or other hyperparameters than
    ``torch_optimizer``'s param groups (``TypeError``/``ValueError``), a state or ``params`` whose names or
    shapes are not the module's (``KeyError``/``ValueError``), a step count that is not a whole number.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"to_torch: optimizer must be an unroll optimizer (from from_torch, unroll.adam, ...), got "
                        f"{type(optimizer).__name__}")
    held = _held_parameters(torch_optimizer, module, "to_torch")
    module_params = {name: p.detach() for name, p, _ in held}
    try:
        optimizer.check_state(module_params, state)
        if params is not None:
            check_tensor_mapping(params, "params", floating=True)
            check_same_keys(module_params, params, "params", "the module's parameters")
            check_shapes(module_params, params, "params")
    except (KeyError, ValueError, TypeError) as error:
        raise type(error)(f"to_torch: {error.args[0]}") from error
    step = _whole_step(state["step"])
    _check_same_optimizer(optimizer, _mirror(torch_optimizer, held), torch_optimizer, held)

    # Build every entry first, so that nothing is written unless everything fits.
    layouts: Dict[Tuple[int, torch.dtype, torch.device], Tuple[Dict[str, Any], Dict[str, Any]]] = {}
    entries: List[Tuple[Tensor, Dict[str, Any]]] = []
    for name, p, group_index in held:
        key = (group_index, p.dtype, p.device)
        if key not in layouts:
            layouts[key] = _torch_state_layout(torch_optimizer, group_index, p)
        entries.append((p, _torch_param_state(torch_optimizer, group_index, _member(optimizer, name), state,
                                              name, step, *layouts[key], p)))
    if params is not None:
        with torch.no_grad():
            for name, p, _ in held:
                p.copy_(params[name])
    for p, entry in entries:
        if entry:
            torch_optimizer.state[p] = entry
        else:
            torch_optimizer.state.pop(p, None)


# ----------------------------------------------------------------------------------------------------- helpers

def _held_parameters(torch_optimizer: Any, module: Any, caller: str) -> List[Tuple[str, Tensor, int]]:
    """``(module name, parameter, param group index)`` for every parameter ``torch_optimizer`` holds, which must
    be exactly ``module``'s parameters."""
    if type(torch_optimizer) not in _CONVERTERS:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in _CONVERTERS)
        raise TypeError(f"{caller} supports {supported}; got {type(torch_optimizer).__module__}."
                        f"{type(torch_optimizer).__qualname__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"{caller} needs the nn.Module whose parameters the optimizer holds, "
                        f"got {type(module).__name__}")
    by_id = {id(p): name for name, p in module.named_parameters()}
    held: List[Tuple[str, Tensor, int]] = []
    for group_index, group in enumerate(torch_optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"{caller}: the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                                 f"a parameter of the given module")
            held.append((by_id[id(p)], p, group_index))
    missing = sorted(set(by_id.values()) - {name for name, _, _ in held})
    if missing:
        raise ValueError(f"{caller}: module parameters {missing} are not held by the optimizer; pass only the "
                         f"parameters it optimises")
    return held


def _mirror(torch_optimizer: torch.optim.Optimizer, held: List[Tuple[str, Tensor, int]]) -> Optimizer:
    """The pure optimizer that steps ``held`` as ``torch_optimizer``'s param groups do."""
    converter = _CONVERTERS[type(torch_optimizer)]
    groups = torch_optimizer.param_groups
    hyperparams = [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_OPTIONS} for g in groups]
    if all(_same_hyperparams(hyperparams[0], other) for other in hyperparams[1:]):
        return converter(groups[0])
    members = [converter(group) for group in groups]
    return param_groups({name: members[group_index] for name, _, group_index in held})


def _member(optimizer: Optimizer, name: str) -> Optimizer:
    """The optimizer that steps parameter ``name``."""
    return optimizer.optimizers[name] if isinstance(optimizer, ParamGroups) else optimizer


def _same_value(a: Any, b: Any) -> bool:
    """Equal hyperparameter values; a tensor equals a number or a tensor of the same value."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = (torch.as_tensor(x).detach().to("cpu", torch.float64) for x in (a, b))
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _same_hyperparams(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)


def _check_same_optimizer(optimizer: Optimizer, mirror: Optimizer, torch_optimizer: torch.optim.Optimizer,
                          held: List[Tuple[str, Tensor, int]]) -> None:
    """``optimizer`` must step every parameter as ``torch_optimizer`` does (``mirror`` is from_torch's view)."""
    torch_name = f"torch.optim.{type(torch_optimizer).__name__}"
    for name, _, group_index in held:
        ours, theirs = _member(optimizer, name), _member(mirror, name)
        if ours.name != theirs.name:
            raise TypeError(f"to_torch: parameter {name!r} is stepped by unroll.{ours.name}, but torch_optimizer is a "
                            f"{torch_name}, which unroll.{theirs.name} mirrors")
        diff = sorted(k for k in set(ours.hyperparams) | set(theirs.hyperparams)
                      if not _same_value(ours.hyperparams.get(k), theirs.hyperparams.get(k)))
        if diff:
            values = ", ".join(f"{k}: {ours.hyperparams.get(k)!r} here, {theirs.hyperparams.get(k)!r} in torch"
                               for k in diff)
            raise ValueError(f"to_torch: parameter {name!r} has other hyperparameters than param group "
                             f"{group_index} of the {torch_name} ({values}); set the group's values first "
                             f"(torch_optimizer.param_groups[{group_index}][...] = ...)")


def _whole_step(step: Tensor) -> int:
    if step.dim() != 0:
        raise ValueError(f"to_torch: state['step'] must be a 0-dim tensor (one state, not a vmap-stacked batch), "
                         f"got shape {tuple(step.shape)}")
    value = float(step)
    if not (value >= 0 and value.is_integer()):
        raise ValueError(f"to_torch: state['step'] must be a whole number of steps >= 0, got {value}")
    return int(value)


def _torch_state_layout(torch_optimizer: torch.optim.Optimizer, group_index: int,
                        like: Tensor) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(fresh, stepped)``: the per-parameter state ``torch_optimizer`` keeps for a parameter like ``like`` in
    param group ``group_index`` before any step and after one.

    Read off a throwaway optimizer of the same class and group options on a 1-element parameter, so the keys and
    the step counter's type, dtype and device are torch.optim's own for every class and option (capturable,
    fused, ...), with no table to keep in sync."""
    options = {k: v for k, v in torch_optimizer.param_groups[group_index].items() if k != "params"}
    probe_param = torch.zeros(1, dtype=like.dtype, device=like.device)
    # Every torch.optim class takes its options as keywords after `params`; only the base class also needs
    # `defaults`, which is what the type checker sees through type(torch_optimizer).
    optimizer_class = cast(Callable[..., torch.optim.Optimizer], type(torch_optimizer))
    probe = optimizer_class([{"params": [probe_param], **options}])
    fresh = dict(probe.state.get(probe_param, {}))
    probe_param.grad = torch.zeros_like(probe_param)
    probe.step()
    return fresh, dict(probe.state[probe_param])


def _torch_param_state(torch_optimizer: torch.optim.Optimizer, group_index: int, optimizer: Optimizer,
                       state: State, name: str, step: int, fresh: Dict[str, Any], stepped: Dict[str, Any],
                       param: Tensor) -> Dict[str, Any]:
    """torch.optim's state entry for parameter ``name`` at ``step``, from ``state`` (``optimizer`` steps it)."""
    cls = type(torch_optimizer)
    torch_buffers = {key for key, value in stepped.items() if key != "step" and value is not None}
    if torch_buffers != set(optimizer.buffers):
        raise ValueError(f"to_torch: torch.optim.{cls.__name__} keeps {sorted(torch_buffers)} for each parameter, but "
                         f"the state of unroll.{optimizer.name} has {sorted(optimizer.buffers)}")
    if step == 0 and "step" not in stepped:
        # Without a step counter (SGD), torch.optim tells step 0 by buffers that do not exist yet.
        return dict(fresh)
    entry: Dict[str, Any] = {}
    for key, like in stepped.items():
        if key == "step":
            entry[key] = (torch.tensor(float(step), dtype=like.dtype, device=like.device) if isinstance(like, Tensor)
                          else type(like)(step))
        elif like is None:
            entry[key] = None
        elif key in optimizer.scalar_buffers:
            # Per-parameter scalars (NAdam's mu_product) keep torch.optim's own dtype and device, not the param's.
            entry[key] = state[key][name].detach().to(device=like.device, dtype=like.dtype, copy=True)
        else:
            entry[key] = state[key][name].detach().to(device=param.device, dtype=param.dtype, copy=True)
    return entry


def _state_from_torch(torch_optimizer: torch.optim.Optimizer, optimizer: Optimizer,
                      held: List[Tuple[str, Tensor, int]]) -> State:
    params = {name: p.detach() for name, p, _ in held}
    state = optimizer.init(params)
    per_param = [torch_optimizer.state.get(p, {}) for _, p, _ in held]
    steps = {_torch_step(s) for s in per_param}
    if len(steps) > 1:
        raise ValueError(f"from_torch: parameters are at different step counts {sorted(steps)} (some had no "
                         f"gradient on some steps); a pure optimizer keeps one step count")
    step = steps.pop()
    state["step"] = torch.tensor(float(step), dtype=step_dtype(), device=state["step"].device)
    for (name, _, _), torch_state in zip(held, per_param):
        for buffer in _member(optimizer, name).buffers:
            value = torch_state.get(buffer)
            if value is not None:
                state[buffer][name] = value.detach().clone()
            elif step > 0:
                # A fresh buffer (zeros) is right only before the first step; later it would silently restart
                # the optimizer's statistics for this parameter.
                raise ValueError(f"from_torch: the torch.optim state of parameter {name!r} is at step {step} but has "
                                 f"no {buffer!r}; a state with every buffer is needed to continue it")
    return state


def _torch_step(param_state: Dict[str, Any]) -> int:
    if "step" in param_state:
        step = param_state["step"]
        value = float(step.item()) if isinstance(step, Tensor) else float(step)
        if not (value >= 0 and value.is_integer()):
            raise ValueError(f"from_torch: a torch.optim state has step {value}, not a whole number of steps >= 0")
        return int(value)
    # torch.optim.SGD keeps no step count; its momentum buffer exists once a step was taken, and our SGD only
    # needs to know whether this is the first step.
    return 0 if param_state.get("momentum_buffer") is None else 1
