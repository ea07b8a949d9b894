r"""Data-parallel unrolling on ``torch.distributed``: every rank unrolls the same inner player on the global batch.

With the batch split into equal shards over N ranks, the inner gradient of the global batch is the mean of the
per-rank gradients. Averaging it at every unrolled step (``transform_grads=all_reduce_mean()``) with an
all-reduce whose backward pass is again an all-reduce makes

.. math:: \bar g^k = \frac1N \sum_r \nabla_\theta \mathcal L_r(\theta^k),\qquad
          \theta^{k+1} = \mathrm{step}(\theta^k, \bar g^k)

the single-process unroll of Metz et al. (2017), Eq. 6-7, on the global batch, identical on every rank; and the
backward pass through it exact: the cotangent of each rank's local gradient is the mean of every rank's cotangent
of :math:`\bar g^k`. After ``backward``, averaging the outer player's gradients across ranks
(:func:`all_reduce_grads_`, or ``DistributedDataParallel`` on the generator) gives the gradient of the global
surrogate loss (Eq. 12). See ``docs/distributed.md``.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from ._checks import check_tensor_mapping
from ._flat import groups_by_dtype_and_device

__all__ = ["all_reduce_mean", "all_reduce_grads_", "check_same_shapes"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its backward is the same sum of the cotangents, so it differentiates to any order.

    ``torch.distributed.nn.functional.all_reduce`` does the same but warns that it is deprecated (torch 2.13)
    and, like the functional collectives, refuses ``torch.func`` transforms; this one works under
    ``torch.func.grad`` and ``vmap`` (several seeds at once: one collective for all of them).
    """

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Tensor, Any], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, cotangent: Tensor) -> Tuple[Tensor, None]:
        return _all_reduce_sum(cotangent, ctx.group), None

    @staticmethod
    def vmap(info: Any, in_dims: Tuple[Optional[int], None], tensor: Tensor, group: Any
             ) -> Tuple[Tensor, Optional[int]]:
        # The sum is elementwise: summing the whole batched tensor sums every batch entry (one collective).
        return _all_reduce_sum(tensor, group), in_dims[0]


# torch leaves Function.apply untyped; this is its signature for _AllReduceSum.
_all_reduce_sum: Callable[[Tensor, Any], Tensor] = _AllReduceSum.apply


class AllReduceMean:
    """The ``transform_grads`` of :func:`all_reduce_mean`; ``mean(grads, k=None)`` returns the averaged dict."""

    def __init__(self, group: Any, check_finite: bool) -> None:
        _require_process_group("all_reduce_mean")
        self.group = group
        self.check_finite = check_finite
        self._checked: Set[str] = set()  # descriptions of parameter sets that every rank shares

    def __repr__(self) -> str:
        return f"unroll.distributed.all_reduce_mean(group={self.group!r}, check_finite={self.check_finite})"

    def __call__(self, grads: Mapping[str, Tensor], k: Optional[int] = None) -> Dict[str, Tensor]:
        where = "the gradient" if k is None else f"the inner gradient of unrolled step {k}"
        _require_process_group("all_reduce_mean")
        check_tensor_mapping(grads, where, floating=True)
        description = _describe(grads)
        if description not in self._checked:
            # Once per parameter set: every rank runs the same program, so all of them check here or none does.
            _check_same_signature(description, next(iter(grads.values())).device, self.group, where)
            self._checked.add(description)
        world = dist.get_world_size(self.group)
        averaged: Dict[str, Tensor] = {}
        for names in groups_by_dtype_and_device(grads):
            # One collective per dtype and device (one in all for a usual model) on the concatenated gradient.
            flat = _all_reduce_sum(torch.cat([grads[n].reshape(-1) for n in names]), self.group) / world
            if self.check_finite:
                _raise_if_nonfinite(flat, where)
            chunks = torch.split(flat, [grads[n].numel() for n in names])
            averaged.update({n: c.view(grads[n].shape) for n, c in zip(names, chunks)})
        return {n: averaged[n] for n in grads}


def all_reduce_mean(group: Any = None, *, check_finite: bool = True) -> AllReduceMean:
    r"""Return ``mean(grads, k) -> grads``, the ``transform_grads`` that averages the inner gradient over ranks.

    .. math:: \bar g^k = \frac1N \sum_{r=1}^N g_r^k

    computed with one differentiable all-reduce per unrolled step (per dtype and device) on the concatenated
    gradient; its backward pass is one more all-reduce, so gradients through the unroll (``create_graph``,
    ``checkpoint=True``, ``torch.func.grad``) are those of the single-process unroll on the union of the shards.
    Pass the same object to :func:`unroll.train_step` (the committed step) and :func:`unroll.surrogate_loss`, so
    the inner player's parameters and optimizer state stay identical on every rank.

    The mean of per-rank means is the global mean only for equal shards (:func:`check_same_shapes` on the batch);
    with unequal shards each rank still weighs 1/N.

    Args:
        group: the process group (default: the world group of ``torch.distributed.init_process_group``).
        check_finite: raise ``FloatingPointError`` on every rank, naming the step, when the averaged gradient is
            NaN or infinite (a non-finite loss or gradient on any rank), so that no rank is left waiting in a
            collective. One host synchronisation per unrolled step.

    The first time it sees a set of parameter names, dtypes and shapes, the transform checks with one small
    all-gather that every rank passes the same, and raises ``ValueError`` on every rank, listing each rank's
    parameters, if not (gloo would otherwise abort one rank and hand the other a wrong sum, or silently mix up
    tensors of equal size).

    Raises:
        RuntimeError: without an initialised process group (here and at every call).
    """
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    return AllReduceMean(group, check_finite)


