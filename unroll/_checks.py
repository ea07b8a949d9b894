"""Input validation. Every public entry point checks its inputs here before doing any work."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Iterator, Mapping, Tuple, cast

import torch


def check_unroll_steps(K: Any) -> int:
    if isinstance(K, bool) or not isinstance(K, numbers.Integral):
        raise TypeError(f"K (the number of unrolled steps) must be an int, got {type(K).__name__}: {K!r}")
    if K < 0:
        raise ValueError(f"K (the number of unrolled steps) must be >= 0, got {K}")
    return int(K)


def check_truncate(truncate: Any, K: int) -> int | None:
    """``truncate`` must be None or an int in [0, K]."""
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, numbers.Integral):
        raise TypeError(f"truncate (the number of differentiated unrolled steps) must be an int or None, got "
                        f"{type(truncate).__name__}: {truncate!r}")
    steps = int(truncate)  # exact for any Integral (a numpy integer), and typed for the comparison
    if not 0 <= steps <= K:
        raise ValueError(f"truncate must be between 0 and K = {K} (the steps to differentiate), got {truncate}")
    return steps


def check_checkpoint(checkpoint: Any) -> bool | int:
    """``checkpoint`` must be a bool (False: plain unroll; True: every state stored) or an int N >= 1 (at most N
    stored states)."""
    if isinstance(checkpoint, bool):
        return checkpoint
    if not isinstance(checkpoint, numbers.Integral):
        raise TypeError(f"checkpoint must be True, False or an int N >= 1 (the most unrolled states stored at once), "
                        f"got {type(checkpoint).__name__}: {checkpoint!r}")
    if checkpoint < 1:
        raise ValueError(f"checkpoint=N must keep at least one stored state (N >= 1), got {checkpoint}; "
                         f"checkpoint=False is the plain unroll")
    return int(checkpoint)


def check_tensor_mapping(mapping: Any, what: str, *, floating: bool) -> None:
    """``mapping`` must be a non-empty ``Mapping[str, Tensor]``; floating point if ``floating``."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of names to tensors (e.g. dict(module.named_parameters())), "
                        f"got {type(mapping).__name__}")
    if floating and len(mapping) == 0:
        raise ValueError(f"{what} is empty: there is nothing to optimise")
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be str, got {type(name).__name__}: {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        if floating and not value.is_floating_point():
            raise TypeError(f"{what}[{name!r}] has dtype {value.dtype}; only floating-point tensors can be "
                            f"optimised")


def check_same_keys(reference: Iterable[str], other: Iterable[str], what: str, reference_what: str = "params") -> None:
    reference, other = list(reference), list(other)
    if set(reference) == set(other):
        return
    missing = [k for k in reference if k not in set(other)]
    extra = [k for k in other if k not in set(reference)]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    raise KeyError(f"{what} keys do not match {reference_what}: " + ", ".join(parts))


def check_shapes(params: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    for name, p in params.items():
        if other[name].shape != p.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(other[name].shape)} but the parameter has "
                             f"shape {tuple(p.shape)}")


def check_scalars(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.dim() != 0:
            raise ValueError(f"{what}[{name!r}] must be a 0-dim tensor (one value per parameter), got shape "
                             f"{tuple(t.shape)}")


def check_scalar_loss(value: Any, fn_name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn_name} must return a scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"{fn_name} must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{fn_name} must return a floating-point tensor, got dtype {value.dtype}")


def check_hyperparameter(value: Any, label: str, *, low: float | None = 0.0, high: float | None = None,
                         high_inclusive: bool = False) -> None:
    """Range check with torch.optim's messages (``Invalid <label>: <value>``); NaN is always out of range.

    Tensors must have one element (they may require grad). ``low=None`` checks for NaN only (SGD's dampening,
    which torch.optim does not check at all). The comparisons are written so that NaN fails them, as in
    torch.optim's ``if not 0.0 <= lr`` (torch.optim.SGD's ``if lr < 0.0`` lets NaN through; we do not).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {label} must be 1-element, got shape {tuple(value.shape)}")
        value = value.detach().item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{label} must be a real number or a 1-element tensor, got {type(value).__name__}")
    # typeshed's numbers.Real has no __ge__, so `low <= value` does not type-check; compare it as the float it
    # behaves like (no conversion: a cast changes nothing at run time).
    number = cast(float, value)
    above_low = number == number if low is None else low <= number
    below_high = high is None or (number <= high if high_inclusive else number < high)
    if not (above_low and below_high):
        bound = "a number" if low is None else f">= {low}"
        if high is not None:
            bound += f" and {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"Invalid {label}: {value} (must be {bound})")


def check_adam_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> Tuple[Any, Any]:
    """The checks torch.optim's Adam-family constructors (Adam, AdamW, Adamax, NAdam, RAdam) share, in their
    order; returns ``(beta1, beta2)``."""
    beta1, beta2 = _pair(betas, "betas", "(beta1, beta2), e.g. betas=(0.9, 0.999)")
    check_hyperparameter(lr, "learning rate")
    check_hyperparameter(eps, "epsilon value")
    check_hyperparameter(beta1, "beta parameter at index 0", high=1.0)
    check_hyperparameter(beta2, "beta parameter at index 1", high=1.0)
    check_hyperparameter(weight_decay, "weight_decay value")
    return beta1, beta2


def _pair(value: Any, label: str, example: str) -> Tuple[Any, Any]:
    """``value`` unpacked into two, with an error naming ``label`` instead of Python's unpacking error."""
    try:
        size = None if isinstance(value, (str, bytes)) else len(value)
    except TypeError:  # no len(): a number, a 0-dim tensor
        size = None
    if size is None:
        raise TypeError(f"{label} must be a pair {example}, got {type(value).__name__}: {value!r}")
    if size != 2:
        raise ValueError(f"{label} must be a pair {example}, got {size} values: {value!r}")
    return value[0], value[1]


