"""torch's generic optimizer tests, run against the package's optimizers.

PyTorch checks every ``torch.optim`` optimizer with one set of generic tests (``TestOptimRenewed`` in pytorch's
``test/test_optim.py``), driven by one record per optimizer (``OptimizerInfo`` in
``torch.testing._internal.common_optimizers``): the configurations to run (``OptimizerInput``), the ones that must
fail and how (``ErrorOptimizerInput``), the kernels it has (``supported_impls``: foreach, fused, differentiable) and
what it supports (complex, sparse, ...). This module writes such records for

* :class:`~lightning_clip.SmoothedSignSGD` and :class:`~lightning_clip.SmoothedNormSGD`,
* :class:`~lightning_clip.AdaptiveClippingOptimizer` around ``torch.optim.SGD`` and around ``torch.optim.Adam``
  (the wrapper takes an optimizer, not parameters: :class:`Clipped` builds it from parameters and one set of keyword
  arguments, the clipping's own to the wrapper, the rest to the wrapped optimizer, ``foreach``/``fused`` to both),

and runs the generic tests on them with pytest. Each test compares with a value obtained independently: the same
optimizer run another way (for-loop against foreach or fused kernels, eager against ``torch.compile``, resumed from a
state dict against uninterrupted, complex parameters against their real view), a float64 reference written here, or
torch's own behaviour.

The records. ``torch.testing._internal.common_optimizers`` imports ``torch.testing._internal.common_utils``, which
needs ``expecttest`` (not a dependency of this project) and, once imported, changes the whole process (it turns off
setting ``torch.backends`` flags, wraps TorchScript calls, parses ``sys.argv``). So the records here are small classes
with the same names and fields as torch's (the fields these tests read), and one test rebuilds them as torch's own
``OptimizerInfo`` in a separate process and expands them with torch's helper; that test is skipped where torch's
module does not import. The module is skipped when the installed torch has no ``common_optimizers`` at all.

Generic tests that apply (by torch's name; ``test_`` dropped):

* ``optim_infos_do_not_specify_global_cliquey_kwargs``: the configurations leave foreach/fused to the tests.
* ``errors``: construction errors (the package's messages for every argument, torch's for the parameters) and step
  errors (sparse gradients, ``nonfinite="error"``).
* ``forloop_goes_right_direction`` (contiguous or not, with and without lr schedulers) and
  ``param_group_with_lrscheduler_goes_right_direction``; also, added here, the for-loop kernel against a float64
  reference (the wrapper: the clipping rule written out, then the wrapped optimizer in float64, with a non-finite
  step for each ``nonfinite`` policy).
* ``tensor_lr``: the wrapper runs with a tensor lr as with the float (or gets torch's own refusal: Adam with
  ``foreach=True``); the smoothed optimizers refuse a tensor lr with their ``Invalid lr`` message (a float lr reaches
  their fused kernel as a tensor already).
* ``complex`` and ``complex_2d``: SmoothedNormSGD and the wrapper move a complex parameter as its real view
  (``complex_2d``: with a global norm only; a per-tensor norm changes when a parameter is split in two). Where that
  does not hold by design, the complex run is checked against the float64 reference instead: SmoothedSignSGD takes
  the complex sign ``z / |z|``, not the signs of the real and imaginary parts; SmoothedNormSGD's ``"rms"`` counts
  complex entries (a real view has twice as many); the wrapper's value mode bounds ``|z|``.
* ``foreach_matches_forloop`` (float64; an extra 0-d parameter, a step without gradients, a layer frozen for two
  steps), ``fused_matches_forloop`` on CPU (the fused kernels are ``torch.compile``-generated; every configuration,
  float64) and ``mixed_device_dtype`` on one device (float64, float32 and bfloat16 parameters together, foreach and
  fused). Each new configuration of a fused kernel is a compilation, so the other generic tests run ``fused=True``
  on each entry's default configuration only (foreach on every one).
* ``param_groups_weight_decay``, ``param_groups_lr``, ``step_is_noop_when_params_have_no_grad``,
  ``step_is_noop_for_zero_grads``, ``optimizer_can_be_printed``, ``non_empty_state`` (the wrapper: the state is the
  wrapped optimizer's own, compared with that optimizer run alone).
* ``state_dict_deterministic`` (with and without parameter names; mixed naming in
  ``can_load_from_to_named_state_dict``), ``can_load_older_state_dict`` (flags missing from an old checkpoint take
  their defaults: the run continues as one that saved the defaults), ``can_load_from_to_named_state_dict``,
  ``save_load_equality_with_weights_only``, ``load_nontensor_step``.
* ``state_dict_pre_hook``, ``state_dict_post_hook``, ``state_dict_pre_post_hook``,
  ``load_state_dict_pre_hook_and_prepend``, ``load_state_dict_post_hook``, ``load_state_dict_pre_post_hook``.
* ``step_pre_hook``, ``step_post_hook``, ``step_all_hooks`` (with ``register_optimizer_step_pre_hook`` /
  ``_post_hook``: each hook once per step, in torch's order). The hook tests run each entry's default configuration
  with each kernel (hooks do not depend on the hyper-parameters).
* ``deepcopy_copies_all_public_attrs``; added here: deepcopy and pickle after an lr scheduler was attached (the copy
  steps its own parameters, as the original would).
* ``defaults_changed_to_foreach``, turned around for CPU: the default kernel there is the for-loop one.
* From torch's compiled-optimizer tests (``test/inductor/test_compiled_optimizers.py``): ``torch.compile(opt.step)``
  against the eager step (a few configurations, tiny tensors, three steps).
* Added here from the brief of the generic tests: zero-size parameters next to others, ``zero_grad``,
  ``add_param_group`` mid-run, ``maximize`` against minimising the negated loss, an lr scheduler against setting
  ``lr`` by hand.

Generic tests that do not apply, and why:

* ``differentiable`` (``TestDifferentiableOptimizer``, gradcheck through ``step``): the kernels update in place under
  ``no_grad``; the constructors have no ``differentiable`` argument (an error input checks the refusal).
* ``capturable`` and every CUDA-graph test: CUDA only, and the step counts are Python ints, not device tensors.
* sparse gradients (``rosenbrock_sparse``): not supported; the step raises (error inputs).
* ``forloop_goes_right_direction_multigpu``, ``mixed_device_dtype`` across devices, ``state_dict_with_cuda_params``,
  ``cpu_load_state_dict``, ``fused_cpu_matches_cuda``, ``set_default_dtype_works_with_foreach`` (CUDA step dtype),
  ``peak_memory_foreach`` (CUDA allocator), the foreach-by-default check on CUDA: need a GPU (none here). Fused on CUDA
  likewise; fused is checked on CPU.
* ``foreach_large_tensor`` / ``fused_large_tensor``: 2**32-entry tensors, 64-72 GB; the chunking of large tensors is
  tested in ``tests/test_optim.py``.
* ``fused_does_not_step_if_foundinf`` and the ``grad_scale``/``found_inf`` protocol: the optimizers do not take
  part in ``GradScaler``'s fused unscaling (no ``_step_supports_amp_scaling``), so the scaler unscales and skips
  itself.
* ``fused_error_on_params_on_meta``: the fused kernels are compiled, not hand-written kernels that check dtypes.
* ``second_order_optims_return_consistent_types``: no closure-driven (LBFGS-like) optimizer here; the wrapper does
  not support LBFGS.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any
from unittest import mock

import pytest
import torch
from torch.nn import Parameter
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

if importlib.util.find_spec("torch.testing._internal.common_optimizers") is None:  # pragma: no cover
    pytest.skip(
        f"torch {torch.__version__} ships no torch.testing._internal.common_optimizers: the generic optimizer tests"
        " follow its records",
        allow_module_level=True,
    )

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lightning_clip.optim.norm_sgd as norm_sgd_module
import lightning_clip.optim.sign_sgd as sign_sgd_module
from lightning_clip import AdaptiveClippingOptimizer, SmoothedNormSGD, SmoothedSignSGD

F64 = torch.float64


# ============================================================================================== the records
class OptimizerInput:
    """torch's ``OptimizerInput``: keyword arguments of one configuration (``params`` for error inputs only)."""

    __slots__ = ["desc", "kwargs", "params"]

    def __init__(self, params: Any, kwargs: dict[str, Any], desc: str = "") -> None:
        self.params, self.kwargs, self.desc = params, kwargs, desc

    def __repr__(self) -> str:
        return f"params={self.params}, kwargs={self.kwargs}, desc={self.desc}"


class OptimizerErrorEnum(Enum):
    """torch's: when the error is raised."""

    CONSTRUCTION_ERROR = 0
    STEP_ERROR = 1


class ErrorOptimizerInput:
    """torch's ``ErrorOptimizerInput``: a configuration that fails, with the error's type and a regex of its message
    (a ``Warning`` type: the warning that must be emitted)."""

    __slots__ = ["error_on", "error_regex", "error_type", "optimizer_error_input"]

    def __init__(
        self,
        optimizer_error_input: OptimizerInput,
        *,
        error_on: OptimizerErrorEnum = OptimizerErrorEnum.CONSTRUCTION_ERROR,
        error_type: type = RuntimeError,
        error_regex: str = "",
    ) -> None:
        self.optimizer_error_input = optimizer_error_input
        self.error_on, self.error_type, self.error_regex = error_on, error_type, error_regex


