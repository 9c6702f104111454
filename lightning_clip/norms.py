"""The norm engine: L2 norms and max-abs of gradients, whatever their layout, without a host synchronisation.

* plain tensors, on one device or several (one process, or DDP's all-reduced gradients), complex ones by ``|z|``;
* ``DTensor`` s (FSDP2 / ``fully_shard``, tensor parallel, 2-d meshes), reduced with DTensor's own ``Partial``
  reductions over the sharded mesh dimensions only, and plain tensors mixed with DTensors on several meshes;
* FSDP1's flat-parameter shards, once :class:`lightning_clip._fsdp.FlatShardLayout` has wrapped them as DTensors.

Global (:func:`global_grad_norm`), per tensor (:func:`per_tensor_norms`, :func:`tensor_norms`), max-abs
(:func:`global_max_abs`), and per-tensor statistics summed over the shards (:func:`sum_over_shards`). Norms are
accumulated in float32 at least (float64 for float64 gradients). Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "default_foreach",
    "global_grad_norm",
    "global_max_abs",
    "is_dtensor",
    "local_tensor",
    "per_tensor_norms",
    "plain_norm",
    "real_view",
    "real_views",
    "reduce_rows",
    "sharded_norm",
    "squared_norm",
    "sum_over_shards",
    "tensor_norms",
]


try:  # the device types that have native multi-tensor (foreach) kernels
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    _FOREACH_DEVICES: tuple[str, ...] = tuple(_get_foreach_kernels_supported_devices())
except Exception:  # pragma: no cover - older / newer torch
    _FOREACH_DEVICES = ("cuda", "xpu")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def default_foreach(tensors: list[Tensor]) -> bool:
    """Default kernel choice: multi-tensor on accelerators, for-loop elsewhere.

    On CPU the single-tensor loop is faster: each ``torch._foreach_*`` op walks
    all tensors once, so a chain of foreach ops streams every tensor through
    memory once per op and loses the cache, while the loop applies the whole
    chain to one tensor while it is still hot (see
    ``benchmarks/bench_optimizers.py``).  On CUDA (and other devices with native
    foreach kernels) the multi-tensor path wins by launching far fewer kernels.
    """
    if torch.jit.is_scripting():
        return False
    return len(tensors) > 0 and all(t.device.type in _FOREACH_DEVICES for t in tensors)


def real_view(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or for a complex tensor its real view ``torch.view_as_real`` (a trailing dimension of 2:
    ``(Re z, Im z)``), which shares its memory: in-place real arithmetic on it is arithmetic on ``z``, and its L2
    norm is ``sqrt(sum |z|^2)``."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def real_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [real_view(t) for t in tensors]


def acc_dtype(tensors: list[Tensor]) -> torch.dtype:
    """Accumulation dtype for norms: float64 if any input is float64 (or complex128), else float32."""
    return torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) else torch.float32


def squared_norm(grad: Tensor) -> Tensor:
    """``||grad||^2`` as a 0-d tensor, accumulated in at least float32 (``sum |z|^2`` for a complex ``grad``).

    Contiguous float32/float64 gradients go through ``torch.dot`` (a BLAS
    reduction in the gradient's own precision, about twice as fast on CPU as
    ``vector_norm``); other dtypes are upcast to float32 by ``vector_norm``.
    """
    grad = real_view(grad)
    return _squares(grad, acc_dtype([grad]))


def tensor_norms(grads: list[Tensor], *, foreach: bool) -> list[Tensor]:
    """Per-tensor L2 norms, accumulated in at least float32 (``sqrt(sum |z|^2)`` for complex tensors)."""
    if not grads:
        return []
    grads = real_views(grads)
    dtype = acc_dtype(grads)
    if foreach:
        return list(torch._foreach_norm(grads, 2, dtype=dtype))
    return [torch.sqrt(squared_norm(g)) for g in grads]


# --------------------------------------------------------------------------- #
# gradient layouts: plain tensors and DTensors (FSDP2 / fully_shard, tensor parallel)
# --------------------------------------------------------------------------- #
def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` where torch has no distributed support."""
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor

            _DTENSOR = DTensor
        except Exception:  # pragma: no cover - builds without torch.distributed
            _DTENSOR = None
    return _DTENSOR  # type: ignore[return-value]


