"""Lightning glue for the clipping rules of :mod:`lightning_clip.functional`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from lightning_clip import _lightning as _L
from lightning_clip._fsdp import FlatShardLayout
from lightning_clip._persist import RuleStates, rule_entry, saved_identity, spell
from lightning_clip._validation import check_choice, check_flag, check_int, check_kernel_choice, check_str
from lightning_clip.dashboard import (
    Layout,
    clipping_layout,
    log_histogram,
    metric_tag,
    optimizer_names,
    per_optimizer_layout,
    write_layout,
)
from lightning_clip.functional import (
    CLIP_METRIC_KEYS,
    NONFINITE_POLICIES,
    ClipState,
    ClipStats,
    NonFinitePolicy,
    clip_step_,
    window_metrics,
)
from lightning_clip.monitor import SPARSITY_METRICS, SparsityLogging, log_values
from lightning_clip.norms import per_tensor_norms
from lightning_clip.rule import ClipMode, ClipRule, resolve_rule
from lightning_clip.sparsity import DEFAULT_TOL, RelativeTo, check_relative_to, check_tol

if TYPE_CHECKING:
    import lightning.pytorch as pl

_POLICIES = NONFINITE_POLICIES

#: The metrics written at each logging step, with what they mean (``m`` is the moving average of the norm).
METRICS: dict[str, str] = {
    "grad_norm": "global L2 norm of the gradients before clipping, n_t",
    "threshold": "the bound that applied this step (alpha * m_(t-1), max_norm or clip_val)",
    "grad_norm_ema": "moving average m_t of the finite pre-clip norms",
    "clip_coef": "post-clip / pre-clip norm of this step (1 = untouched)",
    "clip_coef_min": "smallest clip coefficient since the last log (how hard it clipped)",
    "clipped_frac": "fraction of the finite steps since the last log that were clipped",
    "nonfinite_steps": "steps since the last log whose norm was inf or nan",
    **SPARSITY_METRICS,
}
_CLIP_KEYS = CLIP_METRIC_KEYS


class AdaptiveGradientClipping(*_L.CALLBACK_BASES):
    r"""Clip gradients to ``alpha`` times a moving average of their global norm, once per optimizer step.

    For each optimizer separately, at each real optimizer step ``t`` (once per accumulated batch), with
    ``n_t`` the L2 norm over all the gradients that optimizer holds::

        tau_t = rule.threshold(state_(t-1))            (by default alpha * m_(t-1): AdaptiveNorm)
        g <- g * min(1, tau_t / n_t)
        state_t = rule.update(state_(t-1), n_t)

    :mod:`lightning_clip.rule` holds the rules and their formulas: by default the threshold is ``alpha`` times the
    moving average ``m`` of the pre-clip norms (seeded by the first informative step, bias-corrected over
    ``warmup_steps``, capped by ``max_norm``); ``mode="norm"`` and ``mode="value"`` (or ``rule=...``) pick others.
    A step whose norm is exactly zero (zero-initialised layers, a frozen warm start, a constant loss) carries no
    scale: it neither seeds nor moves the average and does not count as a step of the warm-up. Complex parameters
    are supported: their norm is ``torch.nn.utils.clip_grad_norm_``'s (by the modulus ``|z|``).

    **State and checkpoints.** The state of each optimizer (the average ``m``, the count ``k`` of informative steps,
    the logging window) is saved in checkpoints under :attr:`state_key`, which depends on ``log_prefix`` only: one
    callback per prefix and Trainer (two callbacks that differ only in ``log_prefix`` work side by side; two with
    the same prefix would log over each other and Lightning refuses them as duplicate stateful callbacks). The
    average depends on ``mode`` and ``beta`` (the rule's :meth:`~lightning_clip.rule.ClipRule.identity`): a resume
    with the same ``mode`` and ``beta`` continues the saved state
    exactly, whatever ``alpha``, ``max_norm``, ``clip_val``, ``warmup_steps`` or ``nonfinite`` are now (changing them
    on resume is how one retunes a run); a resume whose ``mode`` or ``beta`` differ warns once, naming both, and
    starts from a fresh state. Checkpoints hold plain Python values and tensors only (they load with
    ``torch.load(weights_only=True)``, Lightning's default). A checkpoint whose clipping state is under another key
    (a renamed ``log_prefix``) is reported in one warning, and the callback starts fresh. A new ``fit`` that does
    not resume from a checkpoint starts from a fresh state, as the optimizers Lightning creates for it do: a
    callback reused across fits (seed or learning-rate loops) carries
    nothing from one run into the next.

    The threshold never depends on the current norm, so a spike cannot raise its own ceiling; the average takes
    the pre-clip norm, so ``alpha < 1`` holds every step at ``alpha`` times the typical norm instead of shrinking
    the threshold towards zero. ``mode="norm"`` (fixed ``clip_val`` on the norm) and ``mode="value"`` (entries
    clamped to ``[-clip_val, clip_val]``) run through the same path and are logged the same way.

    The hook runs after the closure, after AMP unscaling, and before Lightning's own clipping and the optimizer
    step. With an optimizer that evaluates its closure several times per step (``torch.optim.LBFGS``), Lightning
    runs the hook after each evaluation: every evaluation is clipped with the bound of the step (from the state
    before it), and the step is counted, logged and enters the average once, with the norm of its first evaluation
    (the gradient at the parameters the step starts from). Every decision stays on the device: a non-logging step
    makes no host synchronisation with the default ``nonfinite="zero"``.

    Defaults: ``alpha=3.8, beta=0.918`` are the values an Optuna search (30 trials) picked for Adam on an MLP
    over mnist1d at lr 0.04 (``examples/tune.py`` reruns such a search). With ``beta=0.918`` the average forgets with a
    half-life of about 8 steps, and ``alpha=3.8`` leaves ordinary steps untouched while a spike is cut back to
    3.8 times the recent norm. For per-step control (aggressive clipping), use ``alpha < 1``.

    Args:
        alpha: multiple of the moving average that the norm may reach (``mode="adaptive"``); a finite number > 0.
        beta: decay of the moving average, in ``[0, 1)``.
        mode: ``"adaptive"``, ``"norm"`` (fixed threshold ``clip_val``) or ``"value"`` (per-entry bound
            ``clip_val``).
        clip_val: the fixed bound of ``"norm"`` and ``"value"`` (a complex entry's modulus is clamped to it);
            ``None`` in adaptive mode.
        max_norm: optional absolute cap on the norm in adaptive mode, applied from the first step: Adam's second
            moment needs a few steps before it brakes a large gradient, the cap brakes from step one.
        warmup_steps: informative steps after the seeding step during which the adaptive threshold is not applied;
            over them the average is the bias-corrected moving average of the norms so far,
            ``m_k = sum_(i<=k) (1 - beta) beta^(k-i) n_i / (1 - beta^k)`` (later steps weigh more, the first one far
            less than in the plain seeded average), so one unrepresentative early step does not set the threshold
            that follows.
        nonfinite: what a step with an ``inf``/``nan`` norm does (such a norm never enters the average):

            * ``"zero"`` (default, no host sync): every gradient entry becomes 0 (``nan``/``inf`` included).
              A stateful optimizer still moves on such a step: Adam by its momentum ``m / sqrt(v)``, SGD with
              momentum by its buffer, and weight decay still applies.
            * ``"skip"``: gradients are set to ``None``, so torch optimizers leave parameters and state
              untouched. Costs one host synchronisation per step (as ``GradScaler`` does).
            * ``"error"``: raise a ``RuntimeError`` naming the step and the parameters whose gradients are not
              finite. One host synchronisation per step.

            Under ``precision="16-mixed"`` with a ``GradScaler``, the scaler already skips such steps and lowers
            its scale; the callback then leaves the gradients alone and only keeps them out of its statistics.
        foreach: kernel for the multiplication: ``None`` picks per device (multi-tensor where torch has native
            foreach kernels, as on CUDA; the for-loop elsewhere, which on CPU reuses the cache). Not ``True`` with
            ``fused=True``.
        fused: scale and zero each gradient in one ``torch.compile``-fused pass. Off by default: the first step
            compiles (tens of seconds on CPU for a hundred tensors), which long runs amortise; afterwards the
            callback costs what ``clip_grad_norm_`` does (``benchmarks/bench_clipping.py``).
        log_prefix: the metrics are ``{log_prefix}/grad_norm`` etc.; with several optimizers
            ``{log_prefix}/{OptimizerName}/grad_norm``. Also the :attr:`state_key`: give each instance of a Trainer
            its own.
        log_sparsity: also log ``{log_prefix}/update_sparsity`` at the logging steps: the fraction of the entries
            whose update ``|w(after) - w(before)|`` was at most ``sparsity_tol * lr_g`` (see
            :mod:`lightning_clip.sparsity`). Costs, on logging steps only, one copy of the weights held from this
            hook to the end of the step; other steps pay nothing.
        sparsity_tol: the tolerance of the negligible rule, ``>= 0`` (default 0.1: a tenth of a full step).
        sparsity_relative_to: ``"lr"`` (units of the group's lr) or ``"rms"`` (units of the rms update).
        sparsity_cumulative: also log ``{log_prefix}/update_sparsity_cumulative``, the fraction of entries whose
            movement since the last log is at most ``sparsity_tol`` times the sum of the lrs; holds one extra copy of
            the weights for the whole run (off by default).
        dashboard: write a TensorBoard custom-scalars layout (norm vs threshold, clip coefficient and clipped
            fraction, sparsity, per optimizer) once per run to each ``TensorBoardLogger``; other loggers get the
            scalars only.
        histogram_every_n_steps: when set, every that many optimizer steps (``(batches_that_stepped + 1) % n ==
            0``), write the histogram of the per-tensor (per-layer) pre-clip gradient norms,
            ``{log_prefix}/grad_norm_per_layer``, to the TensorBoard loggers (one host sync on those steps).
        rule: the clipping rule (:mod:`lightning_clip.rule`: ``AdaptiveNorm``, ``FixedNorm``, ``FixedValue`` or a
            rule of one's own), instead of the flat arguments ``mode``, ``alpha``, ``beta``, ``clip_val``,
            ``max_norm``, ``warmup_steps`` (which build the built-in rules and must stay at their defaults when
            ``rule`` is given). In YAML: ``rule: {class_path: lightning_clip.rule.AdaptiveNorm, init_args: {alpha:
            2.0}}``.

    Raises:
        TypeError: at construction, naming the argument and its value, for a value of the wrong kind: a ``bool``
            or a string where a number goes (``alpha=True``), anything but ``True``/``False`` where a flag goes
            (``fused="no"``). Numpy numbers and booleans are accepted and stored as plain Python values.
        ValueError: at construction, naming the argument and its value, for ``alpha <= 0``, ``beta`` outside
            ``[0, 1)``, ``max_norm <= 0``, a ``nan``/``inf`` where a finite number goes, an unknown ``mode`` or
            ``nonfinite``, a ``clip_val`` that does not fit the mode, ``fused=True`` with ``foreach=True``; at setup,
            for ``Trainer(gradient_clip_val=...)`` (Lightning would clip again after this callback) or a strategy
            whose gradient layout it cannot reduce (DeepSpeed).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_clip import AdaptiveGradientClipping
        >>> trainer = Trainer(callbacks=[AdaptiveGradientClipping(alpha=3.8, beta=0.918)], logger=False)
    """

    def __init__(
        self,
        alpha: float = 3.8,
        beta: float = 0.918,
        mode: ClipMode = "adaptive",
        clip_val: float | None = None,
        max_norm: float | None = None,
        warmup_steps: int = 0,
        nonfinite: NonFinitePolicy = "zero",
        foreach: bool | None = None,
        fused: bool = False,
        log_prefix: str = "clip",
        log_sparsity: bool = True,
        sparsity_tol: float = DEFAULT_TOL,
        sparsity_relative_to: RelativeTo = "lr",
        sparsity_cumulative: bool = False,
        dashboard: bool = True,
        histogram_every_n_steps: int | None = None,
        rule: ClipRule | None = None,
    ) -> None:
        super().__init__()
        # the one source of the rule's settings (plain Python values, numpy scalars converted: they reach
        # checkpoints); alpha, beta, mode, ... are read-only views of it
        self._rule = resolve_rule(
            rule, mode=mode, alpha=alpha, beta=beta, clip_val=clip_val, max_norm=max_norm, warmup_steps=warmup_steps
        )
        self.nonfinite = check_choice("nonfinite", nonfinite, _POLICIES)
        self.foreach, self.fused = check_kernel_choice(foreach, fused)
        self.log_prefix = check_str("log_prefix", log_prefix)
        self.log_sparsity = check_flag("log_sparsity", log_sparsity)
        self.sparsity_tol = check_tol(sparsity_tol, name="sparsity_tol")
        self.sparsity_relative_to = check_relative_to(sparsity_relative_to, name="sparsity_relative_to")
        self.sparsity_cumulative = check_flag("sparsity_cumulative", sparsity_cumulative)
        self.dashboard = check_flag("dashboard", dashboard)
        self.histogram_every_n_steps = check_int(
            "histogram_every_n_steps", histogram_every_n_steps, low=1, optional=True
        )
        self._sparsity = SparsityLogging(self.sparsity_tol, self.sparsity_relative_to, self.sparsity_cumulative)
        self._states = RuleStates(self._rule, owner=f"{type(self).__name__}(log_prefix={self.log_prefix!r})")
        self._names: list[str] = []
        self._last: dict[int, ClipStats] = {}
        self._stepped_at: dict[int, int] = {}  # the global step of each optimizer's last counted step
        #: the values written at the last logging step, by metric name
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------- the settings, read-only
    @property
    def rule(self) -> ClipRule:
        """The clipping rule (:mod:`lightning_clip.rule`)."""
        return self._rule

    @property
    def mode(self) -> str:
        """The rule's name (``"adaptive"``, ``"norm"``, ``"value"`` for the built-in rules)."""
        return self._rule.mode

    @property
    def alpha(self) -> float | None:
        return getattr(self._rule, "alpha", None)

    @property
    def beta(self) -> float | None:
        return getattr(self._rule, "beta", None)

    @property
    def clip_val(self) -> float | None:
        return getattr(self._rule, "clip_val", None)

    @property
    def max_norm(self) -> float | None:
        return getattr(self._rule, "max_norm", None)

    @property
    def warmup_steps(self) -> int | None:
        return getattr(self._rule, "warmup_steps", None)

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class and ``log_prefix`` (one instance per prefix).

        The settings are not part of it: a resume with another ``alpha`` (or ``max_norm``, ``clip_val``, ...) finds
        the saved state, and :meth:`load_state_dict` checks the settings the average depends on (``mode``, ``beta``).
        """
        return self._generate_state_key(log_prefix=self.log_prefix)

    def identity(self) -> dict[str, Any]:
        """What the saved average depends on: ``{"mode": ..., "beta": ...}`` (plain Python values).

        A saved state is used on resume only when these agree; ``alpha``, ``max_norm``, ``clip_val``,
        ``warmup_steps`` (a count against ``k``) and ``nonfinite`` only decide what is done with the average.
        """
        return self._rule.identity()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts from a fresh state. Lightning restores a checkpoint's callback states after `setup`
        # (before or after `on_fit_start`, by strategy), so a fit with `ckpt_path` refills it in `load_state_dict`.
        self._reset()
        self._states.warn = bool(trainer.is_global_zero)
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Invalid gradient_clip_val: {float(trainer.gradient_clip_val)!r}; AdaptiveGradientClipping already"
                " clips, and Lightning would clip again after it. Remove `Trainer(gradient_clip_val=...)` (use"
                " AdaptiveGradientClipping(mode='norm', clip_val=...) for a fixed threshold)."
            )
        kind = _L.strategy_kind(trainer)
        name = type(trainer.strategy).__name__
        if kind == "deepspeed":
            raise ValueError(
                f"Invalid strategy: {name}; DeepSpeed partitions and reduces the gradients inside its own engine"
                " (ZeRO stages 1-3), so the optimizer-step hook never sees the whole gradient and a norm taken there"
                " would be silently wrong. Use strategy='ddp' (whole gradients) or strategy=ModelParallelStrategy()"
                " (FSDP2 / tensor parallel, DTensor gradients), which this callback clips exactly; or DeepSpeed's own"
                " clipping (its 'gradient_clipping' config) without this callback."
            )
        if kind not in ("single", "ddp", "xla", "model_parallel", "fsdp"):
            raise ValueError(
                f"Invalid strategy: {name}; expected a single-device, DDP-style, FSDPStrategy (FSDP1) or"
                " ModelParallelStrategy (FSDP2 / tensor parallel) strategy: the callback must know how the gradients"
                " are laid out to take the norm of the whole model."
            )
        self._kind = kind
        self._fsdp: FlatShardLayout | None = None  # read from the wrapped model at the first step (wrapped after setup)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_clip.wrapper import AdaptiveClippingOptimizer

        wrapped = [type(o).__name__ for o in trainer.optimizers if isinstance(o, AdaptiveClippingOptimizer)]
        if wrapped:
            raise ValueError(
                f"Invalid optimizer: {wrapped[0]} with the AdaptiveGradientClipping callback: both clip the gradients,"
                " so every step would be clipped twice. Use one of them: remove the callback, or return the plain"
                " optimizer from configure_optimizers."
            )
        self._names = optimizer_names(trainer.optimizers)
        if self.dashboard:
            write_layout(trainer)
        scaler = _L.grad_scaler(trainer)
        if scaler is not None and self._rule.action == "clamp":
            fused = [n for n, o in zip(self._names, trainer.optimizers) if _L.optimizer_handles_unscaling(o)]
            if fused:
                raise ValueError(
                    f"Invalid mode: 'value' with the fused optimizer(s) {fused} under a GradScaler: their gradients"
                    " are still loss-scaled when the callback runs. Use mode='adaptive'/'norm' or fused=False."
                )

    # ------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        index = self._index(trainer, optimizer)
        params = list(trainer.precision_plugin.main_params(optimizer))
        if getattr(self, "_kind", None) == "fsdp":
            # FSDP1: every parameter, with or without a gradient on this rank (the same list on every rank, which
            # joins the same collectives); sharded flat-parameter gradients as DTensor shards of their shard group
            if self._fsdp is None:
                self._fsdp = FlatShardLayout(_L.strategy_model(trainer))
            grads = self._fsdp.grads(params)
        else:
            params = [p for p in params if p.grad is not None]
            grads = [p.grad for p in params]
        if not params:
            return
        if any(g.is_sparse for g in grads):
            raise RuntimeError("AdaptiveGradientClipping does not support sparse gradients")
        # what the hook needs of the Trainer, read once
        step, log_step, logging = trainer.global_step, _L.batches_that_stepped(trainer), _L.should_update_logs(trainer)
        scaler = _L.grad_scaler(trainer)
        grad_scale = (
            _L.scale_tensor(scaler) if scaler is not None and _L.optimizer_handles_unscaling(optimizer) else None
        )
        last = self._last.get(index)
        again = last is not None and self._stepped_at.get(index) == step
        n = self.histogram_every_n_steps
        if not again and n is not None and (log_step + 1) % n == 0:
            per_layer = per_tensor_norms(grads).float()  # before clipping; a complex entry by |z|; whole DTensors
            log_histogram(trainer, self.metric_name("grad_norm_per_layer", index), per_layer, log_step)
        state = self._states.get(index, grads[0].device)
        # a further evaluation of the closure within one real step (LBFGS runs its closure up to max_iter times;
        # Lightning calls this hook after each): clipped with the bound the step took, counted and averaged nothing
        stats = clip_step_(
            params,
            state,
            self._rule,
            nonfinite=self.nonfinite,
            scaler_skips=scaler is not None,
            grad_scale=grad_scale,
            foreach=self.foreach,
            fused=self.fused,
            where=f"global step {step}",
            owner="AdaptiveGradientClipping",
            names=lambda: {id(p): n for n, p in pl_module.named_parameters()},
            grads=grads,
            threshold=last.threshold if again else None,
            update=not again,
        )
        if again:
            return
        self._stepped_at[index] = step
        self._last[index] = stats
        if logging:
            # the one host sync of a logging step; starts a new window. Every series at every logging step, inf and
            # nan included (TensorBoard draws no point for them): the margin chart needs its value, lower and upper
            # series at the same steps. threshold = inf on a step with no bound (the seeding step, the warm-up);
            # grad_norm = inf / nan on a non-finite step.
            self._write(trainer, index, window_metrics(stats, state, self._rule), log_step)
        if self.log_sparsity:  # arms a copy on logging steps only (after the clipping and a skip)
            self._sparsity.before_step(
                index,
                optimizer,
                logging=logging,
                write=lambda i, values: self._write(trainer, i, values, log_step, keep_nan=False),
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_sparsity:
            self._sparsity.start(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sparsity.end_batch()  # drops a copy left by a step that did not run (GradScaler skip)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sparsity.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._sparsity.close()

    # -------------------------------------------------------------- logging
    def metric_name(self, metric: str, index: int = 0) -> str:
        """The logged name of ``metric`` (a key of :data:`METRICS`) for the optimizer at ``index``."""
        return metric_tag(self.log_prefix, self._names, index, metric)

    def dashboard_layout(self, trainer: pl.Trainer) -> Layout:
        """This callback's part of the run's custom-scalars layout: one section per optimizer."""
        if not self.dashboard:
            return {}
        return per_optimizer_layout(
            self.log_prefix,
            trainer.optimizers,
            lambda name, category: clipping_layout(
                name, category, rule=self._rule, sparsity=self.log_sparsity, cumulative=self.sparsity_cumulative
            ),
        )

    def _write(
        self, trainer: pl.Trainer, index: int, values: dict[str, Any], step: int, *, keep_nan: bool = True
    ) -> None:
        """Log ``values`` (metric key -> float or 0-d tensor) of the optimizer at ``index`` at ``step``: the one path
        of the clipping's and the sparsity's metrics, written straight to the loggers at the step Lightning's own
        metrics of the batch use."""
        name = lambda key: self.metric_name(key, index)  # noqa: E731
        log_values(trainer, values, name, step, self.last_metrics, keep_nan=keep_nan)

    # ------------------------------------------------------------- helpers
    def _index(self, trainer: pl.Trainer, optimizer: Optimizer) -> int:
        for i, opt in enumerate(trainer.optimizers):
            if opt is optimizer:
                return i
        return 0

    def clip_state(self, index: int = 0) -> ClipState | None:
        """The live state of the optimizer at ``index`` (``None`` before its first step)."""
        return self._states.live(index)

    # ---------------------------------------------------------- checkpoints
    def _reset(self) -> None:
        """Forget every state: the averages, the counts, a state loaded but not used yet, the last metrics."""
        self._states.reset()
        self._last = {}
        self._stepped_at = {}
        self.last_metrics = {}

    def state_dict(self) -> dict[str, Any]:
        """``{"rule": settings, "identity": what the states depend on, "log_prefix": str, "states": {optimizer
        index: {name: tensor}}}``: plain Python values and CPU tensors only, so the checkpoint loads with
        ``torch.load(weights_only=True)``."""
        return {
            "rule": rule_entry(self._rule),
            "identity": self._rule.identity(),
            "log_prefix": self.log_prefix,
            "states": self._states.saved(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the saved states when they were saved with this rule's identity (for the built-in rules: ``mode``
        and ``beta``); otherwise warn once, naming both, and start from a fresh state."""
        self._reset()
        self._states.load(state_dict, state_dict.get("states") or {})

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Report clipping states a checkpoint holds under other keys when it holds none under :attr:`state_key`
        (a renamed ``log_prefix``, or another version's key) and no callback of the Trainer claims them: the
        callback starts fresh and one warning names them, so nothing saved is silently dropped."""
        saved = checkpoint.get("callbacks") or {}
        if self.state_key in saved:
            return
        claimed = {cb.state_key for cb in trainer.callbacks}
        orphans = {k: v for k, v in saved.items() if k not in claimed and saved_identity(v) is not None}
        if orphans:
            found = "; ".join(f"{k!r} with {spell(saved_identity(v))}" for k, v in orphans.items())
            self._states.warn_unusable(
                f"the checkpoint holds clipping states under keys no callback of this Trainer has ({found})"
            )
