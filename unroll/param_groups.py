"""Param groups: a different optimizer (or different hyperparameters) for different parameters."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import Tensor

from ._checks import check_same_keys, check_tensor_mapping
from ._types import Grads, Params, State
from .optimizer import Optimizer

GroupSpec = Union[Mapping[str, Optimizer], Callable[[str], Optimizer]]
"""``{param name: optimizer}``, or a function ``name -> optimizer`` (then ``names=`` lists the parameters)."""


def param_groups(groups: GroupSpec, names: Optional[Iterable[str]] = None) -> ParamGroups:
    """An :class:`~unroll.Optimizer` that steps each parameter with its own optimizer, like torch.optim's param groups.

    ``groups`` maps every parameter name to an optimizer, e.g. a larger learning rate for the last layer::

        opt = unroll.param_groups({"0.weight": unroll.adam(1e-3), "0.bias": unroll.adam(1e-3),
                                   "2.weight": unroll.adam(1e-2), "2.bias": unroll.adam(1e-2)})

    or is a function of the name, evaluated once per name in ``names`` (an iterable of names; iterating
    ``dict(module.named_parameters())`` gives them)::

        opt = unroll.param_groups(lambda name: unroll.sgd(0.1, weight_decay=0.0 if name.endswith("bias") else 1e-4),
                                  names=dict(model.named_parameters()))

    Each parameter's update is exactly that of its optimizer (any :class:`~unroll.Optimizer`, including your own).
    All parameters share one step count. The state keeps the usual layout, ``{"step": tensor, <buffer>: {name:
    tensor}}``, where each buffer dict holds the parameters whose optimizer has that buffer (so with SGD without
    momentum for some parameters and Adam for others, ``state["exp_avg"]`` holds only the Adam ones).
    ``init``/``step``/``check_state`` raise a clear error for parameters without an optimizer and for names
    that are not parameters. The result has ``packable=False``: an unroll keeps its tensors apart.
    """
    if callable(groups) and not isinstance(groups, Mapping):
        if names is None:
            raise TypeError("param_groups: with a function of the parameter name, pass names= (e.g. "
                            "names=dict(model.named_parameters()))")
        if isinstance(names, (str, bytes)):
            raise TypeError(f"param_groups: names must be an iterable of parameter names, got the string {names!r}")
        names = list(names)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"param_groups: names must be str, got {type(name).__name__}: {name!r}")
        groups = {name: groups(name) for name in names}
    elif not isinstance(groups, Mapping):
        raise TypeError(f"param_groups needs a mapping {{param name: optimizer}} or a function name -> optimizer, "
                        f"got {type(groups).__name__}")
    elif names is not None:
        raise TypeError("param_groups: names= is only for a function of the parameter name; a mapping already "
                        "names every parameter")
    return ParamGroups(groups)


class ParamGroups(Optimizer):
    """The optimizer returned by :func:`param_groups`, a sibling of the per-tensor
    :class:`~unroll.optimizer.TensorOptimizer`: ``optimizers`` maps each parameter name to its optimizer."""

    def __init__(self, groups: Mapping[str, Optimizer]) -> None:
        if len(groups) == 0:
            raise ValueError("param_groups is empty: give an optimizer for every parameter")
        for name, member in groups.items():
            if not isinstance(name, str):
                raise TypeError(f"param_groups keys must be parameter names (str), got {type(name).__name__}: "
                                f"{name!r}")
            if isinstance(member, ParamGroups):
                raise TypeError(f"param_groups[{name!r}] is itself a param_groups optimizer; give the optimizer of "
                                f"that parameter (opt.optimizers[{name!r}])")
            if not isinstance(member, Optimizer):
                raise TypeError(f"param_groups[{name!r}] must be an unroll optimizer (e.g. unroll.adam(1e-3)), got "
                                f"{type(member).__name__}")
        # A plain dict, as every optimizer's hyperparams: picklable and deep-copyable.
        self.optimizers: Dict[str, Optimizer] = dict(groups)
        self.name = "param_groups"
        self.hyperparams = self.optimizers
        self.buffers = _union(member.buffers for member in self.optimizers.values())
        self.scalar_buffers = _union(member.scalar_buffers for member in self.optimizers.values())
        self.packable = False

    def _members(self, names: Iterable[str]) -> List[Tuple[Optimizer, List[str]]]:
        """The optimizers in use and the names each one steps, in the order of ``names``."""
        by_member: Dict[int, Tuple[Optimizer, List[str]]] = {}
        for name in names:
            member = self.optimizers[name]
            by_member.setdefault(id(member), (member, []))[1].append(name)
        return list(by_member.values())

    def _check_names(self, params: Params) -> None:
        check_tensor_mapping(params, "params", floating=True)
        uncovered = [name for name in params if name not in self.optimizers]
        if uncovered:
            raise KeyError(f"param_groups has no optimizer for the params {uncovered}; give every parameter one")
        unknown = [name for name in self.optimizers if name not in params]
        if unknown:
            raise KeyError(f"param_groups has optimizers for {unknown}, which are not in params (misspelt names, "
                           f"or the params of another model?)")

    def init(self, params: Params) -> State:
        """Each parameter's buffers from its own optimizer's ``init``; one shared step count."""
        self._check_names(params)
        state: State = {}
        for member, names in self._members(params):
            member_state = member.init({name: params[name] for name in names})
            state.setdefault("step", member_state["step"])
            for buffer in member.buffers:
                state.setdefault(buffer, {}).update(member_state[buffer])
        # Buffer dicts in parameter order, whatever the order of the groups.
        return {"step": state["step"], **{b: {n: state[b][n] for n in params if n in state[b]} for b in self.buffers}}

    def check_state(self, params: Params, state: State) -> None:
        self._check_names(params)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the dict returned by param_groups' init, got {type(state).__name__}")
        check_same_keys(("step",) + self.buffers, state, "param_groups state", "the expected state entries")
        for buffer in self.buffers:
            check_tensor_mapping(state[buffer], f"state[{buffer!r}]", floating=True)
            holders = [name for name in params if buffer in self.optimizers[name].buffers]
            check_same_keys(holders, state[buffer], f"state[{buffer!r}]",
                            f"the params whose optimizer has {buffer!r}")
        for member, names in self._members(params):
            member.check_state({name: params[name] for name in names}, self._member_state(state, member, names))

    def apply(self, params: Params, grads: Grads, state: State) -> Tuple[Dict[str, Tensor], State]:
        """Each group's ``apply`` on its own parameters; results merged back in parameter order."""
        new_params: Dict[str, Tensor] = {}
        new_buffers: Dict[str, Dict[str, Tensor]] = {b: {} for b in self.buffers}
        for member, names in self._members(params):
            member_params, member_state = member.apply({n: params[n] for n in names}, {n: grads[n] for n in names},
                                                       self._member_state(state, member, names))
            new_params.update(member_params)
            for buffer in member.buffers:
                new_buffers[buffer].update(member_state[buffer])
        return ({n: new_params[n] for n in params},
                {"step": state["step"] + 1,
                 **{b: {n: new_buffers[b][n] for n in params if n in new_buffers[b]} for b in self.buffers}})

    @staticmethod
    def _member_state(state: State, member: Optimizer, names: List[str]) -> State:
        return {"step": state["step"], **{b: {n: state[b][n] for n in names} for b in member.buffers}}

    def __repr__(self) -> str:
        return f"unroll.param_groups({dict(self.optimizers)!r})"


def _union(names: Iterable[Tuple[str, ...]]) -> Tuple[str, ...]:
    """Every name, once, in order of first appearance."""
    return tuple(dict.fromkeys(name for group in names for name in group))
