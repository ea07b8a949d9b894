"""Walking the autograd graph: which leaves that require grad a value depends on."""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor


def foreign_leaf(roots: Iterable[Tensor], known: Iterable[Tensor]) -> Optional[Tensor]:
    """A leaf that requires grad, reached from ``roots``' graph, other than the ``known`` tensors (None if there is
    none). The walk does not go past a known tensor: below a known non-leaf, its own graph is not this one's."""
    known = list(known)
    ids = {id(t) for t in known}
    stops = {t.grad_fn for t in known if t.grad_fn is not None}
    seen = set()
    todo = [t.grad_fn for t in roots if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if isinstance(variable, Tensor) and id(variable) not in ids:
            return variable
        todo.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return None
