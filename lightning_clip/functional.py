"""The clipping rules as pure torch: global norms, thresholds, clip coefficients, non-finite handling.

Nothing here imports Lightning. Every per-step decision stays on the gradients' device: no ``.item()``,
``float()``, ``bool()`` or Python ``if`` on a tensor, so the same code runs unchanged on CPU, CUDA, MPS and XLA.

One optimizer step of :func:`clip_grads_` with gradients ``g`` and state ``(m, k)`` (moving average, finite steps
seen) does, for ``mode="adaptive"``::

    n_t = ||g||_2                                  (float32 at least, over every gradient; |z| for complex)
    tau_t = alpha * m_(t-1)   if k > warmup_steps  else +inf   (never depends on n_t)
    tau_t = min(tau_t, max_norm)                   (when max_norm is set: every step, the first included)
    c_t = min(1, tau_t / max(n_t, tiny))           (post-clip norm c_t * n_t = tau_t when n_t > tau_t)
    g <- c_t * g
    only when 0 < n_t < inf (an informative step), with k <- k + 1:
    m_t = n_t                                      if k == 1 (the first informative step seeds the average)
    m_t = m_(t-1) + w_k * (n_t - m_(t-1))          w_k = (1 - beta) / (1 - beta^k), while k <= warmup_steps + 1
    m_t = beta * m_(t-1) + (1 - beta) * n_t        afterwards
    otherwise (n_t = 0, inf or nan) m and k are left unchanged.

A zero norm (zero-initialised layers, a frozen warm start, a loss constant at the start) says nothing about the
scale of the gradients: it neither seeds nor drags the average, and it does not count as a warm-up step. During the
warm-up, ``w_k`` makes ``m`` the bias-corrected moving average of the informative norms so far (Adam's correction of
its moments), ``m_k = sum_(i=1..k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)``: the weights sum to 1 and a later step
weighs more than an earlier one, by ``1 / beta`` per step (``w_1 = 1`` seeds it). After ``warmup_steps = K`` the first
step weighs ``beta^K (1 - beta) / (1 - beta^(K+1))`` instead of ``beta^K`` in the plain seeded average (with the
defaults and ``K = 10``, 0.057 instead of 0.43), so one unrepresentative early step (tiny or huge) does not set the
threshold that follows. With ``warmup_steps = 0`` the rule is the plain seeded average.

Complex gradients are handled as the real pairs ``(Re z, Im z)`` (``torch.view_as_real``): the norm is the one
``torch.nn.utils.clip_grad_norm_`` computes, and norm clipping multiplies ``z`` by the real ``c_t``. In
``mode="value"`` a complex entry's modulus is clamped, ``z <- z * min(1, clip_val / |z|)``, which keeps its phase
(``torch.nn.utils.clip_grad_value_`` refuses complex gradients).

``mode="norm"`` uses the fixed ``tau_t = clip_val`` (plain norm clipping) and ``mode="value"`` clamps every entry
to ``[-clip_val, clip_val]``; both still track ``m`` so that the logs compare like with like.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_clip._compile import CompiledKernel
from lightning_clip._validation import check_choice, check_int, check_real

__all__ = [
    "CLIP_METRIC_KEYS",
    "NONFINITE_POLICIES",
    "ClipMode",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "NonFinite",
    "NonFinitePolicy",
    "clip_grads_",
    "clip_step_",
    "cpu_fast_path",
    "cpu_read",
    "fused_scale_grads_",
    "global_grad_norm",
    "global_max_abs",
    "is_dtensor",
    "local_tensor",
    "per_tensor_norms",
    "sum_over_shards",
    "scale_grads_",
    "window_metrics",
]

ClipMode = Literal["adaptive", "norm", "value"]
NonFinite = Literal["zero", "keep"]
#: What a step whose norm is ``inf``/``nan`` does, as the callback and the optimizer wrapper take it.
NonFinitePolicy = Literal["zero", "skip", "error"]
NONFINITE_POLICIES = ("zero", "skip", "error")
_MODES = ("adaptive", "norm", "value")

#: The per-step metrics of the clipping, in the order :func:`window_metrics` reads them.
CLIP_METRIC_KEYS = (
    "grad_norm",
    "threshold",
    "grad_norm_ema",
    "clip_coef",
    "clip_coef_min",
    "clipped_frac",
    "nonfinite_steps",
)

#: Floor of the norm in ``threshold / norm``: keeps ``0 / 0`` out without shifting any non-zero norm.
TINY = torch.finfo(torch.float32).tiny


try:  # the device types that have native multi-tensor (foreach) kernels
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    _FOREACH_DEVICES: tuple[str, ...] = tuple(_get_foreach_kernels_supported_devices())
except Exception:  # pragma: no cover - older / newer torch
    _FOREACH_DEVICES = ("cuda", "xpu")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _default_foreach(tensors: list[Tensor]) -> bool:
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


def _real_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [real_view(t) for t in tensors]


def _acc_dtype(tensors: list[Tensor]) -> torch.dtype:
    """Accumulation dtype for norms: float64 if any input is float64 (or complex128), else float32."""
    return torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) else torch.float32


def _squared_norm(grad: Tensor) -> Tensor:
    """``||grad||^2`` as a 0-d tensor, accumulated in at least float32 (``sum |z|^2`` for a complex ``grad``).

    Contiguous float32/float64 gradients go through ``torch.dot`` (a BLAS
    reduction in the gradient's own precision, about twice as fast on CPU as
    ``vector_norm``); other dtypes are upcast to float32 by ``vector_norm``.
    """
    grad = real_view(grad)
    return _squares(grad, _acc_dtype([grad]))


def _grad_norms(grads: list[Tensor], *, foreach: bool) -> list[Tensor]:
    """Per-tensor L2 norms, accumulated in at least float32 (``sqrt(sum |z|^2)`` for complex tensors)."""
    if not grads:
        return []
    grads = _real_views(grads)
    dtype = _acc_dtype(grads)
    if foreach:
        return list(torch._foreach_norm(grads, 2, dtype=dtype))
    return [torch.sqrt(_squared_norm(g)) for g in grads]


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
    local = _real_views(local)
    if foreach:
        norms = [n.to(dtype) for n in torch._foreach_norm(local, 2, dtype=_acc_dtype(local))]
        return torch.stack([n.to(local[0].device) for n in norms]).square()
    return torch.stack([_squared_norm(g).to(dtype).to(local[0].device) for g in local])


def per_tensor_norms(grads: Sequence[Tensor], *, foreach: bool | None = None) -> Tensor:
    r"""The L2 norm of each whole gradient, :math:`\lVert g_i \rVert_2`, as one float32 (float64 when a gradient
    is float64) 1-d tensor in the order of ``grads``, whatever their layout.

    A DTensor counts as the tensor it represents: the squares of its local shard are summed over the mesh
    dimensions it is sharded on (DTensor's ``Partial`` reduction), never over replicated ones. Nothing is read
    back to the host.
    """
    if not grads:
        return torch.zeros(0)
    dtype = _acc_dtype([local_tensor(g) for g in grads])
    layouts = _layouts(grads)
    device = layouts[0].local[0].device
    out = torch.zeros(len(grads), dtype=dtype, device=device)
    for layout in layouts:
        use_foreach = _default_foreach(layout.local) if foreach is None else foreach
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
        return _sharded_norm(grads, foreach=foreach)
    return _plain_norm(_real_views(grads), foreach=foreach)


def _squares(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``||grad||^2`` of a real tensor as a 0-d tensor of ``dtype`` (see :func:`_squared_norm`)."""
    if grad.dtype is dtype and grad.is_contiguous():
        flat = grad.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(grad, 2, dtype=dtype).square()


def _plain_norm(grads: list[Tensor], *, foreach: bool | None) -> Tensor:
    """:func:`global_grad_norm` of plain real tensors (complex ones passed as their real views), non-empty.

    The per-step path of the clipping on one device: one reduction per tensor and three small ops, no conversions
    (the squares are produced in the accumulation dtype).
    """
    if foreach is None:
        foreach = _default_foreach(grads)
    dtype = _acc_dtype(grads)
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


def _sharded_norm(grads: Sequence[Tensor], *, foreach: bool | None) -> Tensor:
    """:func:`global_grad_norm` when some gradients are DTensors: per layout, the local sum of squares reduced over
    the sharded mesh dimensions, then the square root of the sum over the layouts."""
    dtype = _acc_dtype([local_tensor(g) for g in grads])
    layouts = _layouts(grads)
    device = layouts[0].local[0].device
    totals = []
    for layout in layouts:
        use_foreach = _default_foreach(layout.local) if foreach is None else foreach
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
    return _reduce_rows(tensors, rows, "sum")


def _reduce_rows(tensors: Sequence[Tensor], rows: Tensor, op: str) -> Tensor:
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
    dtype = _acc_dtype([local_tensor(g) for g in grads]) if grads else torch.float32
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


#: Integer views of the float dtypes: ``bits & 0`` is ``+0.0`` whatever the float was (``nan`` and ``inf`` too),
#: and ``bits & ~0`` leaves it bit for bit, which makes zeroing a step cheaper than ``nan_to_num``.
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


#: Entries per chunk of the for-loop kernel of :func:`scale_grads_` on tensors larger than that (4 MiB of float32:
#: the multiplication's output is still in the cache when the mask reads it, and few enough chunks that the two
#: kernel launches per chunk stay cheap; measured on the transformer set's 65 MB embedding, 2^19-2^20 entries is the
#: fastest, 2^18 and one whole-tensor pass each cost about 20% more).
_CHUNK = 1 << 20


def _keep_mask(coef: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    bits = _BITS.get(dtype)
    if bits is None:
        return None
    return torch.where(coef.to(device) != 0, -1, 0).to(bits)


def _zero_where_masked_(g: Tensor, mask: Tensor | None) -> None:
    if mask is None:
        g.nan_to_num_(0.0, 0.0, 0.0)
    else:
        g.view(mask.dtype).bitwise_and_(mask)


def _scale_and_zero(grads: list[Tensor], coef: Tensor) -> None:
    for g in grads:
        g.copy_(torch.where(coef != 0, g * coef.to(g.dtype), 0.0))


_SCALE_AND_ZERO = CompiledKernel(_scale_and_zero, "clipping")


def fused_scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """``g <- c * g`` with every entry ``+0.0`` when ``c == 0``, in one ``torch.compile``-fused pass per tensor.

    The same result as :func:`scale_grads_` with ``zero_nonfinite=True`` in one read and one write of each gradient
    (the eager kernels need a second pass for the zeroing). Compiled on first use for each list of shapes and
    dtypes (tens of seconds on CPU for ~100 tensors, cached on disk by TorchInductor); worth it for long runs. Any
    number of such lists in one process (a sweep, gradual unfreezing) each compile once
    (:class:`~lightning_clip._compile.CompiledKernel`).
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, group in by_device.items():
        _SCALE_AND_ZERO(group, coef.to(device))


def scale_grads_(grads: Sequence[Tensor], coef: Tensor, *, zero_nonfinite: bool, foreach: bool | None = None) -> None:
    """Multiply every gradient in place by the 0-d tensor ``coef``; with ``zero_nonfinite``, ``coef == 0`` zeroes.

    ``zero_nonfinite`` exists because ``inf * 0 = nan``: a step whose gradients must become zeros gets ``coef = 0``,
    and the entries are then AND-ed, as integers, with an all-ones mask (``coef != 0``: the bits stay as they are)
    or an all-zeros one (every entry becomes ``+0.0``, ``nan`` and ``inf`` included). The for-loop kernel runs both
    on one tensor while it is still in the cache; ``foreach`` runs ``torch._foreach_mul_`` (faster where kernel
    launches dominate, as on CUDA) and then the masks.

    Args:
        grads: gradients to scale in place.
        coef: 0-d tensor on the gradients' device (float32 or wider); a ``bf16`` gradient times it stays ``bf16``.
        zero_nonfinite: make every entry ``+0.0`` when ``coef == 0`` (finite or not).
        foreach: ``True`` for the multi-tensor kernel, ``False`` for the for-loop, ``None`` to pick by device
            (multi-tensor where torch has native foreach kernels, as on CUDA; for-loop elsewhere).
    """
    if foreach is None:
        foreach = _default_foreach(list(grads))
    masks: dict[tuple[torch.dtype, torch.device], Tensor | None] = {}

    def mask_for(g: Tensor) -> Tensor | None:
        key = (g.dtype, g.device)
        if key not in masks:
            masks[key] = _keep_mask(coef, g.dtype, g.device)
        return masks[key]

    if foreach:
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, group in by_device.items():
            torch._foreach_mul_(group, coef.to(device))
        if zero_nonfinite:
            for g in grads:
                _zero_where_masked_(g, mask_for(g))
        return
    coefs: dict[torch.device, Tensor] = {}
    for g in grads:
        c = coefs.get(g.device)
        if c is None:
            c = coefs[g.device] = coef.to(g.device)
        mask = mask_for(g) if zero_nonfinite else None
        if mask is not None and g.numel() > _CHUNK and g.is_contiguous():
            # a tensor much larger than the cache: multiply and mask one cache-sized chunk at a time, so the mask
            # reads the chunk the multiplication just wrote (one trip to memory instead of two; same bits)
            flat = g.view(-1)
            for chunk in flat.split(_CHUNK):
                chunk.mul_(c)
                chunk.view(mask.dtype).bitwise_and_(mask)
            continue
        g.mul_(c)
        if zero_nonfinite:
            _zero_where_masked_(g, mask)


#: Whether :func:`clip_grads_` reads the clip coefficient back on CPU to skip passes that change nothing (see
#: :func:`cpu_read`). Only CPU tensors are ever read; :func:`cpu_fast_path` switches it for a block.
CPU_FAST_PATH = True


@contextlib.contextmanager
def cpu_fast_path(enabled: bool) -> Iterator[None]:
    """Turn the CPU fast path of :func:`clip_grads_` on or off for the block (restored afterwards).

    Off, CPU tensors take the path of accelerators: nothing is read back to the host. The results are bit-identical
    either way; tests switch it off to check the sync-free path with guards on ``.item()`` / ``float()``.
    """
    global CPU_FAST_PATH
    saved = CPU_FAST_PATH
    CPU_FAST_PATH = bool(enabled)
    try:
        yield
    finally:
        CPU_FAST_PATH = saved


def cpu_read(coef: Tensor, grads: Sequence[Tensor]) -> float | None:
    """The clip coefficient ``c_t`` as a Python float when the read is free, else ``None``.

    Free means: :data:`CPU_FAST_PATH` is on and ``coef`` and every gradient are CPU tensors, where ``.item()`` is a
    memory read, not a device synchronisation. The one place the clipping reads a value back on a non-logging step;
    on CUDA, MPS, XLA it always returns ``None`` (the sync-free path).
    """
    if not CPU_FAST_PATH or coef.device.type != "cpu" or any(g.device.type != "cpu" for g in grads):
        return None
    return coef.item()


def _scale_known_(
    grads: Sequence[Tensor], coef: Tensor, known: float, *, zero_nonfinite: bool, foreach: bool | None, fused: bool
) -> None:
    """:func:`scale_grads_` / :func:`fused_scale_grads_` with ``c = known`` read on the host, bit for bit the same.

    ``c == 1``: nothing (``g * 1 = g`` and the mask is all ones). ``c == 0`` with ``zero_nonfinite``: ``g <- +0.0``
    (what ``g * 0`` AND-ed with the all-zeros mask gives, ``nan`` and ``inf`` included). Otherwise, with
    ``zero_nonfinite``, the mask is all ones (``c != 0``): the multiplication alone.
    """
    if known == 1.0:
        return
    if zero_nonfinite and known == 0.0 and all(g.dtype in _BITS for g in grads):
        for g in grads:
            g.zero_()
        return
    if fused:
        fused_scale_grads_(grads, coef)
    else:
        scale_grads_(grads, coef, zero_nonfinite=zero_nonfinite and known == 0.0, foreach=foreach)


@dataclass(frozen=True)
class ClipRule:
    """The settings of one clipping rule, validated and normalised at construction.

    Numbers are stored as plain Python ``float`` / ``int`` (numpy scalars are converted), so a rule can be written to
    a checkpoint that loads with ``torch.load(weights_only=True)``.

    Args:
        mode: ``"adaptive"`` (threshold ``alpha * m_(t-1)``), ``"norm"`` (fixed threshold ``clip_val`` on the global
            norm, as ``torch.nn.utils.clip_grad_norm_``) or ``"value"`` (every entry clamped to
            ``[-clip_val, clip_val]``, as ``torch.nn.utils.clip_grad_value_``; complex entries by their modulus).
        alpha: multiple of the moving average that the norm may reach (adaptive mode), a finite number > 0.
            ``alpha < 1`` clips every step to ``alpha`` times the typical norm (aggressive clipping).
        beta: decay of the moving average of the norm, in ``[0, 1)``.
        clip_val: the fixed bound of the ``"norm"`` and ``"value"`` modes, a finite number > 0; must be ``None`` in
            adaptive mode.
        max_norm: optional absolute cap on the global norm, ``> 0`` (``inf``: no cap), applied on every step, the
            first included (adaptive mode only).
        warmup_steps: informative steps after the seeding one during which the adaptive threshold is not applied
            and the average is the bias-corrected moving average of the norms so far,
            ``m_k = sum_(i<=k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)`` (later steps weigh more); an integer
            ``>= 0``.

    Raises:
        TypeError: naming the argument and its value for a value of the wrong kind (``alpha=True``, ``beta="0.9"``,
            ``warmup_steps=2.0``).
        ValueError: naming the argument and its value when a setting is out of range or does not fit the mode.
    """

    mode: ClipMode = "adaptive"
    alpha: float = 3.8
    beta: float = 0.918
    clip_val: float | None = None
    max_norm: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        mode = check_choice("mode", self.mode, _MODES)
        alpha = check_real("alpha", self.alpha, low=0.0, low_open=True)
        beta = check_real("beta", self.beta, low=0.0, high=1.0, high_open=True)
        max_norm = check_real("max_norm", self.max_norm, low=0.0, low_open=True, finite=False, optional=True)
        warmup_steps = check_int("warmup_steps", self.warmup_steps, low=0)
        if mode == "adaptive":
            if self.clip_val is not None:
                raise ValueError(
                    f"Invalid clip_val: {self.clip_val!r}; expected None with mode='adaptive', which takes alpha and"
                    " beta (clip_val is the bound of mode='norm' and mode='value')"
                )
            clip_val = None
        else:
            if self.clip_val is None:
                raise ValueError(f"Invalid clip_val: None; expected a finite number > 0 with mode={mode!r}")
            clip_val = check_real("clip_val", self.clip_val, low=0.0, low_open=True)
            if max_norm is not None:
                raise ValueError(
                    f"Invalid max_norm: {self.max_norm!r}; expected None with mode={mode!r} (max_norm applies to"
                    " mode='adaptive' only)"
                )
        for name, value in (
            ("mode", mode),
            ("alpha", alpha),
            ("beta", beta),
            ("clip_val", clip_val),
            ("max_norm", max_norm),
            ("warmup_steps", warmup_steps),
        ):
            object.__setattr__(self, name, value)

    def threshold(self, state: ClipState) -> Tensor:
        """The bound of this step, from the state before the step (never from the current norm).

        Adaptive: ``alpha * m_(t-1)`` once ``k > warmup_steps`` finite steps were seen, else ``+inf``; then
        ``min(., max_norm)``. Norm and value modes: ``clip_val`` (a norm bound, or a per-entry bound).
        """
        if self.mode != "adaptive":
            return torch.full_like(state.ema, float(self.clip_val))  # type: ignore[arg-type]
        threshold = torch.where(state.seen > self.warmup_steps, state.ema * self.alpha, math.inf)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        return threshold


@dataclass
class ClipState:
    """Device-resident state of one rule applied to one optimizer.

    Attributes:
        ema: ``m``, the moving average of the finite pre-clip norms (float32).
        seen: ``k``, the number of finite steps seen (int64).
        steps: finite steps since the window was last reset (int64).
        clipped: steps of the window whose gradients the rule changed (int64).
        nonfinite: steps of the window whose norm was ``inf`` or ``nan`` (int64).
        coef_min: the smallest clip coefficient of the window (float32; ``1`` when nothing was clipped).
    """

    ema: Tensor
    seen: Tensor
    steps: Tensor
    clipped: Tensor
    nonfinite: Tensor
    coef_min: Tensor

    @classmethod
    def zeros(cls, device: torch.device | str | None = None) -> ClipState:
        """A fresh state on ``device``."""
        f = torch.zeros((), dtype=torch.float32, device=device)
        i = torch.zeros((), dtype=torch.int64, device=device)
        return cls(ema=f, seen=i, steps=i.clone(), clipped=i.clone(), nonfinite=i.clone(), coef_min=f + 1)

    def reset_window(self) -> None:
        """Start a new logging window."""
        self.steps.zero_()
        self.clipped.zero_()
        self.nonfinite.zero_()
        self.coef_min.fill_(1.0)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU copies, bit-exact, for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str | None = None) -> ClipState:
        """Rebuild a state saved by :meth:`state_dict` on ``device``."""
        fresh = cls.zeros(device)
        for k, v in vars(fresh).items():
            if k in state:
                v.copy_(torch.as_tensor(state[k]))
        return fresh


@dataclass
class ClipStats:
    """What one step of :func:`clip_grads_` measured and did, as 0-d device tensors.

    Attributes:
        norm: pre-clip global norm ``n_t``.
        threshold: the bound that applied (``inf`` when none did).
        coef: the post-clip to pre-clip norm ratio (``1`` when untouched, ``0`` for a zeroed step).
        clipped: whether the rule changed the gradients.
        finite: whether ``n_t`` was finite.
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    finite: Tensor


def clip_grads_(
    grads: Sequence[Tensor],
    state: ClipState,
    rule: ClipRule,
    *,
    nonfinite: NonFinite = "zero",
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool = False,
    threshold: Tensor | None = None,
    update: bool = True,
) -> ClipStats:
    """Apply ``rule`` to ``grads`` in place and advance ``state``, without a host synchronisation.

    Args:
        grads: the gradients of one optimizer (dense, non-empty).
        state: the rule's state for that optimizer, on the gradients' device.
        rule: the settings.
        nonfinite: what a step whose norm is ``inf``/``nan`` does to the gradients: ``"zero"`` makes every entry
            ``0`` (``nan`` and ``inf`` included); ``"keep"`` leaves them as they are (for callers that skip the
            step themselves, as ``GradScaler`` does). Such a step never enters the moving average nor the counts
            of steps and clipped steps.
        grad_scale: when the gradients are still multiplied by a loss scale ``S`` (fused optimizers under a
            ``GradScaler``), the 0-d tensor ``S``: the norm and threshold are compared unscaled.
        foreach: kernel choice passed to :func:`scale_grads_`.
        fused: scale (and zero) in one compiled pass (:func:`fused_scale_grads_`) instead.
        threshold: the bound to apply instead of ``rule.threshold(state)`` (norm rules only): the bound a step
            already took, for a closure optimizer's later evaluations of the same step.
        update: advance ``state`` (the average and the window's counts); ``False`` for a further evaluation of a
            step already counted.

    Returns:
        The step's :class:`ClipStats`.
    """
    originals = list(grads)
    assert originals, "clip_grads_ needs at least one gradient"
    sharded = any(is_dtensor(g) for g in originals)
    grads = _real_views(originals)  # complex entries as (Re, Im) pairs: same norm, and scaling by a real c is the same
    norm = _sharded_norm(grads, foreach=foreach) if sharded else _plain_norm(grads, foreach=foreach)
    if sharded:  # the norm is the whole model's; the scale and the clamp apply to this rank's shards
        dtensors, originals, grads = grads, [local_tensor(g) for g in originals], [local_tensor(g) for g in grads]
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm)
    finite = torch.isfinite(norm)
    if threshold is None or rule.mode == "value":
        threshold = rule.threshold(state)
    zero = nonfinite == "zero"
    if rule.mode == "value":
        bound = float(rule.clip_val)  # type: ignore[arg-type]
        if grad_scale is not None:
            raise ValueError(
                "mode='value' cannot clip gradients that are still loss-scaled (fused optimizer + GradScaler)"
            )
        real = [g for g in originals if not g.is_complex()]
        complex_grads = [g for g in originals if g.is_complex()]
        largest = global_max_abs(dtensors if sharded else originals).to(norm)  # 0 for empty tensors
        clipped = finite & (largest > bound)
        if real:
            torch._foreach_clamp_min_(real, -bound)
            torch._foreach_clamp_max_(real, bound)
        for z in complex_grads:  # |z| <= bound, phase kept
            z.mul_(torch.clamp(bound / z.abs().clamp_min(TINY), max=1.0))
        post = global_grad_norm(dtensors if sharded else grads, foreach=foreach)
        coef = torch.where(norm > 0, post / norm.clamp_min(TINY), 1.0)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        scale_grads_(grads, torch.where(finite, 1.0, coef), zero_nonfinite=zero, foreach=foreach)
    else:
        coef = (threshold / norm.clamp_min(TINY)).clamp(max=1.0)
        clipped = finite & (norm > threshold)
        coef = torch.where(finite, coef, 0.0 if zero else 1.0).to(torch.float32)
        known = cpu_read(coef, grads)
        if known is not None:  # CPU: the read is free, so skip the passes that would change nothing
            _scale_known_(grads, coef, known, zero_nonfinite=zero, foreach=foreach, fused=fused)
        elif fused:
            fused_scale_grads_(grads, coef)
        else:
            scale_grads_(grads, coef, zero_nonfinite=zero, foreach=foreach)

    if not update:
        return ClipStats(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite)
    _update_average(state, rule, norm, finite)
    state.steps.add_(finite.long())
    state.clipped.add_(clipped.long())
    state.nonfinite.add_((~finite).long())
    state.coef_min.copy_(torch.minimum(state.coef_min, torch.where(finite, coef, 1.0)))
    return ClipStats(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite)


def _update_average(state: ClipState, rule: ClipRule, norm: Tensor, finite: Tensor) -> None:
    """Advance ``(m, k)`` with the step's norm ``n``, on the device (``torch.where``, no Python branch on a tensor).

    Only an informative norm, ``0 < n < inf``, enters: ``k <- k + 1``, then ``m = n`` when ``k == 1``,
    ``m <- m + (n - m) (1 - beta) / (1 - beta^k)`` while ``k <= warmup_steps + 1`` (the bias-corrected average)
    and ``m <- beta m + (1 - beta) n`` afterwards. A zero, ``inf`` or ``nan`` norm leaves ``m`` and ``k`` as they
    are.
    """
    n = norm.to(state.ema.dtype)
    informative = finite & (n > 0)
    seen = state.seen + informative.long()  # k, this step included when it is informative
    beta = rule.beta
    averaged = state.ema * beta + n * (1.0 - beta)
    if rule.warmup_steps > 0:  # a setting, not a tensor
        weight = (1.0 - beta) / (1.0 - torch.pow(beta, seen.clamp_min(1).to(n.dtype)))
        averaged = torch.where(seen <= rule.warmup_steps + 1, state.ema + (n - state.ema) * weight, averaged)
    averaged = torch.where(seen == 1, n, averaged)
    state.ema.copy_(torch.where(informative, averaged, state.ema))
    state.seen.copy_(seen)


# --------------------------------------------------------------------------- #
# one optimizer step, as the callback and the optimizer wrapper run it
# --------------------------------------------------------------------------- #
def clip_step_(
    params: Sequence[Tensor],
    state: ClipState,
    rule: ClipRule,
    *,
    nonfinite: NonFinitePolicy = "zero",
    scaler_skips: bool = False,
    grad_scale: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool = False,
    where: str = "step 0",
    owner: str = "AdaptiveGradientClipping",
    names: Callable[[], Mapping[int, str]] | None = None,
    grads: Sequence[Tensor] | None = None,
    threshold: Tensor | None = None,
    update: bool = True,
) -> ClipStats:
    """One optimizer step of the package's clipping: :func:`clip_grads_` on ``params``' gradients, then the
    non-finite policy. The one implementation behind ``AdaptiveGradientClipping`` and ``AdaptiveClippingOptimizer``.

    With ``nonfinite="zero"`` (and under a ``GradScaler``) nothing is read back to the host: a step whose norm is
    ``inf``/``nan`` has every gradient entry set to ``0`` (or, ``scaler_skips``, left as it is for the scaler to
    skip). ``"skip"`` and ``"error"`` read ``isfinite(n_t)`` once (one host sync) and, for such a step, set every
    gradient to ``None`` (torch optimizers then leave the parameters and their state untouched) or raise.

    Args:
        params: the optimizer's parameters that have a gradient (dense, non-empty).
        state: the rule's state for that optimizer, on the gradients' device.
        rule: the settings.
        nonfinite: ``"zero"``, ``"skip"`` or ``"error"``.
        scaler_skips: a ``GradScaler`` skips non-finite steps itself: leave their gradients alone.
        grad_scale: the loss scale ``S`` when the gradients are still scaled (see :func:`clip_grads_`).
        foreach: kernel choice of :func:`scale_grads_`.
        fused: scale (and zero) in one compiled pass.
        where: the step, for the error message (``"global step 3"``).
        owner: the caller, for the error message (``"AdaptiveGradientClipping"``).
        names: called only to build an error message: ``id(parameter) -> name``.
        grads: the gradients of ``params``, one each, when they are not ``p.grad`` as it is (FSDP1 shards wrapped as
            DTensors by :class:`lightning_clip._fsdp.FlatShardLayout`); ``None``: ``[p.grad for p in params]``.
        threshold: the bound to apply instead of the rule's (see :func:`clip_grads_`).
        update: advance ``state`` (see :func:`clip_grads_`).

    Returns:
        The step's :class:`ClipStats`.

    Raises:
        RuntimeError: with ``nonfinite="error"``, on a step whose norm is not finite, naming the step and the
            parameters whose gradients are not finite (or the largest entries, when the norm overflowed). With
            sharded gradients (DTensors) every rank raises the same error: the decision comes from the global norm,
            identical on every rank, and the names from the per-tensor counts reduced over the shards.
    """
    keep = scaler_skips or nonfinite != "zero"
    grads = [p.grad for p in params] if grads is None else list(grads)
    stats = clip_grads_(
        grads,
        state,
        rule,
        nonfinite="keep" if keep else "zero",
        grad_scale=grad_scale,
        foreach=foreach,
        fused=fused,
        threshold=threshold,
        update=update,
    )
    if not scaler_skips and nonfinite != "zero" and not bool(stats.finite):  # one sync, by choice
        _apply_nonfinite_policy(params, grads, stats, nonfinite, where=where, owner=owner, names=names)
    return stats


def _apply_nonfinite_policy(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    stats: ClipStats,
    nonfinite: NonFinitePolicy,
    *,
    where: str,
    owner: str,
    names: Callable[[], Mapping[int, str]] | None,
) -> None:
    """``"skip"``: every ``p.grad = None``. ``"error"``: raise, naming the parameters with a non-finite entry on any
    rank (per tensor: the count of non-finite entries of the local shard, summed over the shards) or, when none has
    one, the three with the largest ``max |g|`` (the local maxima reduced with ``max`` over the shards). The
    reductions are collectives every rank joins in the same order (every rank gets here: ``stats.finite`` is the
    same everywhere), so every rank raises the same message."""
    if nonfinite == "error":
        known = names() if names is not None else {}
        labels = [known.get(id(p), f"<param {i}>") for i, p in enumerate(params)]
        local = [local_tensor(g) for g in grads]
        device = local[0].device
        counts = torch.stack([(~real_view(g).isfinite()).sum().to(device) for g in local])
        counts = _reduce_rows(grads, counts, "sum")
        bad = [name for name, c in zip(labels, counts.tolist()) if c > 0]
        if bad:
            raise RuntimeError(f"Non-finite gradients at {where} in: {', '.join(bad)} ({owner}(nonfinite='error'))")
        dtype = _acc_dtype(local)
        maxima = torch.stack(
            [g.abs().amax().to(dtype).to(device) if g.numel() else torch.zeros((), dtype=dtype, device=device)
             for g in local]
        )
        maxima = _reduce_rows(grads, maxima, "max").tolist()
        sizes = _reduce_rows(grads, torch.tensor([g.numel() for g in local], device=device), "sum").tolist()
        largest = sorted(((m, name) for m, name, n in zip(maxima, labels, sizes) if n), reverse=True)
        top = ", ".join(f"{name} (max |g| = {value:.3g})" for value, name in largest[:3])
        raise RuntimeError(
            f"Gradient norm overflow at {where}: every gradient entry is finite, but"
            f" the global norm overflowed to {float(stats.norm)} in {stats.norm.dtype} (it is accumulated in"
            f" float32 for float32 and lower-precision gradients). The largest entries are in: {top}"
            f" ({owner}(nonfinite='error'))"
        )
    for p in params:
        p.grad = None


def window_metrics(stats: ClipStats, state: ClipState) -> dict[str, float]:
    """The metrics of :data:`CLIP_METRIC_KEYS` for the last step and the window since the last read, as floats;
    then starts a new window. One host sync (the one of a logging step).

    ``grad_norm`` ``n_t``, ``threshold`` (``inf`` on a step with no bound: the seeding step, the warm-up),
    ``grad_norm_ema`` ``m_t``, ``clip_coef`` ``c_t``, ``clip_coef_min`` (smallest ``c`` of the window),
    ``clipped_frac`` (clipped / finite steps of the window), ``nonfinite_steps``. Every value is returned, ``inf``
    and ``nan`` included (TensorBoard draws no point for them): a margin chart needs its value, lower and upper
    series at the same steps.
    """
    values = torch.stack(
        [
            stats.norm.float(),
            stats.threshold.float(),
            state.ema.float(),
            stats.coef.float(),
            state.coef_min.float(),
            state.clipped.float() / state.steps.clamp_min(1).float(),
            state.nonfinite.float(),
        ]
    ).tolist()
    state.reset_window()
    return dict(zip(CLIP_METRIC_KEYS, values))
