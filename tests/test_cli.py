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


# ------------------------------------------------------------------ the command as a user meets it
def _console(args: list[str], cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "lightning-clip")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "lightning_clip.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=300, cwd=str(cwd), env={**os.environ, **(env or {})}
    )


def test_builtin_configs_are_listed_and_shown_from_any_directory(tmp_path, capsys, monkeypatch):
    listed = _console(["configs"], tmp_path)  # the installed command, outside the repository
    assert listed.returncode == 0, listed.stderr
    for path in CONFIGS:
        assert os.path.basename(path)[: -len(".yaml")] in listed.stdout
    monkeypatch.chdir(tmp_path)
    assert _main(["configs", "show", "demo"]) == 0
    with open(os.path.join(ROOT, "configs", "demo.yaml")) as f:
        assert capsys.readouterr().out == f.read()
    assert _main(["configs", "show", "nope"]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err


def test_fit_without_config_is_the_demo_with_clipping(capsys, monkeypatch, tmp_path):
    from lightning_clip.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    with open(os.path.join(ROOT, "configs", "demo.yaml")) as f:
        demo = yaml.safe_load(f)
    assert printed["trainer"]["max_epochs"] == demo["trainer"]["max_epochs"] == 10
    assert printed["model"]["spike_every"] == demo["model"]["spike_every"]
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == ["lightning_clip.AdaptiveGradientClipping"]


def test_builtin_config_by_name(capsys, monkeypatch, tmp_path):
    from lightning_clip.cli import main

    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name resolves to the packaged file
    for spelling in ("adam_fixed", "adam_fixed.yaml", "configs/adam_fixed.yaml"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", spelling, "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["callbacks"][0]["init_args"]["mode"] == "norm"
        assert printed["trainer"]["callbacks"][0]["init_args"]["clip_val"] == 2.38


def test_demo_shows_the_threshold_holding_a_spike(tmp_path):
    """The default job's spike at step 99 is clipped to the threshold; the steps around it are untouched."""
    from lightning_clip.cli import main

    rc = main(
        [
            "fit",
            "--trainer.max_steps=101",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert rc == 0
    s = {k: dict(v) for k, v in read_scalars(tmp_path / "runs" / "demo").items()}
    norm, thr, coef = s["clip/grad_norm"], s["clip/threshold"], s["clip/clip_coef"]
    assert sorted(norm) == list(range(9, 100, 10))  # log_every_n_steps=10: the spike step 99 is a logging step
    assert norm[99] > 20 * thr[99]  # the spike: far above the ceiling
    assert coef[99] == pytest.approx(thr[99] / norm[99], rel=1e-5)  # post-clip norm = threshold
    assert all(coef[step] == 1.0 for step in norm if step != 99)  # ordinary steps pass untouched
    assert s["train/spike"] == {99: 1.0}


def _main(args: list[str]) -> int:
    from lightning_clip.cli import main

    try:
        return main(args)
    except SystemExit as exc:  # jsonargparse's own errors exit from the parser
        return int(exc.code or 0)


def test_bad_values_end_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_clip.AdaptiveGradientClipping\n"
        "      init_args: {beta: 1.5}\n"
    )
    cases = [
        (["fit", "--trainer.callbacks.alpha=-1"], "Invalid alpha: -1.0"),
        (["fit", "--model.lr=abc"], "Invalid model.lr: 'abc'"),
        (["fit", "--trainer.max_epochs=x"], "Invalid trainer.max_epochs: 'x'"),
        (["fit", "--model.spike_every=-3"], "Invalid spike_every: -3"),
        (["fit", "--config", str(bad_yaml)], "Invalid beta: 1.5"),
        (["fit", "--trainer.gradient_clip_val=1", "--trainer.max_steps=1"], "Invalid gradient_clip_val: 1.0"),
    ]
    for args, expected in cases:
        rc = _main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2, (args, err[-2000:])
        assert lines[-1].startswith(f"lightning-clip: error: {expected}"), (args, lines[-3:])
        assert "Traceback" not in err and "usage:" not in err
    # nothing trained: no checkpoint, and no scalar in any event file
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert not read_scalars(tmp_path / "runs")


def test_bad_value_from_the_console_script(tmp_path):
    out = _console(["fit", "--trainer.callbacks.alpha=-1"], tmp_path)
    assert out.returncode == 2
    expected = "lightning-clip: error: Invalid alpha: -1.0; expected a finite number > 0"
    assert out.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in out.stderr


def test_missing_cli_extra_names_the_install_line(tmp_path):
    script = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mnist1d': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from lightning_clip.cli import main\n"
        "sys.exit(main(['fit']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        'lightning-clip: the command needs mnist1d (the "cli" extra): pip install "lightning-clip[cli]"'
    )
