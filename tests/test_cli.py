"""The ``lightning-clip`` LightningCLI: every config in configs/ parses and fits, through real jsonargparse."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

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


# ------------------------------------------------------------------ a wrong key or value under a class_path
def _bad_callback_yaml(tmp_path, init_args: str, name: str = "bad.yaml", cls: str = "AdaptiveGradientClipping"):
    path = tmp_path / name
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_clip.UpdateSparsityMonitor\n"
        f"    - class_path: lightning_clip.{cls}\n      init_args: {init_args}\n"
    )
    return str(path)


_CHOICE = "Invalid trainer.callbacks.nonfinite: 'ignore' is not one of 'zero', 'skip', 'error'"
_UNKNOWN = "Invalid trainer.callbacks: alpah is not an argument of AdaptiveGradientClipping; did you mean alpha?"
_BAD_CLASS_SETTINGS = [
    ("cli-choice", ["--trainer.callbacks.nonfinite=ignore"], _CHOICE),
    ("cli-choice-init_args", ["--trainer.callbacks.init_args.nonfinite=ignore"], _CHOICE),
    ("cli-unknown", ["--trainer.callbacks.alpah=2"], _UNKNOWN),
    ("cli-type", ["--trainer.callbacks.alpha=abc"], "Invalid trainer.callbacks.alpha: 'abc'; expected float"),
    ("yaml-choice", ["--config", lambda p: _bad_callback_yaml(p, "{alpha: 2, nonfinite: ignore}")], _CHOICE),
    ("yaml-unknown", ["--config", lambda p: _bad_callback_yaml(p, "{alpah: 2}")], _UNKNOWN),
    (
        "yaml-type",
        ["--config", lambda p: _bad_callback_yaml(p, "{alpha: abc}")],
        "Invalid trainer.callbacks.alpha: 'abc'; expected float",
    ),
    (
        "yaml-class-typo",
        ["--config", lambda p: _bad_callback_yaml(p, "{alpha: 2}", cls="AdaptiveGradientClippin")],
        (
            "Invalid trainer.callbacks: lightning_clip.AdaptiveGradientClippin: module 'lightning_clip' has no "
            "attribute 'AdaptiveGradientClippin'; did you mean lightning_clip.AdaptiveGradientClipping"
        ),
    ),
    (
        "optimizer-unknown",
        ["--config", "smoothed_signsgd", "--optimizer.init_args.betta=0.9"],
        "Invalid optimizer: betta is not an argument of SmoothedSignSGD; did you mean beta?",
    ),
    (
        "torch-optimizer-unknown",
        ["--optimizer=torch.optim.Adam", "--optimizer.betta=0.9"],
        "Invalid optimizer: betta is not an argument of Adam; did you mean betas?",
    ),
    (
        "optimizer-type",
        ["--config", "smoothed_signsgd", "--optimizer.init_args.lr=fast"],
        "Invalid optimizer.lr: 'fast'; expected float",
    ),
    (
        "injected-optimizer-unknown",
        ["--config", "smoothed_normsgd", "--model.optimizer.init_args.betta=0.9"],
        "Invalid model.optimizer: betta is not an argument of SmoothedNormSGD; did you mean beta?",
    ),
    (
        "injected-optimizer-choice",
        ["--config", "smoothed_normsgd", "--model.optimizer.norm=l2"],
        "Invalid model.optimizer.norm: 'l2' is not one of 'global', 'tensor', 'rms'",
    ),
    (
        "scheduler-unknown",
        ["--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_sise=1"],
        "Invalid lr_scheduler: step_sise is not an argument of StepLR; did you mean step_size?",
    ),
    (
        "logger-unknown",
        ["--trainer.logger.init_args.save_dri=x"],
        "Invalid trainer.logger: save_dri is not an argument of TensorBoardLogger; did you mean save_dir?",
    ),
    (
        "unknown-no-close-name",
        ["--trainer.callbacks.zzz=1"],
        "Invalid trainer.callbacks: zzz is not an argument of AdaptiveGradientClipping; it takes alpha, beta, mode,",
    ),
    ("trainer-choice", ["--trainer.precision=7"], "Invalid trainer.precision: '7' is not one of 64, 32, 16, "),
]


@pytest.mark.parametrize(
    ("args", "expected"), [c[1:] for c in _BAD_CLASS_SETTINGS], ids=[c[0] for c in _BAD_CLASS_SETTINGS]
)
def test_bad_class_setting_names_the_key_the_value_and_what_is_accepted(args, expected, tmp_path, capsys, monkeypatch):
    """A wrong choice, type or key of a callback, an optimizer, the scheduler or the logger, from the command line
    or a YAML file: one line naming the key, the value and the accepted values (or the closest argument), before
    anything trains."""
    monkeypatch.chdir(tmp_path)
    args = [a(tmp_path) if callable(a) else a for a in args]
    rc = _main(["fit", *args, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err[-2000:]
    assert lines[-1].startswith(f"lightning-clip: error: {expected}"), lines[-3:]
    if expected.endswith(("?", "float", "'error'", "'rms'")):  # the whole message, then only the pointer to --help
        assert re.fullmatch(r"( \(see: .* --help\))?", lines[-1][len(f"lightning-clip: error: {expected}") :])
    assert "expected None" not in err and "NestedArg" not in err and "Traceback" not in err
    assert not glob.glob(str(tmp_path / "**" / "events.*"), recursive=True)  # nothing trained, nothing logged


def test_wrong_choice_from_the_console_script(tmp_path):
    """The issue's command, as the installed script runs it."""
    out = _console(["fit", "--trainer.callbacks.nonfinite=ignore"], tmp_path, env={"PYTHONPATH": ROOT})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"lightning-clip: error: {_CHOICE} (see: lightning-clip fit --help)"
    assert not (tmp_path / "runs").exists()


