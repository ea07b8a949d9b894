"""The module's own buffers stay the caller's: an unroll may not change them in place behind its back.

``torch.func.functional_call(module, mapping, args)`` runs ``module`` with the tensors of ``mapping`` and, for every
name the mapping lacks, the module's own tensor. A discriminator with BatchNorm, unrolled with a params-only
mapping (no ``buffers=``), would so update the live module's running statistics at every unrolled step. While a
:class:`LiveBufferGuard` is active, every ``nn.Module`` that is run with at least one tensor of the mapping is the
inner player's module; if its forward pass changes a buffer of it that the mapping does not hold, the buffer is
restored and the call refused, naming it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, List, Mapping, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


@dataclass
class _Run:
    """One run of an inner player's module: its buffers that the mapping does not hold, as they were before."""

    module: nn.Module
    before: List[Tuple[str, Tensor, int, Tensor]] = field(default_factory=list)  # (name, live, version, copy)

    def changed(self) -> List[str]:
        """Restore every buffer the run changed (version counter or values) and return their names."""
        names = []
        for name, live, version, copy in self.before:
            if live._version != version or not _same_values(live, copy):
                with torch.no_grad():
                    live.copy_(copy)
                names.append(name)
        return names


class LiveBufferGuard:
    """A context manager: see the module docstring. ``fn_name`` names the function in the error."""

    def __init__(self, mapping: Mapping[str, Tensor], fn_name: str) -> None:
        self._ours = {id(t) for t in mapping.values()}
        self._fn_name = fn_name
        self._thread = threading.get_ident()  # module hooks are global: other threads' modules are not ours
        self._runs: List[_Run] = []
        self._handles: List[Any] = []

    def __enter__(self) -> LiveBufferGuard:
        self._handles = [register_module_forward_pre_hook(self._before), register_module_forward_hook(self._after)]
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        for handle in self._handles:
            handle.remove()
        runs, self._runs = self._runs, []
        for run in runs:  # a forward pass that raised: restore what it changed, and let its error through
            changed = run.changed()
            if changed and kind is None:
                self._refuse(run, changed)

    def _before(self, module: nn.Module, args: Any) -> None:
        # Inside a run of the inner player's module its submodules are covered already.
        if threading.get_ident() != self._thread or self._runs:
            return
        buffers = list(module.named_buffers())
        if not (any(id(p) in self._ours for p in module.parameters())  # stops at the first of ours
                or any(id(b) in self._ours for _, b in buffers)):
            return
        self._runs.append(_Run(module, [(name, b, b._version, b.detach().clone())
                                        for name, b in buffers if id(b) not in self._ours]))

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() != self._thread or not self._runs or self._runs[-1].module is not module:
            return
        run = self._runs.pop()
        changed = run.changed()
        if changed:
            self._refuse(run, changed)

    def _refuse(self, run: _Run, changed: List[str]) -> None:
        raise RuntimeError(
            f"{self._fn_name} changed the buffers {changed} of {type(run.module).__name__} in place (restored now): "
            f"the mapping it ran the module with (e.g. through torch.func.functional_call) does not hold them, so "
            f"the module's own tensors were used. Pass buffers=dict(module.named_buffers()) to the call (they are "
            f"updated in copies) and call functional_call(module, params, args, strict=True) so that a missing name "
            f"is an error")


class FirstCallGuarded:
    """``fn(mapping, *args)``, its first call under a :class:`LiveBufferGuard`: a module that updates buffers it
    should not does so at every call (BatchNorm in training mode), so one guarded call finds it at little cost."""

    def __init__(self, fn: Callable[..., Tensor], fn_name: str) -> None:
        self._fn, self._fn_name, self._pending = fn, fn_name, True

    def __call__(self, mapping: Mapping[str, Tensor], *args: Any) -> Tensor:
        if not self._pending:
            return self._fn(mapping, *args)
        self._pending = False
        with LiveBufferGuard(mapping, self._fn_name):
            return self._fn(mapping, *args)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN (an unchanged NaN buffer is unchanged)."""
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same = same | (a.isnan() & b.isnan())
    return bool(same.all())
