"""Packing a dict of parameters into one flat vector, so each unrolled step runs the optimizer math once.

The optimizer update is elementwise, so applying it to the concatenation of all parameters gives exactly the
per-tensor results while issuing a handful of kernels per step instead of a handful per tensor. On small
players (the paper's discriminators) per-op overhead, not arithmetic, dominates the cost of unrolling.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from ._types import Params, State

FLAT = "flat"


def groups_by_dtype_and_device(tensors: Mapping[str, Tensor]) -> List[List[str]]:
    """The names of ``tensors`` grouped by dtype and device, in order: the sets that can share one vector."""
    groups: Dict[Tuple[torch.dtype, torch.device], List[str]] = {}
    for name, t in tensors.items():
        groups.setdefault((t.dtype, t.device), []).append(name)
    return list(groups.values())


class FlatLayout:
    """Names, shapes and sizes of a params dict; ``pack`` concatenates, ``unpack`` returns views."""

    def __init__(self, params: Params) -> None:
        self.names: Tuple[str, ...] = tuple(params)
        self.shapes = tuple(p.shape for p in params.values())
        self.numels: List[int] = [p.numel() for p in params.values()]

    @staticmethod
    def applies(params: Params) -> bool:
        """Only tensors of one dtype and device can share a vector."""
        return len(params) > 1 and len(groups_by_dtype_and_device(params)) == 1

    def pack(self, tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {FLAT: torch.cat([tensors[name].reshape(-1) for name in self.names])}

    def unpack(self, packed: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        chunks = torch.split(packed[FLAT], self.numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def pack_state(self, state: State, buffers: Sequence[str]) -> State:
        return {"step": state["step"], **{b: self.pack(state[b]) for b in buffers}}

    def unpack_state(self, state: State, buffers: Sequence[str]) -> State:
        return {"step": state["step"], **{b: self.unpack(state[b]) for b in buffers}}


class IdentityLayout(FlatLayout):
    """The fallback for mixed dtypes or devices: tensors stay as they are."""

    def pack(self, tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return dict(tensors)

    def unpack(self, packed: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return dict(packed)


def layout_for(params: Params, packable: bool = True) -> FlatLayout:
    """The flat layout where ``packable`` (the optimizer's update is elementwise and shared) and it applies."""
    return FlatLayout(params) if packable and FlatLayout.applies(params) else IdentityLayout(params)