_DTENSOR: type | None | bool = False


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (checked without importing ``torch.distributed`` for plain tensors)."""
    if type(tensor) in (Tensor, torch.nn.Parameter):
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard (sharing its memory, so in-place arithmetic
    on it is arithmetic on the DTensor), a plain tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


@dataclass
class _Layout:
    """Gradients of one layout: plain tensors (``mesh is None``: whole on this rank, counted as they are) or the
    local shards of DTensors on one device mesh, to be summed over the mesh dimensions ``dims`` on which they are
    sharded (never over a ``Replicate`` dimension, whose ranks hold copies)."""

    mesh: object | None
    dims: tuple[int, ...]
    index: list[int]
    local: list[Tensor]


def _layouts(grads: Sequence[Tensor]) -> list[_Layout]:
    """Split gradients by layout: the plain tensors first (one group), then the DTensors by (mesh, sharded dims).

    A ``Partial`` placement (a pending sum, as after some tensor-parallel ops) is first redistributed to
    ``Replicate`` by DTensor itself (one collective), since the norm of a sum is not the sum of the norms.
    """
    plain = _Layout(None, (), [], [])
    groups: dict[tuple[object, tuple[int, ...]], _Layout] = {}
    for i, g in enumerate(grads):
        if not is_dtensor(g):
            plain.index.append(i)
            plain.local.append(g)
            continue
        placements = tuple(g.placements)  # type: ignore[attr-defined]
        if any(p.is_partial() for p in placements):
            from torch.distributed.tensor import Replicate

            g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in placements])  # type: ignore[attr-defined]
            placements = tuple(g.placements)  # type: ignore[attr-defined]
        mesh = g.device_mesh  # type: ignore[attr-defined]
        dims = tuple(d for d, p in enumerate(placements) if not p.is_replicate())
        key = (mesh, dims) if dims else (None, ())
        group = plain if not dims else groups.setdefault(key, _Layout(mesh, dims, [], []))
        group.index.append(i)
        group.local.append(g._local_tensor)  # type: ignore[attr-defined]
    return ([plain] if plain.index else []) + list(groups.values())


def _reduce_over_shards(value: Tensor, layout: _Layout, op: str = "sum") -> Tensor:
    """``value`` (this rank's partial result for ``layout``) reduced over the layout's sharded mesh dimensions with
    DTensor's own reduction (``Partial(op)`` redistributed to ``Replicate``: one all-reduce on the device, no host
    synchronisation); a plain layout's value is returned as it is."""
    if layout.mesh is None:
        return value
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = layout.mesh
    placements = [Partial(op) if d in layout.dims else Replicate() for d in range(mesh.ndim)]  # type: ignore[attr-defined]
    return DTensor.from_local(value, mesh, placements, run_check=False).full_tensor()


def _local_squares(local: list[Tensor], *, foreach: bool, dtype: torch.dtype) -> Tensor:
    """Per-tensor ``||g||^2`` of local tensors as one 1-d tensor of ``dtype`` (on the device of ``local[0]``)."""
    local = real_views(local)
    if foreach:
        norms = [n.to(dtype) for n in torch._foreach_norm(local, 2, dtype=acc_dtype(local))]
        return torch.stack([n.to(local[0].device) for n in norms]).square()
    return torch.stack([squared_norm(g).to(dtype).to(local[0].device) for g in local])