def test_valid_class_settings_still_parse(capsys):
    """The checks reject nothing valid: every argument of the callback and the optimizer given at once."""
    with pytest.raises(SystemExit) as exc:
        build_cli(
            [
                "fit",
                "--config",
                os.path.join(ROOT, "configs", "smoothed_signsgd.yaml"),
                "--trainer.callbacks.nonfinite=skip",
                "--trainer.callbacks.mode=norm",
                "--trainer.callbacks.clip_val=2",
                "--trainer.callbacks.foreach=false",
                "--trainer.callbacks.histogram_every_n_steps=5",
                "--optimizer.init_args.beta=0.8",
                "--optimizer.weight_decay=0.01",
                "--print_config",
            ]
        )
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    cb = printed["trainer"]["callbacks"][0]["init_args"]
    assert (cb["nonfinite"], cb["mode"], cb["clip_val"], cb["foreach"], cb["histogram_every_n_steps"]) == (
        "skip",
        "norm",
        2.0,
        False,
        5,
    )
    assert printed["optimizer"]["init_args"]["beta"] == 0.8
    assert printed["optimizer"]["init_args"]["weight_decay"] == 0.01


# ------------------------------------------------------------------ validate / test / predict on the held-out split
@pytest.fixture(scope="module")
def held_out():
    """mnist1d's held-out split, generated here directly (not through lightning_clip.demo)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return torch.as_tensor(data["x_test"], dtype=torch.float32), torch.as_tensor(data["y_test"]).long()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A short fit of the demo that leaves a checkpoint: (its path, the network rebuilt from it in plain torch)."""
    root = tmp_path_factory.mktemp("fit")
    build_cli(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            *_quick(root),
            "--trainer.enable_checkpointing=true",
        ]
    )
    (ckpt,) = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    net = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items()})
    return ckpt, net.eval()


def _eval_args(tmp_path, ckpt: str, *more: str) -> list[str]:
    return [
        "--config",
        os.path.join(ROOT, "configs", "demo.yaml"),
        f"--ckpt_path={ckpt}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *more,
    ]


@pytest.mark.parametrize(
    ("more", "n"),
    [
        ([], 1000),
        (["--data.eval_batch_size=300", "--trainer.limit_test_batches=2", "--trainer.limit_val_batches=2"], 600),
    ],
    ids=["whole-split", "two-batches-of-300"],
)
def test_test_and_validate_report_the_checkpoints_loss_and_accuracy_on_the_held_out_split(
    more, n, fitted, held_out, tmp_path, capsys
):
    """``lightning-clip test`` (and ``validate``) from a checkpoint: the printed and logged loss and accuracy are the
    checkpoint's network's on the first ``n`` held-out sequences, computed here in plain torch."""
    ckpt, net = fitted
    x, y = held_out
    with torch.no_grad():
        logits = net(x[:n])
    want_loss = float(nn.functional.cross_entropy(logits, y[:n]))
    want_acc = float((logits.argmax(-1) == y[:n]).double().mean())
    assert 0.0 < want_acc < 1.0
    for stage, prefix in (("test", "test"), ("validate", "val")):
        capsys.readouterr()
        cli = build_cli([stage, *_eval_args(tmp_path, ckpt, *more)])
        printed = dict(re.findall(rf"({prefix}/(?:loss|acc))\s+([-+0-9.eE]+)", capsys.readouterr().out))
        logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        for metrics in (printed, logged):
            assert float(metrics[f"{prefix}/loss"]) == pytest.approx(want_loss, rel=1e-5), (stage, metrics)
            assert float(metrics[f"{prefix}/acc"]) == pytest.approx(want_acc, abs=1e-6), (stage, metrics)


def test_predict_saves_one_class_per_held_out_example(fitted, held_out, tmp_path):
    """``lightning-clip predict`` as the installed script runs it: the classes of all 1000 held-out sequences, in
    order, equal to the checkpoint's network applied directly; the same in batches of 300 (the last one short)."""
    ckpt, net = fitted
    x, _ = held_out
    with torch.no_grad():
        want = net(x).argmax(-1)
    path = tmp_path / "predictions.pt"
    out = _console(["predict", *_eval_args(tmp_path, ckpt)], tmp_path, env={"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Predictions: {len(x)} classes saved to {path}" in out.stdout
    predictions = torch.load(path)
    assert predictions.shape == (len(x),) == (1000,)
    assert torch.equal(predictions, want)
    path.unlink()
    assert _main(["predict", *_eval_args(tmp_path, ckpt, "--data.eval_batch_size=300")]) == 0
    assert torch.equal(torch.load(path), want)