class OptimizerInfo:
    """torch's ``OptimizerInfo``, with the fields the tests here read (same names, same meanings), plus:

    ``reference``: ``(kwargs, params) -> step(grads)``, a float64 implementation of the update;
    ``complex_as_real_view``: ``kwargs -> bool``, whether a complex parameter moves as its real view.
    """

    def __init__(
        self,
        optim_cls: Callable[..., Optimizer],
        *,
        optim_inputs_func: Callable[..., list[OptimizerInput]],
        optim_error_inputs_func: Callable[..., list[ErrorOptimizerInput]] | None = None,
        scheduler_inputs: tuple = (
            [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
            [lambda opt: ReduceLROnPlateau(opt)],
        ),
        supported_impls: tuple[str, ...] = ("foreach", "differentiable"),
        not_og_supported_flags: tuple[str, ...] = ("foreach", "differentiable", "maximize", "capturable"),
        supports_sparse: bool = False,
        supports_complex: bool = True,
        step_requires_closure: bool = False,
        supports_fused_on: tuple[str, ...] = (),
        reference: Callable[..., Callable[[list[torch.Tensor]], None]] | None = None,
        complex_as_real_view: Callable[[dict[str, Any]], bool] = lambda kwargs: True,
    ) -> None:
        self.optim_cls = optim_cls
        self.optim_inputs_func = optim_inputs_func
        self.optim_error_inputs_func = optim_error_inputs_func
        self.scheduler_inputs = scheduler_inputs
        self.supported_impls = supported_impls
        self.not_og_supported_flags = not_og_supported_flags
        self.supports_sparse = supports_sparse
        self.supports_complex = supports_complex
        self.step_requires_closure = step_requires_closure
        self.supports_fused_on = supports_fused_on
        self.reference = reference
        self.complex_as_real_view = complex_as_real_view

    @property
    def name(self) -> str:
        return self.optim_cls.__name__


def optim_inputs_with_kernel_flags(
    device: str, info: OptimizerInfo, skip: tuple[str, ...] = ()
) -> list[OptimizerInput]:
    """torch's ``_get_optim_inputs_including_global_cliquey_kwargs``: each configuration with every supported kernel
    flag ``False``, then once with each flag ``True`` (the flags exclude one another)."""
    impls = [
        flag
        for flag in info.supported_impls
        if flag not in skip and (flag != "fused" or torch.device(device).type in info.supports_fused_on)
    ]
    out = []
    for optim_input in info.optim_inputs_func(device=device):
        base = copy.deepcopy(optim_input.kwargs)
        base.update({flag: False for flag in impls})
        out.append(OptimizerInput(None, base, optim_input.desc))
        for flag in impls:
            out.append(OptimizerInput(None, {**copy.deepcopy(base), flag: True}, f"{optim_input.desc} & {flag}"))
    return out


# ============================================================================ the wrapper as an optimizer class
class Clipped:
    """``AdaptiveClippingOptimizer(inner(params, **rest), **clipping)`` from ``(params, **kwargs)``: the clipping's
    arguments go to the wrapper, ``foreach`` and ``fused`` to the wrapper and to ``inner``, the rest to ``inner``."""

    CLIP_KEYS = ("alpha", "beta", "mode", "clip_val", "max_norm", "warmup_steps", "nonfinite")
    KERNEL_KEYS = ("foreach", "fused")

    def __init__(self, inner: type[Optimizer]) -> None:
        self.inner = inner
        self.__name__ = f"AdaptiveClippingOptimizer({inner.__name__})"

    def split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(wrapper's, inner's)`` keyword arguments."""
        clip = {k: v for k, v in kwargs.items() if k in self.CLIP_KEYS or k in self.KERNEL_KEYS}
        inner = {k: v for k, v in kwargs.items() if k not in self.CLIP_KEYS}
        return clip, inner

    def __call__(self, params: Any, **kwargs: Any) -> AdaptiveClippingOptimizer:
        clip, inner = self.split(kwargs)
        return AdaptiveClippingOptimizer(self.inner(params, **inner), **clip)


def split_for_groups(info: OptimizerInfo, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(per-group, constructor)`` parts of ``kwargs``: everything is a per-group setting of the smoothed
    optimizers; the wrapper's clipping settings (and the kernel flags) are the wrapper's, not a group's."""
    if isinstance(info.optim_cls, Clipped):
        clip, inner = info.optim_cls.split(kwargs)
        return {k: v for k, v in inner.items() if k not in Clipped.KERNEL_KEYS}, clip
    return dict(kwargs), {}


def constructor_defaults(info: OptimizerInfo) -> dict[str, Any]:
    """The per-group defaults of the optimizer (the wrapped one's for the wrapper)."""
    cls = info.optim_cls.inner if isinstance(info.optim_cls, Clipped) else info.optim_cls
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# ==================================================================================== float64 references
def _sgn(g: torch.Tensor) -> torch.Tensor:
    if g.is_complex():
        mod = g.abs()
        return torch.where(mod > 0, g / torch.where(mod > 0, mod, 1.0), 0.0)
    return (g > 0).to(g.dtype) - (g < 0).to(g.dtype)


def smoothed_reference(kind: str) -> Callable[..., Callable[[list[torch.Tensor]], None]]:
    """Definitions 1 and 2 with every option, on float64 (complex128) copies, written from the docstrings."""

    def build(kwargs: dict[str, Any], params: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], None]:
        cls = SmoothedSignSGD if kind == "sign" else SmoothedNormSGD
        o = {**constructor_defaults_of(cls), **kwargs}
        bufs = [torch.zeros_like(p) for p in params]
        counts = [0 for _ in params]

        def step(grads: list[torch.Tensor | None]) -> None:
            live = [i for i, g in enumerate(grads) if g is not None]
            signed = {i: (-grads[i] if o["maximize"] else grads[i]) for i in live}
            total = math.sqrt(sum(float(signed[i].abs().square().sum()) for i in live))
            for i in live:
                g = signed[i]
                if kind == "sign":
                    d = _sgn(g)
                else:
                    n2 = float(g.abs().square().sum())
                    n = {"global": total, "tensor": math.sqrt(n2), "rms": math.sqrt(n2 / max(g.numel(), 1))}
                    d = g / max(n[o["norm"]], o["eps"])
                params[i].mul_(1.0 - o["lr"] * o["weight_decay"])
                bufs[i] = o["beta"] * bufs[i] + (1.0 - o["beta"]) * d
                counts[i] += 1
                m_hat = bufs[i] / (1.0 - o["beta"] ** counts[i]) if o["bias_correction"] else bufs[i]
                params[i].sub_(o["lr"] * m_hat)

        return step

    return build


def constructor_defaults_of(cls: type) -> dict[str, Any]:
    return {
        n: p.default
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def clipped_reference(inner: type[Optimizer]) -> Callable[..., Callable[[list[torch.Tensor]], None]]:
    """The wrapper's rule written out on float64 gradients, then ``inner`` itself on float64 copies: threshold
    ``alpha * m`` (after ``warmup_steps`` informative steps; none on the seeding step), capped by ``max_norm``;
    ``m`` the bias-corrected average over the warm-up and the moving average after it, of the informative norms
    ``0 < n < inf``; a non-finite step zeroes the gradients (``"zero"``) or leaves the parameters alone
    (``"skip"``)."""

    def build(kwargs: dict[str, Any], params: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], None]:
        clip, rest = Clipped(inner).split(kwargs)
        rule = {**constructor_defaults_of(AdaptiveClippingOptimizer), **clip}
        tensors = [p.requires_grad_() for p in params]
        opt = inner(tensors, **rest)
        avg = {"m": 0.0, "k": 0}

        def step(grads: list[torch.Tensor | None]) -> None:
            live = [g.clone() if g is not None else None for g in grads]
            present = [g for g in live if g is not None]
            n = math.sqrt(sum(float(g.abs().square().sum()) for g in present))
            finite = math.isfinite(n)
            if rule["mode"] == "value":  # entries clamped to [-c, c]; complex ones to |z| <= c, the phase kept
                c = rule["clip_val"]
                for g in present:
                    if g.is_complex():
                        g.mul_(torch.clamp(c / g.abs().clamp_min(1e-300), max=1.0))
                    else:
                        g.clamp_(-c, c)
            else:
                if rule["mode"] == "norm":
                    bound = rule["clip_val"]
                else:
                    bound = rule["alpha"] * avg["m"] if avg["k"] > rule["warmup_steps"] else math.inf
                    if rule["max_norm"] is not None:
                        bound = min(bound, rule["max_norm"])
                if finite and n > bound:
                    for g in present:
                        g.mul_(bound / n)
            if not finite:
                if rule["nonfinite"] == "skip":
                    live = [None for _ in live]
                else:
                    live = [torch.zeros_like(g) if g is not None else None for g in live]
            if finite and n > 0:
                avg["k"] += 1
                k, beta = avg["k"], rule["beta"]
                if k <= rule["warmup_steps"] + 1:
                    avg["m"] += (n - avg["m"]) * (1.0 - beta) / (1.0 - beta**k)
                else:
                    avg["m"] = beta * avg["m"] + (1.0 - beta) * n
            for p, g in zip(tensors, live):
                p.grad = g
            opt.step()

        return step

    return build