def per_tensor_norms(grads: Sequence[Tensor], *, foreach: bool | None = None) -> Tensor:
    r"""The L2 norm of each whole gradient, :math:`\lVert g_i \rVert_2`, as one float32 (float64 when a gradient
    is float64) 1-d tensor in the order of ``grads``, whatever their layout.

    A DTensor counts as the tensor it represents: the squares of its local shard are summed over the mesh
    dimensions it is sharded on (DTensor's ``Partial`` reduction), never over replicated ones. Nothing is read
    back to the host.
    """
    if not grads:
        return torch.zeros(0)
    dtype = acc_dtype([local_tensor(g) for g in grads])
    layouts = _layouts(grads)
    device = layouts[0].local[0].device
    out = torch.zeros(len(grads), dtype=dtype, device=device)
    for layout in layouts:
        use_foreach = default_foreach(layout.local) if foreach is None else foreach
        squares = _reduce_over_shards(_local_squares(layout.local, foreach=use_foreach, dtype=dtype), layout)
        out[torch.tensor(layout.index, device=device)] = squares.to(device)
    return out.sqrt()


def global_grad_norm(grads: Sequence[Tensor], *, foreach: bool | None = None) -> Tensor | None:
    r"""The L2 norm over all gradients, :math:`\sqrt{\sum_i \lVert g_i \rVert_2^2}`, as a 0-d tensor.

    The value :func:`torch.nn.utils.get_total_norm` returns, except that the per-tensor norms are accumulated in
    float32 (float64 when a gradient is float64) whatever the gradients' dtype: ``get_total_norm`` sums bf16/fp16
    gradients in their own dtype, which loses digits the moving average then keeps. Nothing is read back to the
    host.

    **Layouts.** Plain tensors count as they are (whole on this rank: one process, or DDP's already all-reduced
    gradients). A ``DTensor`` (FSDP2 / ``fully_shard``, tensor parallel, both on a 2-d mesh) counts as the whole
    tensor it represents: with ``S_L`` the sum of the squares of this rank's local shards of the DTensors of one
    layout ``L`` (one device mesh and the set of mesh dimensions they are sharded on),

    .. math:: n^2 = \sum_{\text{plain}} \lVert g \rVert^2 + \sum_L \sum_{\text{ranks } r \text{ along the
        sharded dims of } L} S_L^{(r)}

    each ``S_L`` reduced by DTensor itself (``Partial("sum")`` to ``Replicate``: one all-reduce per layout, on the
    device) over the sharded mesh dimensions only, so a replicated part is counted once. Plain tensors and
    DTensors on different meshes may be mixed in one call (a tensor-parallel model whose embeddings are not
    parallelised), which ``get_total_norm`` refuses. Every rank gets the same value; a ``nan``/``inf`` entry on
    one rank's shard makes the norm ``nan``/``inf`` on every rank. With DTensors, every rank of their meshes must
    call this (it is a collective).

    Args:
        grads: dense gradients, plain tensors on one device or several, and/or DTensors; a complex entry ``z``
            counts by its modulus ``|z|``, as in ``get_total_norm``.
        foreach: ``True``: ``torch._foreach_norm`` (one launch on CUDA); ``False``: a loop of BLAS dot products in
            reverse order, about twice as fast on CPU and leaving the first tensors in the cache for the pass that
            follows; ``None``: by device.

    Returns:
        The norm on the device of ``grads[0]`` (``inf``/``nan`` when an entry is not finite); ``None`` when
        ``grads`` is empty.
    """
    if not grads:
        return None
    if any(is_dtensor(g) for g in grads):
        return sharded_norm(grads, foreach=foreach)
    return plain_norm(real_views(grads), foreach=foreach)


