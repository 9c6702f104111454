"""The ``lightning-clip`` LightningCLI: every config in configs/ parses and fits, through real jsonargparse."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from lightning_clip import AdaptiveGradientClipping
from lightning_clip.cli import build_cli
from tests.conftest import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _quick(tmp_path) -> list[str]:
    return [
        "--trainer.max_steps=6",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]


def test_there_are_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"adam_adaptive.yaml", "adam_fixed.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", config, "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    with open(config) as f:
        written = yaml.safe_load(f)
    assert printed["trainer"]["max_epochs"] == written["trainer"]["max_epochs"]
    for key, value in written.get("model", {}).items():
        if not isinstance(value, dict):
            assert printed["model"][key] == value


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_fits_and_logs_clipping(config, tmp_path):
    cli = build_cli(["fit", "--config", config, *_quick(tmp_path)])
    assert cli.trainer.global_step == 6
    clips = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    with open(config) as f:
        written = yaml.safe_load(f)
    wanted = [
        c for c in written["trainer"].get("callbacks", []) if c["class_path"].endswith("AdaptiveGradientClipping")
    ]
    assert len(clips) == len(wanted)
    for cb, spec in zip(clips, wanted):
        for key, value in spec.get("init_args", {}).items():
            assert getattr(cb, key) == value
        assert int(cb.clip_state().seen) == 6
    if clips:
        tags = read_scalars(tmp_path / "runs")
        assert len(tags["clip/grad_norm"]) == 3


def test_cli_arguments_reach_the_callback(tmp_path):
    cli = build_cli(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "adam_adaptive.yaml"),
            *_quick(tmp_path),
            "--trainer.callbacks.init_args.alpha=0.5",
            "--model.lr=0.003",
        ]
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    assert cb.alpha == 0.5 and cb.rule.alpha == 0.5
    assert cli.model.lr == 0.003


def test_bad_callback_argument_fails_before_training(tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)):
        build_cli(
            [
                "fit",
                "--config",
                os.path.join(ROOT, "configs", "adam_adaptive.yaml"),
                *_quick(tmp_path),
                "--trainer.callbacks.init_args.beta=1.5",
            ]
        )
    assert not (tmp_path / "runs").exists() or not glob.glob(str(tmp_path / "runs" / "**" / "events.*"), recursive=True)


def test_console_script_main_job(tmp_path):
    """The README's main job, as the installed console script, says where the logs are and exits 0."""
    exe = os.path.join(os.path.dirname(sys.executable), "lightning-clip")
    if not os.path.exists(exe):
        exe_cmd = [sys.executable, "-m", "lightning_clip.cli"]
    else:
        exe_cmd = [exe]
    out = subprocess.run(
        [*exe_cmd, "fit", "--config", os.path.join(ROOT, "configs", "adam_adaptive.yaml"), *_quick(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tensorboard --logdir" in out.stdout
    assert glob.glob(str(tmp_path / "runs" / "adam_adaptive" / "version_0" / "events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("args", "cls", "expected"),
    [
        (
            ["--optimizer", "lightning_clip.SmoothedSignSGD", "--optimizer.lr", "0.05"],
            "SmoothedSignSGD",
            {"lr": 0.05, "beta": 0.9},
        ),
        (
            ["--optimizer", "lightning_clip.SmoothedNormSGD", "--optimizer.lr", "0.3", "--optimizer.norm", "tensor"],
            "SmoothedNormSGD",
            {"lr": 0.3, "norm": "tensor"},
        ),
        (
            [
                "--model.optimizer",
                "lightning_clip.SmoothedSignSGD",
                "--model.optimizer.lr",
                "0.02",
                "--model.optimizer.beta",
                "0.8",
            ],
            "SmoothedSignSGD",
            {"lr": 0.02, "beta": 0.8},
        ),
        (
            [
                "--optimizer",
                "lightning_clip.GroupedSmoothedSignSGD",
                "--optimizer.lr",
                "0.05",
                "--optimizer.weight_decay",
                "0.1",
            ],
            "GroupedSmoothedSignSGD",
            {"lr": 0.05},
        ),
    ],
    ids=["automatic-sign", "automatic-norm", "injected", "grouped"],
)
def test_optimizer_selected_from_the_command_line(args, cls, expected, tmp_path):
    cli = build_cli(["fit", "--config", os.path.join(ROOT, "configs", "adam_adaptive.yaml"), *_quick(tmp_path), *args])
    (opt,) = cli.trainer.optimizers
    assert type(opt).__name__ == cls
    for key, value in expected.items():
        assert all(group[key] == value for group in opt.param_groups), key
    assert all(len(opt.state[p]) >= 1 for g in opt.param_groups for p in g["params"])  # it stepped
    if cls.startswith("Grouped"):
        decays = sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays == [0.0, 0.1]


def test_unknown_optimizer_argument_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        build_cli(
            [
                "fit",
                "--config",
                os.path.join(ROOT, "configs", "adam_adaptive.yaml"),
                *_quick(tmp_path),
                "--optimizer",
                "lightning_clip.SmoothedSignSGD",
                "--optimizer.betaa",
                "0.9",
            ]
        )


def test_lightning_lr_scheduler_drives_the_smoothed_optimizer(tmp_path):
    args = [a for a in _quick(tmp_path) if not a.startswith(("--trainer.max_steps", "--trainer.max_epochs"))]
    cli = build_cli(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "smoothed_signsgd.yaml"),
            *args,
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=2",
            "--lr_scheduler",
            "torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.5",
        ]
    )
    (opt,) = cli.trainer.optimizers
    assert cli.trainer.global_step == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005 * 0.5**3)