# ========================================================================================= configurations
def optim_inputs_func_smoothed_sign(device: str = "cpu", dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(None, {}, "default"),
        OptimizerInput(None, {"lr": 1e-2}, "non-default lr"),
        OptimizerInput(None, {"beta": 0.0}, "beta=0 (plain SignSGD)"),
        OptimizerInput(None, {"beta": 0.5}, "beta"),
        OptimizerInput(None, {"weight_decay": 0.1}, "weight_decay"),
        OptimizerInput(None, {"maximize": True}, "maximize"),
        OptimizerInput(None, {"maximize": True, "weight_decay": 0.1}, "maximize, weight_decay"),
        OptimizerInput(None, {"bias_correction": True}, "bias_correction"),
        OptimizerInput(
            None, {"bias_correction": True, "beta": 0.5, "weight_decay": 0.1, "lr": 1e-2}, "bias_correction, beta, wd"
        ),
    ]


def optim_inputs_func_smoothed_norm(device: str = "cpu", dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(None, {}, "default (global norm)"),
        OptimizerInput(None, {"norm": "tensor"}, "tensor norm"),
        OptimizerInput(None, {"norm": "rms", "lr": 1e-2}, "rms norm"),
        OptimizerInput(None, {"norm": "tensor", "eps": 10.0}, "eps floor active"),
        OptimizerInput(None, {"beta": 0.0, "weight_decay": 0.1}, "beta=0, weight_decay"),
        OptimizerInput(None, {"maximize": True, "weight_decay": 0.1}, "maximize, weight_decay"),
        OptimizerInput(None, {"bias_correction": True}, "bias_correction"),
        OptimizerInput(None, {"bias_correction": True, "norm": "rms", "beta": 0.5}, "bias_correction, rms, beta"),
        OptimizerInput(None, {"maximize": True, "norm": "tensor", "lr": 1e-2}, "maximize, tensor norm"),
    ]


def optim_inputs_func_clipped_sgd(device: str = "cpu", dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(None, {}, "default"),
        OptimizerInput(None, {"alpha": 0.5, "beta": 0.5, "lr": 1e-2}, "aggressive adaptive"),
        OptimizerInput(None, {"max_norm": 0.1, "momentum": 0.9}, "max_norm cap, momentum"),
        OptimizerInput(None, {"mode": "norm", "clip_val": 0.5}, "mode=norm"),
        OptimizerInput(None, {"mode": "value", "clip_val": 0.05, "lr": 1e-2}, "mode=value"),
        OptimizerInput(None, {"warmup_steps": 2, "alpha": 0.8, "momentum": 0.5}, "warmup_steps"),
        OptimizerInput(None, {"nonfinite": "skip", "alpha": 0.5, "momentum": 0.9}, "nonfinite=skip"),
        OptimizerInput(None, {"nonfinite": "error", "max_norm": 1.0}, "nonfinite=error"),
        OptimizerInput(None, {"momentum": 0.9, "weight_decay": 0.1, "nesterov": True}, "inner nesterov, wd"),
        OptimizerInput(None, {"maximize": True, "momentum": 0.9, "alpha": 0.5}, "inner maximize"),
        OptimizerInput(None, {"lr": torch.tensor(1e-3), "alpha": 0.5}, "inner tensor lr"),
    ]


def optim_inputs_func_clipped_adam(device: str = "cpu", dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(None, {}, "default"),
        OptimizerInput(None, {"amsgrad": True, "weight_decay": 0.1, "alpha": 0.5}, "amsgrad, wd, alpha"),
        OptimizerInput(None, {"mode": "norm", "clip_val": 0.5, "maximize": True}, "mode=norm, maximize"),
        OptimizerInput(None, {"max_norm": 0.2, "warmup_steps": 1, "nonfinite": "skip"}, "max_norm, warmup, skip"),
    ]


def _sample_params(device: str, dtype: torch.dtype) -> tuple[Parameter, Parameter]:
    return Parameter(torch.randn(1, 1, device=device, dtype=dtype)), Parameter(
        torch.randn(1, 1, device=device, dtype=dtype)
    )