def _squares(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``||grad||^2`` of a real tensor as a 0-d tensor of ``dtype`` (see :func:`squared_norm`)."""
    if grad.dtype is dtype and grad.is_contiguous():
        flat = grad.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(grad, 2, dtype=dtype).square()


def plain_norm(grads: list[Tensor], *, foreach: bool | None) -> Tensor:
    """:func:`global_grad_norm` of plain real tensors (complex ones passed as their real views), non-empty.

    The per-step path of the clipping on one device: one reduction per tensor and three small ops, no conversions
    (the squares are produced in the accumulation dtype).
    """
    if foreach is None:
        foreach = default_foreach(grads)
    dtype = acc_dtype(grads)
    first_device = grads[0].device
    if all(g.device == first_device for g in grads):
        groups = [grads]
    else:
        per_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            per_device.setdefault(g.device, []).append(g)
        groups = list(per_device.values())
    totals = []
    for group in groups:
        if foreach:
            norms = torch._foreach_norm(group, 2, dtype=dtype)
            total = torch.linalg.vector_norm(torch.stack(norms), 2)
        else:
            # reversed: the update loop then starts on the gradients still in cache
            total = torch.sqrt(torch.stack([_squares(g, dtype) for g in reversed(group)]).sum())
        totals.append(total if total.device == first_device else total.to(first_device))
    if len(totals) == 1:
        return totals[0]
    return torch.linalg.vector_norm(torch.stack(totals), 2)


def sharded_norm(grads: Sequence[Tensor], *, foreach: bool | None) -> Tensor:
    """:func:`global_grad_norm` when some gradients are DTensors: per layout, the local sum of squares reduced over
    the sharded mesh dimensions, then the square root of the sum over the layouts."""
    dtype = acc_dtype([local_tensor(g) for g in grads])
    layouts = _layouts(grads)
    device = layouts[0].local[0].device
    totals = []
    for layout in layouts:
        use_foreach = default_foreach(layout.local) if foreach is None else foreach
        if layout.mesh is None:
            totals.append(global_grad_norm(layout.local, foreach=use_foreach).to(dtype).square().to(device))
            continue
        local = _local_squares(layout.local, foreach=use_foreach, dtype=dtype).sum()
        totals.append(_reduce_over_shards(local, layout).to(device))
    return torch.stack(totals).sum().sqrt()


def sum_over_shards(tensors: Sequence[Tensor], rows: Tensor) -> Tensor:
    """Per-tensor statistics summed over the ranks that hold the other shards of each tensor.

    ``rows[i]`` is this rank's partial statistic of ``tensors[i]`` (for a DTensor, of its local shard; any trailing
    shape). Row ``i`` of the result is summed over the mesh dimensions on which ``tensors[i]`` is sharded (DTensor's
    ``Partial("sum")`` reduction, one all-reduce per layout, on the device) and left as it is for plain tensors and
    replicated dimensions, so each shard counts once. Every rank of the meshes involved must call it.
    """
    return reduce_rows(tensors, rows, "sum")


def reduce_rows(tensors: Sequence[Tensor], rows: Tensor, op: str) -> Tensor:
    """:func:`sum_over_shards` with the reduction ``op`` (``"sum"`` or ``"max"``)."""
    if not any(is_dtensor(t) for t in tensors):
        return rows
    out = rows.clone()
    for layout in _layouts(tensors):
        if layout.mesh is None:
            continue
        index = torch.tensor(layout.index, device=rows.device)
        out[index] = _reduce_over_shards(rows[index].contiguous(), layout, op).to(rows.device)
    return out


def global_max_abs(grads: Sequence[Tensor]) -> Tensor:
    """The largest ``|g_i|`` over all entries of all gradients (the modulus for complex entries), whatever their
    layout (a DTensor's local maxima are reduced with ``Partial("max")`` over its sharded mesh dimensions), as a
    0-d float32 (float64 for float64 gradients) tensor; ``0`` when there is no entry. ``nan`` propagates."""
    dtype = acc_dtype([local_tensor(g) for g in grads]) if grads else torch.float32
    layouts = _layouts(grads)
    if not layouts:
        return torch.zeros((), dtype=dtype)
    device = layouts[0].local[0].device
    out = [torch.zeros((), dtype=dtype, device=device)]
    for layout in layouts:
        local = [g for g in layout.local if g.numel()]
        maxima = [torch.zeros((), dtype=dtype, device=device)]
        real = [g for g in local if not g.is_complex()]
        maxima += [n.to(dtype).to(device) for n in (torch._foreach_norm(real, math.inf) if real else ())]
        maxima += [z.abs().amax().to(dtype).to(device) for z in local if z.is_complex()]
        out.append(_reduce_over_shards(torch.stack(maxima).amax(), layout, "max").to(device))
    return torch.stack(out).amax()
