"""FSDP1 (torch's ``FullyShardedDataParallel``, flat parameters): where its gradients are sharded, in one place.

Pure torch; the only module of the package that reads FSDP1's private names (``_all_handles`` of the FSDP states,
a handle's ``flat_param``, ``uses_sharded_strategy``, ``process_group`` and ``flat_param._params``).

FSDP1 flattens the parameters of each wrapped unit into one ``flat_param`` and, under a sharded strategy
(``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD``, ``_HYBRID_SHARD_ZERO2``), keeps on each rank one contiguous
chunk of it (zero-padded at the end) and that chunk's gradient, already reduced over the data-parallel ranks. With
``use_orig_params=False`` the optimizer holds the flat parameters; with ``use_orig_params=True`` it holds the original
parameters, whose ``.grad`` are views of the part of the chunk that falls in them (``None`` on a rank that holds none
of the parameter). ``NO_SHARD`` keeps whole, all-reduced gradients on every rank, as DDP does.

The whole model's norm is therefore, as ``FullyShardedDataParallel.clip_grad_norm_`` computes it,

.. math:: n^2 = \\sum_{\\text{ranks } r \\text{ of the shard group}} \\sum_{g \\text{ sharded}} \\lVert g^{(r)}
    \\rVert^2 + \\sum_{g \\text{ not sharded}} \\lVert g \\rVert^2

the sharded part all-reduced over the handle's ``process_group``, which is the *shard* group (for ``HYBRID_SHARD``
the ranks of one replica: the replicas hold the same reduced chunk and must not be counted twice), and the
non-sharded part (``NO_SHARD`` units, parameters FSDP does not manage) counted once, not reduced.

:class:`FlatShardLayout` hands the gradients to the norm engine of :mod:`lightning_clip.functional` as what they are:
the local shards of tensors sharded over a 1-d device mesh of the shard group (``DTensor.from_local``, sharing the
gradient's memory, so the engine's in-place scale is the scale of the gradient), and plain tensors for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FlatShardLayout", "fsdp_modules"]


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """Every ``FullyShardedDataParallel`` (FSDP1) instance in ``module`` (``module`` itself included); ``[]`` when
    there is none or torch has no distributed support."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except Exception:  # pragma: no cover - builds without torch.distributed
        return []
    return [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]


class FlatShardLayout:
    """Which parameters of an FSDP1 model hold a shard of their gradient, and over which process group.

    Built once per fit from the wrapped model (the layout does not change while it trains); :meth:`grads` then gives,
    at each step, the gradients of the optimizer's parameters in the form the norm engine reduces exactly.

    Args:
        module: the model, wrapped in FSDP1 or holding FSDP1-wrapped submodules.
    """

    def __init__(self, module: nn.Module) -> None:
        #: ``id(parameter) -> shard process group`` for parameters of sharded units, ``None`` for ``NO_SHARD`` units
        self.groups: dict[int, Any] = {}
        self._meshes: dict[int, Any] = {}
        for fsdp in fsdp_modules(module):
            handle = getattr(fsdp, "_handle", None)
            if handle is None:  # a wrapper that manages no parameter of its own
                continue
            group = handle.process_group if handle.uses_sharded_strategy else None
            flat = handle.flat_param
            for param in [flat, *(getattr(flat, "_params", None) or ())]:
                self.groups[id(param)] = group

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _mesh(self, group: Any, device: torch.device) -> Any:
        mesh = self._meshes.get(id(group))
        if mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = self._meshes[id(group)] = DeviceMesh.from_group(group, device.type)
        return mesh

    def grads(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The gradients of ``params`` (all of the optimizer's, in its order, the same list on every rank), one per
        parameter, for :func:`lightning_clip.functional.clip_step_`.

        A gradient of a sharded unit becomes the local shard of a DTensor placed ``Shard(0)`` on a 1-d mesh of the
        unit's shard group (its memory shared: scaling it scales ``.grad``); its global shape is not meaningful, its
        sum of squares and its maximum are, which is all the engine reads. A parameter without a gradient on this rank
        (an original parameter none of whose entries this rank holds) counts as an empty one, so that every rank
        passes the same list and joins the same collectives. Other gradients are returned as they are.
        """
        from torch.distributed.tensor import DTensor, Shard

        out = []
        for p in params:
            grad = p.grad if p.grad is not None else torch.empty(0, dtype=p.dtype, device=p.device)
            group = self.groups.get(id(p))
            if group is not None:
                grad = DTensor.from_local(grad, self._mesh(group, grad.device), [Shard(0)], run_check=False)
            out.append(grad)
        return out