def _with_grads(*params: torch.Tensor, grad: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        p.grad = grad(p)
    return list(params)


def error_inputs_for_all(device: str, dtype: torch.dtype, tensor_lr: tuple[type, str]) -> list[ErrorOptimizerInput]:
    """torch's ``get_error_inputs_for_all_optims``: what ``torch.optim.Optimizer`` itself refuses."""
    p, q = _sample_params(device, dtype)
    E = ErrorOptimizerInput
    return [
        E(OptimizerInput(p, {}, "invalid param type"), error_type=TypeError,
          error_regex="params argument given to the optimizer should be an iterable of Tensors or dicts"),
        E(OptimizerInput([p, p], {}, "a param group cannot have duplicate parameters"), error_type=UserWarning,
          error_regex=".*a parameter group with duplicate parameters.*"),
        E(OptimizerInput([{"params": p}, {"params": p}], {}, "duplicate parameters across groups"),
          error_type=ValueError, error_regex="some parameters appear in more than one parameter group"),
        E(OptimizerInput(None, {"lr": torch.tensor([0.001, 0.001])}, "Tensor lr must be 1-element"),
          error_type=tensor_lr[0], error_regex=tensor_lr[1]),
        E(OptimizerInput([("weight", p), q], {}, "all params with or without names"), error_type=ValueError,
          error_regex="all optimizer params should be with/without names. Some param names are missing"),
        E(OptimizerInput([{"params": [p], "lr": 1e-2}, {"params": [("weight", q)]}], {}, "groups with/without names"),
          error_type=ValueError,
          error_regex="all optimizer param groups should be with/without names. "
          "cannot add param group with names to the optimizer"),
    ]  # fmt: skip


def optim_error_inputs_func_smoothed(name: str) -> Callable[..., list[ErrorOptimizerInput]]:
    def errors(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
        E, V, T = ErrorOptimizerInput, ValueError, TypeError
        out = error_inputs_for_all(device, dtype, (TypeError, r"Invalid lr: tensor\(\[0\.0010, 0\.0010\]\)"))
        p, q = _sample_params(device, dtype)
        sparse = _with_grads(*_sample_params(device, dtype), grad=lambda t: torch.zeros_like(t).to_sparse())
        out += [
            E(OptimizerInput(None, {"lr": -0.1}, "negative lr"), error_type=V,
              error_regex=r"^Invalid lr: -0\.1; expected a finite number >= 0$"),
            E(OptimizerInput(None, {"lr": math.nan}, "nan lr"), error_type=V, error_regex=r"^Invalid lr: nan;"),
            E(OptimizerInput(None, {"lr": math.inf}, "inf lr"), error_type=V, error_regex=r"^Invalid lr: inf;"),
            E(OptimizerInput(None, {"lr": "0.1"}, "string lr"), error_type=T, error_regex=r"^Invalid lr: '0\.1';"),
            E(OptimizerInput(None, {"lr": True}, "bool lr"), error_type=T, error_regex=r"^Invalid lr: True;"),
            E(OptimizerInput(None, {"lr": torch.tensor(1e-3)}, "tensor lr"), error_type=T,
              error_regex=r"^Invalid lr: tensor\(0\.0010\); expected a finite number >= 0$"),
            E(OptimizerInput(None, {"beta": 1.0}, "beta=1"), error_type=V,
              error_regex=r"^Invalid beta: 1\.0; expected a finite number in \[0, 1\)$"),
            E(OptimizerInput(None, {"beta": -0.1}, "negative beta"), error_type=V, error_regex=r"^Invalid beta: -0\.1;"),
            E(OptimizerInput(None, {"weight_decay": -0.1}, "negative weight_decay"), error_type=V,
              error_regex=r"^Invalid weight_decay: -0\.1; expected a finite number >= 0$"),
            E(OptimizerInput(None, {"bias_correction": "no"}, "string flag"), error_type=T,
              error_regex=r"^Invalid bias_correction: 'no'; expected True or False$"),
            E(OptimizerInput(None, {"maximize": 1}, "int flag"), error_type=T,
              error_regex=r"^Invalid maximize: 1; expected True or False$"),
            E(OptimizerInput(None, {"foreach": 1}, "int foreach"), error_type=T,
              error_regex=r"^Invalid foreach: 1; expected None, True or False$"),
            E(OptimizerInput(None, {"fused": True, "foreach": True}, "fused with foreach"), error_type=V,
              error_regex=r"^Invalid fused: True; expected fused=False with foreach=True"),
            E(OptimizerInput([{"params": [p]}, {"params": [q], "lr": -1.0}], {}, "group lr"), error_type=V,
              error_regex=r"^Invalid lr of param group 1: -1\.0; expected a finite number >= 0$"),
            E(OptimizerInput([{"params": [p], "beta": 1.5}], {}, "group beta"), error_type=V,
              error_regex=r"^Invalid beta of param group 0: 1\.5;"),
            E(OptimizerInput(None, {"differentiable": True}, "differentiable"), error_type=T,
              error_regex="unexpected keyword argument 'differentiable'"),
            E(OptimizerInput(None, {"capturable": True}, "capturable"), error_type=T,
              error_regex="unexpected keyword argument 'capturable'"),
            E(OptimizerInput(sparse, {}, "sparse gradients"), error_on=OptimizerErrorEnum.STEP_ERROR,
              error_type=RuntimeError, error_regex=f"^{name} does not support sparse gradients"),
        ]  # fmt: skip
        if name == "SmoothedNormSGD":
            out += [
                E(OptimizerInput(None, {"norm": "spectral"}, "unknown norm"), error_type=V,
                  error_regex=r"^Invalid norm: 'spectral'; expected one of \('global', 'tensor', 'rms'\)$"),
                E(OptimizerInput(None, {"norm": None}, "norm None"), error_type=T, error_regex=r"^Invalid norm: None;"),
                E(OptimizerInput(None, {"eps": 0.0}, "eps=0"), error_type=V,
                  error_regex=r"^Invalid eps: 0\.0; expected a finite number > 0$"),
                E(OptimizerInput(None, {"eps": math.inf}, "eps=inf"), error_type=V, error_regex=r"^Invalid eps: inf;"),
            ]  # fmt: skip
        return out

    return errors


def optim_error_inputs_func_clipped(inner: type[Optimizer]) -> Callable[..., list[ErrorOptimizerInput]]:
    def errors(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
        E, V, T = ErrorOptimizerInput, ValueError, TypeError
        out = error_inputs_for_all(device, dtype, (ValueError, "Tensor lr must be 1-element"))
        sparse = _with_grads(*_sample_params(device, dtype), grad=lambda t: torch.zeros_like(t).to_sparse())
        nan = _with_grads(*_sample_params(device, dtype), grad=lambda t: torch.full_like(t, math.nan))
        out += [
            E(OptimizerInput(None, {"alpha": 0.0}, "alpha=0"), error_type=V,
              error_regex=r"^Invalid alpha: 0\.0; expected a finite number > 0$"),
            E(OptimizerInput(None, {"alpha": True}, "bool alpha"), error_type=T, error_regex=r"^Invalid alpha: True;"),
            E(OptimizerInput(None, {"alpha": math.inf}, "inf alpha"), error_type=V, error_regex=r"^Invalid alpha: inf;"),
            E(OptimizerInput(None, {"beta": 1.0}, "beta=1"), error_type=V,
              error_regex=r"^Invalid beta: 1\.0; expected a finite number in \[0, 1\)$"),
            E(OptimizerInput(None, {"beta": "0.9"}, "string beta"), error_type=T, error_regex=r"^Invalid beta: '0\.9';"),
            E(OptimizerInput(None, {"mode": "bogus"}, "unknown mode"), error_type=V,
              error_regex=r"^Invalid mode: 'bogus'; expected one of \('adaptive', 'norm', 'value'\)$"),
            E(OptimizerInput(None, {"clip_val": 1.0}, "clip_val in adaptive mode"), error_type=V,
              error_regex=r"^Invalid clip_val: 1\.0; expected None with mode='adaptive'"),
            E(OptimizerInput(None, {"mode": "norm"}, "norm mode without clip_val"), error_type=V,
              error_regex=r"^Invalid clip_val: None; expected a finite number > 0 with mode='norm'$"),
            E(OptimizerInput(None, {"mode": "value", "clip_val": -1.0}, "negative clip_val"), error_type=V,
              error_regex=r"^Invalid clip_val: -1\.0; expected a finite number > 0$"),
            E(OptimizerInput(None, {"mode": "norm", "clip_val": 1.0, "max_norm": 1.0}, "max_norm in norm mode"),
              error_type=V, error_regex=r"^Invalid max_norm: 1\.0; expected None with mode='norm'"),
            E(OptimizerInput(None, {"max_norm": 0.0}, "max_norm=0"), error_type=V,
              error_regex=r"^Invalid max_norm: 0\.0; expected None or a number > 0$"),
            E(OptimizerInput(None, {"warmup_steps": -1}, "negative warmup"), error_type=V,
              error_regex=r"^Invalid warmup_steps: -1; expected an integer >= 0$"),
            E(OptimizerInput(None, {"warmup_steps": 2.0}, "float warmup"), error_type=T,
              error_regex=r"^Invalid warmup_steps: 2\.0; expected an integer >= 0$"),
            E(OptimizerInput(None, {"nonfinite": "ignore"}, "unknown nonfinite"), error_type=V,
              error_regex=r"^Invalid nonfinite: 'ignore'; expected one of \('zero', 'skip', 'error'\)$"),
            E(OptimizerInput(None, {"foreach": 1}, "int foreach"), error_type=T,
              error_regex=r"^Invalid foreach: 1; expected None, True or False$"),
            E(OptimizerInput(sparse, {}, "sparse gradients"), error_on=OptimizerErrorEnum.STEP_ERROR,
              error_type=RuntimeError, error_regex="^AdaptiveClippingOptimizer does not support sparse gradients$"),
            E(OptimizerInput(nan, {"nonfinite": "error"}, "nonfinite=error on a nan gradient"),
              error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
              error_regex=r"^Non-finite gradients at step 0 in: param_groups\[0\]\[0\], param_groups\[0\]\[1\] "
              r"\(AdaptiveClippingOptimizer\(nonfinite='error'\)\)$"),
        ]  # fmt: skip
        return out

    return errors


SMOOTHED_NOT_OG = ("weight_decay", "bias_correction", "maximize", "foreach", "fused")

optim_db: list[OptimizerInfo] = [
    OptimizerInfo(
        SmoothedSignSGD,
        optim_inputs_func=optim_inputs_func_smoothed_sign,
        optim_error_inputs_func=optim_error_inputs_func_smoothed("SmoothedSignSGD"),
        supported_impls=("foreach", "fused"),
        not_og_supported_flags=SMOOTHED_NOT_OG,
        supports_fused_on=("cpu", "cuda"),
        reference=smoothed_reference("sign"),
        complex_as_real_view=lambda kwargs: False,  # sgn(z) = z / |z|, not (sign(Re z), sign(Im z))
    ),
    OptimizerInfo(
        SmoothedNormSGD,
        optim_inputs_func=optim_inputs_func_smoothed_norm,
        optim_error_inputs_func=optim_error_inputs_func_smoothed("SmoothedNormSGD"),
        supported_impls=("foreach", "fused"),
        not_og_supported_flags=(*SMOOTHED_NOT_OG, "norm", "eps"),
        supports_fused_on=("cpu", "cuda"),
        reference=smoothed_reference("norm"),
        # the rms norm counts complex entries (a real view has twice as many)
        complex_as_real_view=lambda kwargs: kwargs.get("norm") != "rms",
    ),
    OptimizerInfo(
        Clipped(torch.optim.SGD),
        optim_inputs_func=optim_inputs_func_clipped_sgd,
        optim_error_inputs_func=optim_error_inputs_func_clipped(torch.optim.SGD),
        supported_impls=("foreach", "fused"),
        not_og_supported_flags=("foreach", "differentiable", "maximize", "capturable", "fused"),
        supports_fused_on=("cpu", "cuda"),
        reference=clipped_reference(torch.optim.SGD),
        complex_as_real_view=lambda kwargs: kwargs.get("mode") != "value",  # value mode bounds |z|, phase kept
    ),
    OptimizerInfo(
        Clipped(torch.optim.Adam),
        optim_inputs_func=optim_inputs_func_clipped_adam,
        optim_error_inputs_func=optim_error_inputs_func_clipped(torch.optim.Adam),
        supported_impls=("foreach", "fused"),
        not_og_supported_flags=("foreach", "differentiable", "maximize", "capturable", "fused"),
        supports_fused_on=("cpu", "cuda"),
        reference=clipped_reference(torch.optim.Adam),
        complex_as_real_view=lambda kwargs: kwargs.get("mode") != "value",
    ),
]

DEVICE = "cpu"


# ============================================================================================ parametrisation
def _id(info: OptimizerInfo, desc: str) -> str:
    return f"{info.name}-{desc}"


def configs(*, flags: bool = True, skip: tuple[str, ...] = (), where: Callable[..., bool] | None = None) -> list:
    """``(info, kwargs)`` per entry and configuration, with the kernel flags (``flags``, torch's expansion) or the
    for-loop defaults.

    Every new configuration of a fused kernel is a compilation (about a second on this CPU with TorchInductor's
    on-disk cache, three without), so the expansion keeps ``fused=True`` for each entry's first configuration only;
    ``test_fused_matches_forloop`` runs the fused kernels on every configuration.
    """
    out = []
    for info in optim_db:
        inputs = optim_inputs_with_kernel_flags(DEVICE, info, skip) if flags else info.optim_inputs_func(device=DEVICE)
        first = info.optim_inputs_func(device=DEVICE)[0].desc
        for optim_input in inputs:
            if optim_input.kwargs.get("fused") and optim_input.desc != f"{first} & fused":
                continue
            if where is None or where(info, optim_input.kwargs):
                out.append(pytest.param(info, optim_input.kwargs, id=_id(info, optim_input.desc)))
    return out


def hook_configs() -> list:
    """Each entry's default configuration with each kernel: hooks do not depend on the hyper-parameters."""
    out = []
    for info in optim_db:
        for optim_input in optim_inputs_with_kernel_flags(DEVICE, info):
            if optim_input.desc.startswith("default"):
                out.append(pytest.param(info, optim_input.kwargs, id=_id(info, optim_input.desc)))
    return out


INFOS = [pytest.param(info, id=info.name) for info in optim_db]
SMOOTHED_INFOS = [p for p in INFOS if not isinstance(p.values[0].optim_cls, Clipped)]
CLIPPED_INFOS = [p for p in INFOS if isinstance(p.values[0].optim_cls, Clipped)]


def make(info: OptimizerInfo, params: Any, kwargs: dict[str, Any], **extra: Any) -> Optimizer:
    """A fresh optimizer; the kwargs are copied (a tensor lr must not be shared: schedulers change it in place)."""
    return info.optim_cls(params, **copy.deepcopy({**kwargs, **extra}))


def inner_of(opt: Optimizer) -> Optimizer:
    return opt.optimizer if isinstance(opt, AdaptiveClippingOptimizer) else opt


def assert_same(a: Any, b: Any, path: str = "", **tol: Any) -> None:
    """Nested equality of state dicts and states: tensors with ``assert_close`` (exact unless ``tol``), the rest
    with ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        if tol:
            torch.testing.assert_close(a, b, msg=lambda m: f"{path}: {m}", **tol)
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert (
                torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
            ), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", **tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", **tol)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_states_match(opt_a: Optimizer, params_a, opt_b: Optimizer, params_b, **tol: Any) -> None:
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_same(pa.detach(), pb.detach(), f"param {i}", **tol)
        assert_same(dict(opt_a.state.get(pa, {})), dict(opt_b.state.get(pb, {})), f"state of param {i}", **tol)


def loss_direction(kwargs: dict[str, Any]) -> int:
    return -1 if kwargs.get("maximize", False) else 1


def _linear_problem(contiguous: bool = True, dtype: torch.dtype = torch.float32):
    if contiguous:
        weight = Parameter(torch.randn(10, 5, dtype=dtype))
        bias = Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def _two_layers():
    """torch's tests take a Conv2d + BatchNorm2d here; two linear layers (the same parameter names) are 100x
    faster on this CPU."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), torch.rand(5, 4)


# ================================================================================================== the tests
def test_records_fit_torch_optimizer_info():
    """``optim_infos_do_not_specify_global_cliquey_kwargs``, through torch's own records in a separate process:
    the entries rebuilt as torch's ``OptimizerInfo`` expand, with torch's helper, into the configurations the tests
    here run."""
    if importlib.util.find_spec("expecttest") is None:
        pytest.skip(
            "torch.testing._internal.common_optimizers does not import here: its common_utils needs expecttest,"
            " which is not a dependency of this project"
        )
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from torch.testing._internal import common_optimizers as co
import tests.test_torch_optim_generic as here
out = {{}}
for info in here.optim_db:
    theirs = co.OptimizerInfo(
        info.optim_cls,
        optim_inputs_func=lambda device, dtype=None, info=info: [
            co.OptimizerInput(params=None, kwargs=i.kwargs, desc=i.desc) for i in info.optim_inputs_func(device=device)
        ],
        supported_impls=info.supported_impls,
        supports_fused_on=info.supports_fused_on,
        optim_error_inputs_func=info.optim_error_inputs_func,
    )
    for i in theirs.optim_inputs_func(device="cpu"):
        assert not any(f in i.kwargs for f in ("foreach", "fused", "differentiable")), (info.name, i.desc)
    expanded = co._get_optim_inputs_including_global_cliquey_kwargs("cpu", None, theirs)
    out[info.name] = [[i.desc, sorted(i.kwargs)] for i in expanded]
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
print(json.dumps({{"infos": out, "foreach_devices": list(_get_foreach_kernels_supported_devices())}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr:
        missing = proc.stderr.strip().splitlines()[-1]
        pytest.skip(f"torch.testing._internal.common_optimizers does not import here ({missing}; not a dependency)")
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    # torch's helper leaves foreach out where torch has no native foreach kernels (CPU); the tests here run the
    # package's foreach kernels on CPU as well
    skip = () if DEVICE in theirs["foreach_devices"] else ("foreach",)
    ours = {
        info.name: [[i.desc, sorted(i.kwargs)] for i in optim_inputs_with_kernel_flags(DEVICE, info, skip)]
        for info in optim_db
    }
    assert theirs["infos"] == ours


@pytest.mark.parametrize("info", INFOS)
def test_optim_inputs_leave_kernel_flags_to_the_tests(info):
    """``optim_infos_do_not_specify_global_cliquey_kwargs``: every configuration constructs, none sets a kernel."""
    for optim_input in info.optim_inputs_func(device=DEVICE):
        assert not {"foreach", "fused", "differentiable"} & set(optim_input.kwargs), optim_input.desc
        make(info, [Parameter(torch.randn(2))], optim_input.kwargs)


def _error_cases() -> list:
    out = []
    for info in optim_db:
        for e in info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
            out.append(pytest.param(info, e, id=_id(info, e.optimizer_error_input.desc)))
    return out


@pytest.mark.parametrize("info, error_input", _error_cases())
def test_errors(info, error_input):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(2, 2))]
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **optim_input.kwargs)
    else:
        opt = info.optim_cls(params, **optim_input.kwargs)
        before = [p.detach().clone() for p in params]
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            opt.step()
        assert all(torch.equal(b, p) for b, p in zip(before, params))  # refused before moving anything


def test_wrapper_refuses_what_it_cannot_wrap():
    """The wrapper's own argument checks, on a plain optimizer (the factory would build the inner one first)."""
    p = Parameter(torch.randn(2))
    with pytest.raises(TypeError, match=r"^Invalid optimizer: <list object>; expected a torch.optim.Optimizer"):
        AdaptiveClippingOptimizer([p])
    once = AdaptiveClippingOptimizer(torch.optim.SGD([p]))
    with pytest.raises(ValueError, match=r"^Invalid optimizer: AdaptiveClippingOptimizer; expected an optimizer"):
        AdaptiveClippingOptimizer(once)
    with pytest.raises(ValueError, match=r"^Invalid fused: True; expected fused=False with foreach=True"):
        AdaptiveClippingOptimizer(torch.optim.SGD([p]), fused=True, foreach=True)


# ------------------------------------------------------------------------------------------ right direction
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["", "lrsched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_forloop_goes_right_direction(info, kwargs, contiguous, with_lrsched):
    for schedulers_c in info.scheduler_inputs if with_lrsched else [None]:
        weight, bias, x = _linear_problem(contiguous)
        opt = make(info, [weight, bias], kwargs, foreach=False)
        schedulers = [s(opt) for s in schedulers_c or []]

        def closure(opt=opt, weight=weight, bias=bias, x=x):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            opt.step()
            for s in schedulers:
                s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert loss_direction(kwargs) * (closure().item() - initial) < 0


@pytest.mark.parametrize("info", INFOS)
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for schedulers_c in info.scheduler_inputs:
        weight, bias, x = _linear_problem()
        opt = make(info, [{"params": [weight]}, {"params": [bias], "lr": 0.01}], {})
        schedulers = [s(opt) for s in schedulers_c]

        def closure(opt=opt, weight=weight, bias=bias, x=x):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for s in schedulers:
                s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert closure().item() < initial


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_forloop_matches_float64_reference(info, kwargs):
    """The for-loop step against the float64 reference, on gradients given step by step (a parameter without a
    gradient on one step; for the wrapper, a nan gradient on another, which each ``nonfinite`` policy handles)."""
    shapes = [(3, 4), (5,), (2, 3, 2)]
    params = [Parameter(torch.randn(s)) for s in shapes]
    ref_params = [p.detach().to(F64) for p in params]
    opt = make(info, params, kwargs, foreach=False)
    ref_step = info.reference(copy.deepcopy(kwargs), ref_params)
    wrapper = isinstance(info.optim_cls, Clipped)
    for t in range(6):
        grads = [torch.randn(s) * (1 + 5 * (t == 2)) for s in shapes]  # a spike on step 2
        if t == 3:
            grads[1] = None
        if wrapper and t == 4:
            grads[0][0, 0] = math.nan
        for p, g in zip(params, grads):
            p.grad = g.clone() if g is not None else None  # the wrapper clips in place
        if wrapper and t == 4 and kwargs.get("nonfinite") == "error":
            with pytest.raises(RuntimeError, match="Non-finite gradients at step 4 in: param_groups"):
                opt.step()
            return
        opt.step()
        ref_step([g.to(F64) if g is not None else None for g in grads])
        for i, (p, r) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(p.detach().to(F64), r.detach(), rtol=1e-5, atol=2e-6, msg=f"step {t} param {i}")


# --------------------------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("info, kwargs", configs())
def test_param_groups_weight_decay(info, kwargs):
    group, ctor = split_for_groups(info, kwargs)
    weight, bias, x = _linear_problem()
    opt = make(info, [dict(params=[weight], **group), dict(params=[bias], **{**group, "weight_decay": 0.0})], ctor)
    initial = (weight.mv(x) + bias).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        opt.step()
    assert loss_direction(kwargs) * (loss.item() - initial) < 0
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("info, kwargs", configs())
def test_param_groups_lr(info, kwargs):
    group, ctor = split_for_groups(info, kwargs)
    if "lr" not in group:
        group["lr"] = 1e-3
    weight, bias, x = _linear_problem()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    opt = make(info, [dict(params=[weight, bias], **group), {"params": [irrelevant]}], {**ctor, "lr": 1e-28})
    initial = (weight.mv(x) + bias).pow(2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert loss_direction(kwargs) * (loss.item() - initial) < 0
    assert torch.equal(irrelevant.detach(), irrelevant_clone)


@pytest.mark.parametrize("info, kwargs", configs())
def test_tensor_lr(info, kwargs):
    kwargs = {**kwargs, "lr": 1e-3}
    weight, bias, x = _linear_problem()
    weight_c, bias_c = (p.detach().clone().requires_grad_() for p in (weight, bias))
    opt_r = make(info, [weight, bias], kwargs)
    try:
        opt = make(info, [weight_c, bias_c], {**kwargs, "lr": torch.tensor(1e-3)})
    except TypeError as e:  # the smoothed optimizers take a float lr only (the fused kernel makes it a tensor)
        assert not isinstance(info.optim_cls, Clipped)
        assert str(e) == "Invalid lr: tensor(0.0010); expected a finite number >= 0"
        return
    except ValueError as e:  # torch's own refusal (Adam with foreach=True)
        assert "lr as a Tensor is not supported" in str(e)
        return
    for _ in range(5):
        for o, w, b in ((opt_r, weight, bias), (opt, weight_c, bias_c)):
            o.zero_grad()
            (w.mv(x) + b).pow(2).sum().backward()
            o.step()
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)


# -------------------------------------------------------------------------------------------------- complex
def _complex_cases() -> list:
    return configs(skip=("fused",), where=lambda info, kwargs: info.complex_as_real_view(kwargs))


@pytest.mark.parametrize("info, kwargs", _complex_cases())
def test_complex(info, kwargs):
    """Complex parameters (and a real one) move as their real views, step by step."""
    complex_params = [
        torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
    ]
    complex_opt = make(info, complex_params, kwargs)
    real_opt = make(info, real_params, kwargs)
    for _ in range(3):
        for c, r in zip(complex_params, real_params):
            r.grad = torch.randn_like(r)
            c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
        real_opt.step()
        complex_opt.step()
        for c, r in zip(complex_params, real_params):
            torch.testing.assert_close(torch.view_as_real(c) if c.is_complex() else c, r)


def _rosenbrock(t: torch.Tensor) -> torch.Tensor:
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize(
    "info, kwargs",
    configs(
        skip=("fused",),
        where=lambda info, kwargs: info.complex_as_real_view(kwargs) and kwargs.get("norm", "global") == "global",
    ),
)
def test_complex_2d(info, kwargs):
    """A complex parameter against its real and imaginary parts as two real parameters (the update depends on the
    gradients through their global norm only, so the split does not matter)."""
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    opt1 = make(info, [a1], kwargs)
    opt2 = make(info, [a1_real, a1_imag], kwargs)
    for _ in range(3):
        opt1.zero_grad()
        opt2.zero_grad()
        _rosenbrock(a1).abs().backward()
        _rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
        # the two losses are computed differently: their gradients agree to a few ulps (rosenbrock's are large)
        torch.testing.assert_close(a1.grad.real, a1_real.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1.grad.imag, a1_imag.grad, rtol=1e-5, atol=1e-5)
        opt1.step()
        opt2.step()
        torch.testing.assert_close(a1.real, a1_real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1.imag, a1_imag, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "info, kwargs", configs(skip=("fused",), where=lambda info, kwargs: not info.complex_as_real_view(kwargs))
)
def test_complex_without_real_view_matches_float64_reference(info, kwargs):
    """Where a complex parameter does not move as its real view (SmoothedSignSGD's ``z / |z|``; the wrapper's value
    mode, which bounds ``|z|``), the complex run against the float64 reference, and a complex parameter with zero
    imaginary parts against the real one."""
    c = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.randn(5, requires_grad=True)
    as_complex = torch.complex(r.detach().clone(), torch.zeros(5)).requires_grad_()
    r2 = r.detach().clone().requires_grad_()
    opt = make(info, [c, r], kwargs)
    opt_c = make(info, [as_complex], kwargs)
    opt_r = make(info, [r2], kwargs)
    ref = [c.detach().to(torch.complex128), r.detach().to(F64)]
    ref_step = info.reference(copy.deepcopy(kwargs), ref)
    for _ in range(3):
        c.grad, r.grad = torch.randn_like(c), torch.randn_like(r)
        r2.grad = r.grad.clone()
        as_complex.grad = torch.complex(r.grad.clone(), torch.zeros(5))
        opt.step()
        opt_c.step()
        opt_r.step()
        ref_step([c.grad.to(torch.complex128), r.grad.to(F64)])
        torch.testing.assert_close(c.detach().to(torch.complex128), ref[0].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.detach().to(F64), ref[1].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(as_complex.real, r2)
        assert torch.equal(as_complex.imag, torch.zeros(5))


# ---------------------------------------------------------------------------------------- kernel parities
def _compare_kernels(info: OptimizerInfo, kwargs: dict[str, Any], flag: str, dtype: torch.dtype, **tol: Any) -> None:
    """torch's ``_test_derived_optimizers``: a small model plus a 0-d parameter, with ``flag`` off and on; a step
    with no gradients (2), a layer frozen on steps 3 and 4; parameters and states compared after every step."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    models, opts, all_params = [], [], []
    for value in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(dtype)
        scalar = torch.randn((), dtype=dtype, requires_grad=True)
        scalar.grad = torch.rand_like(scalar)
        params = [*model.parameters(), scalar]
        models.append(model)
        all_params.append(params)
        opts.append(make(info, params, kwargs, **{flag: value}))
    for i in range(7):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(x).sum().backward()
            opt.step()
        assert_states_match(opts[0], all_params[0], opts[1], all_params[1], **tol)


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_foreach_matches_forloop(info, kwargs):
    _compare_kernels(info, kwargs, "foreach", F64, rtol=1e-7, atol=1e-7)  # torch's float64 tolerances


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_fused_matches_forloop(info, kwargs):
    """Every configuration in float64 (float32 and bfloat16: ``test_mixed_dtype``; each dtype is a compilation)."""
    _compare_kernels(info, kwargs, "fused", F64, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("info, kwargs", configs(flags=False, where=lambda info, kwargs: "lr" not in kwargs))
def test_mixed_dtype(info, kwargs, impl):
    """torch's ``mixed_device_dtype`` on one device: float64, float32 and bfloat16 parameters in one optimizer
    (kernels group them by dtype), seven steps with ``impl`` off and on."""
    dtypes = [F64, torch.float32, torch.bfloat16, F64, torch.float32]
    base = [torch.rand(2, 3, dtype=d, requires_grad=True) for d in dtypes]
    grads = [torch.rand_like(p) for p in base]
    runs = []
    for value in (False, True):
        params = [p.detach().clone().requires_grad_() for p in base]
        opt = make(info, params, kwargs, **{impl: value})
        for _ in range(7):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        runs.append((opt, params))
    (opt_a, params_a), (opt_b, params_b) = runs
    for a, b in zip(params_a, params_b):
        rtol, atol = torch.testing._comparison.get_tolerances(a.dtype, rtol=None, atol=None)
        assert_states_match(opt_a, [a], opt_b, [b], rtol=5 * rtol, atol=5 * atol)


@pytest.mark.parametrize("info", SMOOTHED_INFOS)
def test_default_kernel_on_cpu_is_the_forloop(info):
    """torch's ``defaults_changed_to_foreach`` is for CUDA; on CPU the default (``foreach=None``) is the for-loop."""
    kind = "sign" if info.optim_cls is SmoothedSignSGD else "norm"
    name = f"_single_tensor_smoothed_{kind}"
    module = sign_sgd_module if kind == "sign" else norm_sgd_module
    model = torch.nn.Linear(5, 5)
    opt = make(info, model.parameters(), {})
    model(torch.rand(2, 5)).sum().backward()
    with mock.patch.object(module, name, wraps=getattr(module, name)) as loop:
        opt.step()
    assert loop.called


# ----------------------------------------------------------------------------------- no grads, zero grads
@pytest.mark.parametrize("info, kwargs", configs())
def test_step_is_noop_when_params_have_no_grad(info, kwargs):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    opt = make(info, params, kwargs)
    assert opt.step(lambda: torch.tensor([1.0])) == torch.tensor([1.0])
    assert all(torch.equal(a, b) for a, b in zip(old, params))
    assert len(opt.state) == 0


@pytest.mark.parametrize("info, kwargs", configs(where=lambda info, kwargs: kwargs.get("weight_decay", 0) == 0))
def test_step_is_noop_for_zero_grads(info, kwargs):
    param = torch.randn(5, 1, requires_grad=True)
    old = param.detach().clone()
    opt = make(info, [param], kwargs)
    param.grad = torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(old, param.detach())


@pytest.mark.parametrize("info, kwargs", configs())
def test_optimizer_can_be_printed(info, kwargs):
    """The repr names the optimizer (the wrapped one too) and shows every setting given."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = make(info, params, kwargs)
    text = repr(opt)
    group, ctor = split_for_groups(info, kwargs)
    assert type(inner_of(opt)).__name__ in text
    for key, value in {**group, **ctor}.items():
        if isinstance(info.optim_cls, Clipped) and key == "mode":  # the mode may print as the rule's name
            assert opt.mode == value and (f"mode={value!r}" in text or repr(opt.rule) in text), text
            continue
        wrapper_setting = isinstance(info.optim_cls, Clipped) and key in Clipped.CLIP_KEYS
        shown = f"{key}={value!r}" if wrapper_setting else f"{key}: {value}"
        assert shown in text, (shown, text)


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_non_empty_state(info, kwargs):
    """After a step every parameter has its state: one momentum buffer (and the step count with bias correction)
    for the smoothed optimizers; for the wrapper, the wrapped optimizer's state, the same as that optimizer's run
    alone on the same (first, never clipped unless capped) gradients."""
    model = torch.nn.Linear(5, 5)
    twin = copy.deepcopy(model)
    x = torch.rand(2, 5)
    opt = make(info, model.parameters(), kwargs)
    model(x).sum().backward()
    opt.step()
    if isinstance(info.optim_cls, Clipped):
        clip, rest = info.optim_cls.split(kwargs)
        alone = info.optim_cls.inner(twin.parameters(), **copy.deepcopy(rest))
        twin(x).sum().backward()
        if clip.get("max_norm") is not None or clip.get("mode") in ("norm", "value"):
            AdaptiveClippingOptimizer(alone, **clip).step()  # the first step is capped: clip the twin alike
        else:
            alone.step()
        assert_states_match(opt, list(model.parameters()), alone, list(twin.parameters()))
    else:
        expected = {"momentum_buffer", "step"} if kwargs.get("bias_correction") else {"momentum_buffer"}
        assert len(opt.state) == 2
        for p in model.parameters():
            assert set(opt.state[p]) == expected
            assert opt.state[p]["momentum_buffer"].shape == p.shape


# ----------------------------------------------------------------------------------------------- state dicts
def _fwd_bwd(opt, w, b, x):
    opt.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


def _named(params, named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(sd):
    sd = copy.deepcopy(sd)
    for group in sd["param_groups"]:
        group.pop("param_names", None)
    return sd


@pytest.mark.parametrize("named0, named1", [(False, False), (True, True)], ids=["plain", "named"])
@pytest.mark.parametrize("info, kwargs", configs())
def test_state_dict_deterministic(info, kwargs, named0, named1):
    """Load into a fresh optimizer on cloned parameters and continue: the same as the uninterrupted run."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    opt = make(info, _named([weight, bias], named0), kwargs)
    closure = functools.partial(_fwd_bwd, opt, weight, bias, x)
    for _ in range(10):
        opt.step(closure)
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = make(info, _named([weight_c, bias_c], named1), kwargs)
    closure_c = functools.partial(_fwd_bwd, opt_c, weight_c, bias_c, x)
    saved = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(saved)
    assert_same(saved, opt.state_dict())  # loading does not change what was saved
    for _ in range(10):
        assert_same(opt.step(closure), opt_c.step(closure_c))
        assert_same(weight.detach(), weight_c.detach())
        assert_same(bias.detach(), bias_c.detach())
    assert_same(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)  # repeated parameters: the same representation
    assert_same(
        _without_param_names(opt.state_dict())["param_groups"][-1],
        _without_param_names(opt_c.state_dict())["param_groups"][-1],
    )


@pytest.mark.parametrize("info, kwargs", configs())
def test_can_load_older_state_dict(info, kwargs):
    """A state dict from before a flag existed (the flag missing from its groups) loads, the flag takes its default,
    and the run continues as one that saved the default."""
    model, x = _two_layers()
    opt = make(info, model.parameters(), kwargs)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    defaults = constructor_defaults(info)
    old = copy.deepcopy(opt.state_dict())
    as_defaults = copy.deepcopy(opt.state_dict())
    for group, same in zip(old["param_groups"], as_defaults["param_groups"]):
        for flag in info.not_og_supported_flags:
            if flag in group:
                del group[flag]
                same[flag] = defaults[flag]
    twins = [copy.deepcopy(model) for _ in range(2)]
    opts = [make(info, twin.parameters(), kwargs) for twin in twins]
    opts[0].load_state_dict(old)
    opts[1].load_state_dict(as_defaults)
    for twin, o in zip(twins, opts):
        o.zero_grad()
        twin(x).sum().backward()
        o.step()
    assert_states_match(opts[0], list(twins[0].parameters()), opts[1], list(twins[1].parameters()))


@pytest.mark.parametrize("named0, named1", [(False, True), (True, False), (True, True)],
                         ids=["plain-to-named", "named-to-plain", "named"])  # fmt: skip
@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_can_load_from_to_named_state_dict(info, kwargs, named0, named1):
    model, x = _two_layers()
    twin = copy.deepcopy(model)
    opt = make(info, model.named_parameters() if named0 else model.parameters(), kwargs)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    opt2 = make(info, twin.named_parameters() if named1 else twin.parameters(), kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert_states_match(opt, list(model.parameters()), opt2, list(twin.parameters()))
    names = opt2.state_dict()["param_groups"][0].get("param_names")
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("info, kwargs", configs())
def test_save_load_equality_with_weights_only(info, kwargs, named):
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    opt = make(info, _named([weight, bias], named), kwargs)
    for _ in range(3):
        opt.step(functools.partial(_fwd_bwd, opt, weight, bias, x))
    sd = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    assert_same(torch.load(buffer, weights_only=False), sd)
    buffer.seek(0)
    assert_same(torch.load(buffer, weights_only=True), sd)


@pytest.mark.parametrize("info, kwargs", configs())
def test_load_nontensor_step(info, kwargs):
    """A ``step`` saved as a tensor, loaded back as a Python number, continues as the uninterrupted run."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    grads = [torch.rand(2, 3) for _ in range(2)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = make(info, params, kwargs)
    opt_t = make(info, twins, kwargs)
    for _ in range(3):
        for o, ps in ((opt, params), (opt_t, twins)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    sd = copy.deepcopy(opt_t.state_dict())
    for p_state in sd["state"].values():
        if "step" in p_state and torch.is_tensor(p_state["step"]):
            p_state["step"] = p_state["step"].item()
    opt_t.load_state_dict(sd)
    for o in (opt, opt_t):
        o.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("info", CLIPPED_INFOS)
def test_wrapper_loads_a_plain_optimizer_state_dict(info):
    """An older checkpoint of the wrapped optimizer alone (no ``"clipping"`` entry) loads; the clipping starts
    fresh, as in a new wrapper whose optimizer loaded it."""
    params = [Parameter(torch.randn(3)) for _ in range(2)]
    plain = info.optim_cls.inner(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(3)
        plain.step()
    sd = plain.state_dict()
    twins = [[p.detach().clone().requires_grad_() for p in params] for _ in range(2)]
    loaded = info.optim_cls(twins[0], lr=1e-2, alpha=0.5)
    loaded.load_state_dict(copy.deepcopy(sd))
    inner = info.optim_cls.inner(twins[1], lr=1e-2)
    inner.load_state_dict(copy.deepcopy(sd))
    fresh = AdaptiveClippingOptimizer(inner, alpha=0.5)
    for _ in range(3):
        g = [torch.randn(3) for _ in params]
        for o, ps in ((loaded, twins[0]), (fresh, twins[1])):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            o.step()
    assert_states_match(loaded, twins[0], fresh, twins[1])
    assert loaded.steps == fresh.steps == 3


# ------------------------------------------------------------------------------------------ state-dict hooks
def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    my_state_dict = copy.deepcopy(state_dict)  # a hook may return a new state dict: that one is loaded
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer: Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _hooked(info, kwargs):
    return make(info, [torch.rand(2, 3, requires_grad=True)], kwargs)


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_state_dict_pre_hook(info, kwargs):
    opt = _hooked(info, kwargs)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_state_dict_post_hook(info, kwargs):
    opt = _hooked(info, kwargs)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_state_dict_pre_post_hook(info, kwargs):
    opt = _hooked(info, kwargs)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"]
    assert sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_load_state_dict_pre_hook_and_prepend(info, kwargs):
    opt = _hooked(info, kwargs)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # hook2 ran first, hook1 after it: hook1's lr


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_load_state_dict_post_hook(info, kwargs):
    opt = _hooked(info, kwargs)
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is False
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_load_state_dict_pre_post_hook(info, kwargs):
    opt = _hooked(info, kwargs)
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    assert opt.state["ran_load_state_dict_post_hook"] is True


# ------------------------------------------------------------------------------------------------ step hooks
@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_step_post_hook(info, kwargs):
    data = [2]
    opt = make(info, [torch.tensor([1.0, 1.0])], kwargs)
    handle = opt.register_step_post_hook(lambda o, args, kw: data.append(data[-1] + 2))
    opt.step()
    opt.step()
    assert data == [2, 4, 6]
    handle.remove()
    opt.step()
    assert data == [2, 4, 6]


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_step_pre_hook(info, kwargs):
    data = [5]
    opt = make(info, [torch.tensor([1.0, 1.0])], kwargs)
    handle = opt.register_step_pre_hook(lambda o, args, kw: data.append(data[-1] + 2))
    opt.step()
    opt.step()
    assert data == [5, 7, 9]
    handle.remove()
    opt.step()
    assert data == [5, 7, 9]


@pytest.mark.parametrize("info, kwargs", hook_configs())
def test_step_all_hooks(info, kwargs):
    """Global and per-optimizer hooks, against ``torch.optim.SGD`` next to it: each once per ``step``, in the
    order global pre, local pre, local post, global post."""
    data: list[int] = []
    params = [torch.tensor([1.0, 1.0])]
    opt = make(info, params, kwargs)
    opt2 = torch.optim.SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
    ]
    try:
        for o in (opt, opt2):
            handles.append(o.register_step_pre_hook(lambda o, a, k: data.append(1)))
            handles.append(o.register_step_post_hook(lambda o, a, k: data.append(2)))
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


# ------------------------------------------------------------------------------------------ copies and pickle
@pytest.mark.parametrize("info, kwargs", configs())
def test_deepcopy_copies_all_public_attrs(info, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = make(info, params, kwargs)
    for _ in range(3):
        opt.step()

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(opt) == public(copy.deepcopy(opt))


def _grads_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_copy_after_lr_scheduler(info, kwargs, how):
    """Copy (or pickle) an optimizer that has an lr scheduler attached and has stepped: the copy steps its own
    parameters, never the original's, and moves them as the original moves its own."""
    params = [Parameter(torch.randn(3, 2)), Parameter(torch.randn(2))]
    opt = make(info, params, kwargs)
    scheduler = StepLR(opt, step_size=2, gamma=0.5)
    for t in range(3):
        for p, g in zip(params, _grads_for(params, t)):
            p.grad = g
        opt.step()
        scheduler.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(a is not b for a, b in zip(params, twin_params))
    before = [p.detach().clone() for p in params]
    for p, g in zip(twin_params, _grads_for(params, 10)):
        p.grad = g
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "stepping the copy moved the original"
    for p, g in zip(params, _grads_for(params, 10)):
        p.grad = g
    opt.step()
    assert_states_match(opt, params, twin, twin_params)


# -------------------------------------------------------------------------------- empty tensors, zero_grad, ...
@pytest.mark.parametrize("info, kwargs", configs())
def test_empty_tensors(info, kwargs):
    """Zero-size parameters next to others change nothing: the others move as without them."""
    shapes = [(3, 2), (0,), (4,), (3, 0)]
    params = [Parameter(torch.randn(s)) for s in shapes]
    kept = [p.detach().clone().requires_grad_() for p, s in zip(params, shapes) if math.prod(s)]
    opt = make(info, params, kwargs)
    opt_kept = make(info, kept, kwargs)
    for t in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        for p, g in zip(kept, [g for g in grads if g.numel()]):
            p.grad = g.clone()
        opt.step()
        opt_kept.step()
    assert_states_match(opt, [p for p in params if p.numel()], opt_kept, kept)
    for p in params:
        if not p.numel():
            assert p.shape == (0,) or p.shape == (3, 0)
            assert all(not torch.is_tensor(v) or v.numel() <= 1 for v in opt.state[p].values())


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_zero_grad(info, kwargs):
    """``zero_grad`` as ``torch.optim.SGD``'s: ``None`` by default, zeros with ``set_to_none=False``."""
    params = [Parameter(torch.randn(3)) for _ in range(2)]
    reference = torch.optim.SGD([p.detach().clone().requires_grad_() for p in params])
    opt = make(info, params, kwargs)
    for o, ps in ((opt, params), (reference, [q for g in reference.param_groups for q in g["params"]])):
        for p in ps:
            p.grad = torch.ones(3)
        o.zero_grad(set_to_none=False)
        assert all(torch.equal(p.grad, torch.zeros(3)) for p in ps)
        o.zero_grad()
        assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("info, kwargs", configs())
def test_add_param_group(info, kwargs):
    """A group added after two steps: the same as having it from the start with no gradients for two steps."""
    group, ctor = split_for_groups(info, kwargs)
    a = [Parameter(torch.randn(3, 2)), Parameter(torch.randn(2))]
    b = [Parameter(torch.randn(4))]
    a2, b2 = [p.detach().clone().requires_grad_() for p in a], [p.detach().clone().requires_grad_() for p in b]
    late = make(info, [dict(params=a, **group)], ctor)
    early = make(info, [dict(params=a2, **group), {"params": b2, "lr": 1e-2}], ctor)
    for t in range(5):
        if t == 2:
            late.add_param_group({"params": b, "lr": 1e-2})
        grads = _grads_for(a + b, t)
        for p, g in zip(a + a2, grads[:2] * 2):
            p.grad = g.clone()
        if t >= 2:
            for p, g in zip(b + b2, grads[2:] * 2):
                p.grad = g.clone()
        late.step()
        early.step()
    assert len(late.param_groups) == 2
    assert_states_match(late, a + b, early, a2 + b2)


@pytest.mark.parametrize("info", SMOOTHED_INFOS)
def test_add_param_group_refuses_invalid_settings(info):
    """The smoothed optimizers check a group's settings when it is added (torch's optimizers do not)."""
    opt = make(info, [Parameter(torch.randn(2))], {})
    with pytest.raises(ValueError, match=r"^Invalid beta of param group 1: 1\.0; expected a finite number in"):
        opt.add_param_group({"params": [Parameter(torch.randn(2))], "beta": 1.0})
    with pytest.raises(TypeError, match=r"^Invalid maximize of param group 1: 'yes'; expected True or False$"):
        opt.add_param_group({"params": [Parameter(torch.randn(2))], "maximize": "yes"})
    assert len(opt.param_groups) == 1  # refused, not half-added


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_maximize_equals_minimizing_the_negated_loss(info, kwargs):
    params = [Parameter(torch.randn(3, 2)), Parameter(torch.randn(2))]
    twins = [p.detach().clone().requires_grad_() for p in params]
    flipped = not kwargs.get("maximize", False)
    opt = make(info, params, kwargs)
    opt_m = make(info, twins, {**kwargs, "maximize": flipped})
    for t in range(4):
        grads = _grads_for(params, t)
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g, -g
        opt.step()
        opt_m.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("info, kwargs", configs(flags=False))
def test_lr_scheduler_matches_setting_lr_by_hand(info, kwargs):
    params = [Parameter(torch.randn(3, 2)), Parameter(torch.randn(2))]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = make(info, params, kwargs)
    scheduler = StepLR(opt, step_size=2, gamma=0.5)
    by_hand = make(info, twins, kwargs)
    lr0 = float(by_hand.param_groups[0]["lr"])
    for t in range(5):
        lr = lr0 * 0.5 ** (t // 2)
        for group in by_hand.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        grads = _grads_for(params, t)
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        by_hand.step()
        scheduler.step()
        assert_states_match(opt, params, by_hand, twins, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------- torch.compile
def _compile_cases() -> list:
    chosen = {
        "SmoothedSignSGD": ("default", "maximize, weight_decay", "bias_correction", "default & foreach"),
        "SmoothedNormSGD": ("default (global norm)", "tensor norm", "bias_correction, rms, beta",
                            "default (global norm) & foreach"),
        "AdaptiveClippingOptimizer(SGD)": ("default", "mode=value", "max_norm cap, momentum & foreach"),
        "AdaptiveClippingOptimizer(Adam)": ("default",),
    }  # fmt: skip
    out = []
    for info in optim_db:
        for optim_input in optim_inputs_with_kernel_flags(DEVICE, info, skip=("fused",)):
            if optim_input.desc in chosen[info.name]:
                out.append(pytest.param(info, optim_input.kwargs, id=_id(info, optim_input.desc)))
    return out


@pytest.mark.parametrize("info, kwargs", _compile_cases())
def test_compiled_step_matches_eager(info, kwargs):
    """``torch.compile(opt.step)`` against the eager step, three steps on tiny tensors."""
    torch._dynamo.reset()
    shapes = [(3, 2), (2,)]
    params = [Parameter(torch.randn(s)) for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    eager = make(info, params, kwargs)
    compiled_opt = make(info, twins, kwargs)
    step = torch.compile(compiled_opt.step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            for p, q, g in zip(params, twins, _grads_for(params, t)):
                p.grad, q.grad = g, g.clone()
            eager.step()
            step()
            assert_states_match(eager, params, compiled_opt, twins, rtol=1e-6, atol=1e-7)
