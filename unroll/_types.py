"""Type aliases shared by the package."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Union

from torch import Tensor

Params = Mapping[str, Tensor]
"""Named tensors, as from ``dict(module.named_parameters())``."""

Grads = Mapping[str, Tensor]
"""Gradients keyed like the params they belong to."""

State = Dict[str, Any]
"""Optimizer state: ``{"step": Tensor, <buffer>: {param name: Tensor}, ...}``."""

Scalar = Union[float, Tensor]
"""A hyperparameter: a Python number or a 0-dim tensor (which may require grad)."""