def all_reduce_grads_(params: Union[Mapping[str, Tensor], Iterable[Tensor]], group: Any = None) -> None:
    r"""Average ``p.grad`` over ranks in place, for every ``p`` in ``params`` (after ``backward``, before the step).

    .. math:: \nabla_{\theta} \frac1N \sum_r f_r = \frac1N \sum_r \nabla_{\theta}^{(r)} \Big(\sum_s f_s\Big)

    Each rank's ``backward`` of its own surrogate loss :math:`f_r` gives, through the unroll's all-reduces, the
    derivative of :math:`\sum_s f_s` along its own data; the mean over ranks is the gradient of the global loss.
    One all-reduce per dtype and device. A ``.grad`` that is ``None`` counts as zero (it stays ``None`` only if
    it is ``None`` on every rank), as in ``DistributedDataParallel``. ``params`` is a mapping (e.g.
    ``dict(G.named_parameters())``) or an iterable of tensors (``G.parameters()``).
    """
    _require_process_group("all_reduce_grads_")
    named = dict(params) if isinstance(params, Mapping) else {str(i): p for i, p in enumerate(params)}
    check_tensor_mapping(named, "params", floating=True)
    _check_same_signature(_describe(named), next(iter(named.values())).device, group, "params")
    world = dist.get_world_size(group)
    with torch.no_grad():
        _average_grads_in_place(named, group, world)


def _average_grads_in_place(named: Mapping[str, Tensor], group: Any, world: int) -> None:
    for names in groups_by_dtype_and_device(named):
        tensors = [named[n] for n in names]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in tensors]
        has_grad = torch.tensor([p.grad is not None for p in tensors], dtype=tensors[0].dtype,
                                device=tensors[0].device)
        # The None flags travel with the gradients: one collective, and every rank takes the same decision.
        flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
        dist.all_reduce(flat, group=group)
        chunks = torch.split(flat, [p.numel() for p in tensors] + [len(tensors)])
        for p, chunk, ranks_with_grad in zip(tensors, chunks, chunks[-1].tolist()):
            if ranks_with_grad == 0:
                continue
            mean = (chunk / world).view(p.shape)
            if p.grad is None:
                p.grad = mean
            else:
                p.grad.copy_(mean)  # in place: whoever holds the gradient tensor (an optimizer, a hook) sees it


def check_same_shapes(tree: Any, what: str = "batch", group: Any = None) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes tensors of the same shapes and dtypes.

    ``tree`` is a tensor or a nested tuple/list/dict of them (e.g. ``(real, z)``). One small all-gather. Data
    parallelism averages per-rank means, which equals the global mean only for equal shards: call this on the
    first batch (or every batch, if shard sizes can vary, e.g. a last partial batch).
    """
    _require_process_group("check_same_shapes")
    leaves = [leaf for leaf in pytree.tree_flatten(tree)[0] if isinstance(leaf, Tensor)]
    if not leaves:
        raise TypeError(f"{what} must contain at least one tensor, got {type(tree).__name__}")
    description = "; ".join(f"{tuple(t.shape)} {t.dtype}" for t in leaves)
    _check_same_signature(description, leaves[0].device, group, what)


def _require_process_group(caller: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"unroll.distributed.{caller} needs an initialised process group: call "
                           f"torch.distributed.init_process_group(backend) first (torchrun sets RANK, WORLD_SIZE "
                           f"and MASTER_ADDR/MASTER_PORT for it); see docs/distributed.md")


def _describe(tensors: Mapping[str, Tensor]) -> str:
    return "; ".join(f"{name}: {tuple(t.shape)} {t.dtype}" for name, t in tensors.items())


def _check_same_signature(description: str, device: torch.device, group: Any, what: str) -> None:
    """All-gather a 32-bit hash of ``description``; on a mismatch every rank gathers the full texts and raises."""
    world = dist.get_world_size(group)
    code = torch.tensor([zlib.crc32(description.encode())], dtype=torch.int64, device=device)
    codes = [torch.empty_like(code) for _ in range(world)]
    dist.all_gather(codes, code, group=group)
    if all(torch.equal(c, codes[0]) for c in codes):
        return
    texts: List[Optional[str]] = [None] * world
    dist.all_gather_object(texts, description, group=group)
    lines = "\n".join(f"  rank {rank}: {text}" for rank, text in enumerate(texts))
    raise ValueError(f"{what} differs across ranks (names, shapes or dtypes); every rank must pass the same "
                     f"parameters and equal batch shards:\n{lines}")


def _raise_if_nonfinite(averaged: Tensor, where: str) -> None:
    try:
        finite = bool(torch.isfinite(averaged).all())
    except RuntimeError:
        return  # under torch.func.vmap values cannot be branched on (as for check_finite in the unroll)
    if not finite:
        raise FloatingPointError(f"{where} is NaN or infinite after averaging over ranks: some rank's inner loss "
                                 f"or gradient is not finite (every rank raises this error)")
