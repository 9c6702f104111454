"""Both Lightning namespaces, in one process and with one of them missing.

``lightning.pytorch`` and ``pytorch_lightning`` are distinct copies of the same code: these tests use the real
Trainer, strategies, loggers and LightningCLI of each, side by side, whatever ``$LIGHTNING_CLIP_NAMESPACE`` says.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import AdaptiveGradientClipping, UpdateSparsityMonitor
from lightning_clip import _lightning as _L
from tests.conftest import norm64, read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMESPACES = [n for n in ("lightning.pytorch", "pytorch_lightning") if n in _L.installed()]
pytestmark = pytest.mark.skipif(len(NAMESPACES) < 2, reason="needs both lightning and pytorch_lightning installed")


def _model_class(ns: str) -> type:
    pl = importlib.import_module(ns)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)
            self.norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y) * (100.0 if self.global_step == 5 else 1.0)

        def on_after_backward(self) -> None:
            self.norms.append(norm64([p.grad for p in self.parameters()]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=8)


def _trainer(ns: str, tmp_path, **kwargs):
    pl = importlib.import_module(ns)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def test_the_callbacks_are_callbacks_of_every_installed_namespace():
    for ns in NAMESPACES:
        base = importlib.import_module(f"{ns}.callbacks.callback").Callback
        assert issubclass(AdaptiveGradientClipping, base) and issubclass(UpdateSparsityMonitor, base)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_same_clipping_under_each_namespace(ns, tmp_path):
    """One callback class, two Trainers: the threshold holds the spike at step 5 in both, with the same numbers."""
    pl = importlib.import_module(ns)
    pl.seed_everything(0, verbose=False)
    model = _model_class(ns)()
    cb = AdaptiveGradientClipping(alpha=2.0, beta=0.5)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = _trainer(ns, tmp_path, logger=logger, callbacks=[cb, UpdateSparsityMonitor()])
    trainer.fit(model, _loader())
    assert int(cb.clip_state().seen) == 8
    # float64 reference of the rule over the recorded pre-clip norms
    m = model.norms[0]
    for n in model.norms[1:6]:
        threshold = 2.0 * m
        m = 0.5 * m + 0.5 * n
    assert model.norms[5] > threshold  # the spike step is clipped ...
    scalars = read_scalars(logger.log_dir)
    coef = dict(scalars["clip/clip_coef"])[5]
    assert coef == pytest.approx(threshold / model.norms[5], rel=1e-5)  # ... to the threshold
    assert "sparsity/update_sparsity" in scalars  # the monitor logs in this namespace too
    assert "custom_scalars__config__" not in scalars  # the layout is not a scalar series


@pytest.mark.parametrize("ns", NAMESPACES)
def test_strategy_checks_follow_the_trainers_namespace(ns, tmp_path):
    pl = importlib.import_module(ns)
    assert _L.strategy_kind(_trainer(ns, tmp_path)) == "single"
    assert _L.strategy_kind(_trainer(ns, tmp_path, strategy="ddp")) == "ddp"
    assert _L.namespace_of(_trainer(ns, tmp_path)).name == ns

    class CPUFSDP(pl.strategies.FSDPStrategy):  # Lightning only builds FSDP on CUDA; the subclass lets setup run
        pass

    trainer = _trainer(ns, tmp_path, strategy=CPUFSDP(), callbacks=[AdaptiveGradientClipping()])
    assert _L.strategy_kind(trainer) == "fsdp"  # resolved in the Trainer's namespace: accepted, FSDP1 layout
    AdaptiveGradientClipping().setup(trainer, _model_class(ns)(), "fit")


@pytest.mark.parametrize("ns", NAMESPACES)
def test_private_name_fallbacks_agree_with_lightning(ns, tmp_path):
    """The public-name fallbacks of _lightning.py decide the logging steps exactly as Lightning's connector."""
    pl = importlib.import_module(ns)
    seen: list[tuple[bool, bool, int, int]] = []

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(
                (
                    _L.should_update_logs(trainer),
                    _L.should_update_logs_fallback(trainer),
                    _L.batches_that_stepped(trainer),
                    trainer.global_step,
                )
            )

    trainer = _trainer(ns, tmp_path, max_steps=12, log_every_n_steps=4, logger=False, callbacks=[Probe()])
    trainer.fit(_model_class(ns)(), _loader())
    assert [s[0] for s in seen] == [s[1] for s in seen]
    assert [s[0] for s in seen] == [(i + 1) % 4 == 0 or i == 11 for i in range(12)]
    assert [s[2] for s in seen] == [s[3] for s in seen] == list(range(12))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_yaml_class_paths_under_each_namespaces_cli(ns, tmp_path):
    """LightningCLI of either namespace accepts class_path: lightning_clip.AdaptiveGradientClipping / monitor."""
    cli_mod = importlib.import_module(f"{ns}.cli")
    demos = importlib.import_module(f"{ns}.demos.boring_classes")
    config = {
        "trainer": {
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_clip.AdaptiveGradientClipping", "init_args": {"alpha": 2.5, "beta": 0.8}},
                {"class_path": "lightning_clip.UpdateSparsityMonitor", "init_args": {"tol": 0.2}},
            ],
        }
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_mod.LightningCLI(demos.BoringModel, demos.BoringDataModule, args=["fit", "--config", str(path)])
    (clip,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    (mon,) = [c for c in cli.trainer.callbacks if isinstance(c, UpdateSparsityMonitor)]
    assert (clip.alpha, clip.beta, mon.tol) == (2.5, 0.8, 0.2)
    assert int(clip.clip_state().seen) == 2


@pytest.mark.parametrize("missing", ["pytorch_lightning", "lightning"])
def test_works_with_only_one_namespace_installed(missing, tmp_path):
    """With one package hidden from the import system, the callbacks derive from the other one only and train."""
    present = "lightning.pytorch" if missing == "pytorch_lightning" else "pytorch_lightning"
    script = textwrap.dedent(
        f"""
        import importlib, sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == {missing!r} or name.startswith({missing!r} + "."):
                    raise ImportError("hidden: " + name)
        sys.meta_path.insert(0, Hide())
        from lightning_clip import AdaptiveGradientClipping, _lightning
        pl = importlib.import_module({present!r})
        assert _lightning.installed() == ({present!r},), _lightning.installed()
        assert len(_lightning.CALLBACK_BASES) == 1
        demos = importlib.import_module({present!r} + ".demos.boring_classes")
        cb = AdaptiveGradientClipping()
        trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", default_root_dir={str(tmp_path)!r},
                             callbacks=[cb])
        trainer.fit(demos.BoringModel())
        print("steps", int(cb.clip_state().seen), {missing!r} in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != _L.NAMESPACE_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps 3 False" in out.stdout
