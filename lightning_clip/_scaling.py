"""The clipping's scaling kernels: multiply the gradients by a 0-d coefficient in place, without a host read.

:func:`scale_` is the entry point; the kernels behind it are the for-loop (one tensor at a time, chunked for tensors
larger than the cache), the multi-tensor (``torch._foreach_mul_``), the compiled one (one fused pass per tensor,
:class:`~lightning_clip._compile.CompiledKernel`) and, on CPU only, the host-known coefficient (:func:`cpu_read`).
A coefficient of ``0`` zeroes a step whose norm was not finite: since ``inf * 0 = nan``, the zeroing AND-s the bits
of each entry with a mask instead. Imports torch only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lightning_clip._compile import CompiledKernel
from lightning_clip.norms import default_foreach

__all__ = ["cpu_fast_path", "cpu_read", "fused_scale_grads_", "scale_", "scale_grads_"]


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
        foreach = default_foreach(list(grads))
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


#: Whether :func:`scale_` may read the coefficient back when it and the gradients are CPU tensors (a context
#: variable: :func:`cpu_fast_path` switches it for a block, in this thread or task only).
_CPU_FAST_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_clip_cpu_fast_path", default=True)


@contextlib.contextmanager
def cpu_fast_path(enabled: bool) -> Iterator[None]:
    """Turn the CPU fast path of :func:`scale_` on or off for the block (restored afterwards).

    Off, CPU tensors take the path of accelerators: nothing is read back to the host. The results are bit-identical
    either way; tests switch it off to check the sync-free path with guards on ``.item()`` / ``float()``.
    """
    token = _CPU_FAST_PATH.set(bool(enabled))
    try:
        yield
    finally:
        _CPU_FAST_PATH.reset(token)


def cpu_read(coef: Tensor, grads: Sequence[Tensor]) -> float | None:
    """The clip coefficient ``c_t`` as a Python float when the read is free, else ``None``.

    Free means: the fast path is on (:func:`cpu_fast_path`) and ``coef`` and every gradient are CPU tensors, where
    ``.item()`` is a memory read, not a device synchronisation. The one place the clipping reads a value back on a
    non-logging step; on CUDA, MPS, XLA it always returns ``None`` (the sync-free path).
    """
    if not _CPU_FAST_PATH.get() or coef.device.type != "cpu" or any(g.device.type != "cpu" for g in grads):
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


def scale_(
    grads: Sequence[Tensor], coef: Tensor, *, zero_nonfinite: bool, foreach: bool | None = None, fused: bool = False
) -> None:
    """``g <- c * g`` for every gradient, with every entry ``+0.0`` when ``c == 0`` and ``zero_nonfinite``: the one
    entry point of the clipping's multiplication.

    Where reading ``c`` is free (CPU tensors, :func:`cpu_read`), a pass that changes nothing is skipped (``c == 1``)
    and a zeroed step is a ``zero_()``; elsewhere (CUDA, MPS, XLA) nothing is read back: :func:`fused_scale_grads_`
    with ``fused``, else :func:`scale_grads_` with the ``foreach`` choice. Every path gives the same bits.
    """
    known = cpu_read(coef, grads)
    if known is not None:
        _scale_known_(grads, coef, known, zero_nonfinite=zero_nonfinite, foreach=foreach, fused=fused)
    elif fused:
        fused_scale_grads_(grads, coef)
    else:
        scale_grads_(grads, coef, zero_nonfinite=zero_nonfinite, foreach=foreach)