def check_like_params(params: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> None:
    """Each ``other[name]`` must have the dtype and device of ``params[name]``: a mismatch would either fail deep
    inside an update or silently promote the result (float32 state with float64 params)."""
    for name, p in params.items():
        t = other[name]
        if t.dtype != p.dtype:
            raise TypeError(f"{what}[{name!r}] has dtype {t.dtype} but params[{name!r}] has dtype {p.dtype}; "
                            f"convert one of them (e.g. a fresh opt.init(params) after changing the params' dtype)")
        if t.device != p.device:
            raise ValueError(f"{what}[{name!r}] is on {t.device} but params[{name!r}] is on {p.device}")


def check_beside_params(value: torch.Tensor, what: str, params: Mapping[str, torch.Tensor]) -> None:
    """A tensor combined with every parameter (the step count, a tensor hyperparameter) must be on the params'
    device, or be a 0-dim CPU tensor, which torch combines with tensors on any device."""
    if value.dim() == 0 and value.device.type == "cpu":
        return
    for name, p in params.items():
        if value.device != p.device:
            raise ValueError(f"{what} is on {value.device} but params[{name!r}] is on {p.device}; put it on the "
                             f"params' device (or make it a 0-dim CPU tensor)")


def check_tensor_hyperparameters(hyperparams: Mapping[str, Any], params: Mapping[str, torch.Tensor],
                                 optimizer: str) -> None:
    """Tensor hyperparameters (a learned learning rate) must sit beside the params (:func:`check_beside_params`),
    and floating-point ones must have the params' dtype wherever torch would promote the update to theirs: a
    0-dim one of another dtype (torch.optim's float32 tensor ``lr`` with float64 params) leaves a parameter that
    is not 0-dim in its dtype, so only that case is let through."""
    for label, value in _tensors_in(hyperparams):
        check_beside_params(value, f"{optimizer}: hyperparameter {label}", params)
        if not value.is_floating_point():
            continue
        for name, p in params.items():
            if value.dtype != p.dtype and (value.dim() > 0 or p.dim() == 0):
                raise TypeError(f"{optimizer}: hyperparameter {label} has dtype {value.dtype} but params[{name!r}] "
                                f"has dtype {p.dtype}, so the update would become "
                                f"{torch.promote_types(value.dtype, p.dtype)}; give it the params' dtype "
                                f"(e.g. .to({p.dtype}))")


def _tensors_in(tree: Any, label: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """``(label, tensor)`` for every tensor in nested mappings, tuples and lists, labelled like ``betas[0]``."""
    if isinstance(tree, torch.Tensor):
        yield label, tree
    elif isinstance(tree, (tuple, list)):
        for i, value in enumerate(tree):
            yield from _tensors_in(value, f"{label}[{i}]")
    elif not isinstance(tree, (bool, int, float, str)) and isinstance(tree, Mapping):  # cheap checks first
        for key, value in tree.items():
            yield from _tensors_in(value, f"{label}[{key!r}]" if label else str(key))


def check_step_count(step: torch.Tensor, what: str = "state['step']") -> None:
    """The step count must be a whole number >= 0 (every entry of a stacked one). Reading it costs one host
    synchronisation; under ``torch.func.vmap`` it cannot be read and is not checked."""
    if step.dtype == torch.bool or step.is_complex():
        raise TypeError(f"{what} must be a real-valued tensor counting the steps taken, got dtype {step.dtype}")
    try:
        # One read of the usual 0-dim count is far cheaper than tensor comparisons; a stacked one needs those.
        values = [step.item()] if step.dim() == 0 else step.detach().flatten().tolist()
    except RuntimeError:
        return  # a vmap-batched count cannot be read
    bad = [v for v in values if not (v >= 0 and math.isfinite(v) and float(v).is_integer())]
    if bad:
        raise ValueError(f"{what} must be a whole number of steps taken (>= 0), got "
                         f"{bad[0] if step.dim() == 0 else bad}")
