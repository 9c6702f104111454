"""The ``lightning-clip`` console script: a LightningCLI over the built-in mnist1d example.

``lightning-clip fit`` runs the built-in ``demo`` config (Adam + adaptive clipping on an MLP over mnist1d, with a
rare gradient spike the clipping visibly holds); ``lightning-clip fit --config NAME`` runs another built-in config
(``lightning-clip configs`` lists them) or any YAML file. Every argument of the model, the data, the Trainer, its
callbacks (``AdaptiveGradientClipping`` among them) and the optimizer is settable from YAML or the command line
(``lightning-clip fit --help``). The Lightning namespace is ``lightning.pytorch`` when installed, else
``pytorch_lightning`` (``$LIGHTNING_CLIP_NAMESPACE`` picks one).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

#: The built-in config that ``lightning-clip fit`` (and validate/test/predict) runs when given no ``--config``.
DEFAULT_CONFIG = "demo"
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_EXTRA_HINT = 'pip install "lightning-clip[cli]"'


def builtin_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name (file name without ``.yaml``)."""
    root = resources.files("lightning_clip.configs")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def resolve_config(value: str) -> str:
    """An existing file as it is; otherwise a built-in config's path (``demo`` or ``demo.yaml``)."""
    if os.path.exists(value):
        return value
    configs = builtin_configs()
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    name = Path(name).name if Path(name).parent == Path("configs") else name  # configs/demo.yaml from anywhere
    if name in configs:
        return str(configs[name])
    return value  # jsonargparse reports the missing file


def _rewrite_args(argv: list[str]) -> list[str]:
    """Resolve ``--config`` values to built-in configs where they name one, and add the default config to a
    subcommand given none."""
    out: list[str] = []
    has_config = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            has_config = True
            i += 2
            continue
        if arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
            has_config = True
        else:
            out.append(arg)
        i += 1
    if not has_config and out and out[0] in _SUBCOMMANDS and not any(a in ("-h", "--help") for a in out):
        out[1:1] = ["--config", str(builtin_configs()[DEFAULT_CONFIG])]
    return out


def _configs_command(argv: Sequence[str]) -> int:
    configs = builtin_configs()
    if len(argv) >= 2 and argv[0] == "show":
        name = argv[1][: -len(".yaml")] if argv[1].endswith(".yaml") else argv[1]
        if name not in configs:
            print(f"lightning-clip: error: unknown config {argv[1]!r}; built-in: {', '.join(configs)}", file=sys.stderr)
            return 2
        print(configs[name].read_text(), end="")
        return 0
    if argv:
        print("usage: lightning-clip configs [show NAME]", file=sys.stderr)
        return 2
    print("Built-in configs (lightning-clip fit --config NAME; lightning-clip configs show NAME > my.yaml to copy):")
    for name, path in configs.items():
        first = next((ln[2:].strip() for ln in path.read_text().splitlines() if ln.startswith("# ")), "")
        mark = " (default)" if name == DEFAULT_CONFIG else ""
        print(f"  {name:<18}{first}{mark}")
    return 0


def _missing_extra() -> str | None:
    needed = (("jsonargparse", "jsonargparse[signatures]"), ("docstring_parser", "jsonargparse[signatures]"))
    for module, what in needed:
        try:
            __import__(module)
        except ImportError:
            return what
    try:
        __import__("mnist1d")
    except ImportError:
        return "mnist1d"
    return None


def _user_error(err: BaseException | None) -> BaseException | None:
    """The bad setting behind ``err``: a ValueError/TypeError that this package's validation raised (``"Invalid
    <argument>: <value>; ..."``), found in ``err`` or in the exceptions that caused it (jsonargparse wraps them)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ValueError, TypeError)) and str(err).startswith("Invalid"):
            frames = traceback.extract_tb(err.__traceback__)
            if frames and f"{os.sep}lightning_clip{os.sep}" in frames[-1].filename:
                return err
        err = err.__cause__ or err.__context__
    return None


def condense_parser_error(message: str) -> str:
    """One line from jsonargparse's error report: the argument's full key, the value given and the types expected.

    ``Parser key "trainer.max_epochs": ... Expected a <class 'int'> ... Given value: x`` becomes
    ``Invalid trainer.max_epochs: 'x'; expected int or None``. A message without a key (an unknown argument, a
    missing file) keeps its first line.
    """
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    if not keys:
        return message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    value = re.search(r"Got value: (.*)", message) or re.search(r"Given value: (.*)", message)
    types = list(dict.fromkeys(re.findall(r"Expected a <class '([^']+)'>", message)))
    types = ["None" if t == "NoneType" else t.rsplit(".", 1)[-1] for t in types]
    key = ".".join(keys)
    if not types or value is None:
        last = re.sub(r'^(Parser key "[^"]+":\s*)+', "", message.strip().splitlines()[-1].strip())
        return f"Invalid {key}: {last}"
    return f"Invalid {key}: {value.group(1).strip()!r}; expected {' or '.join(types)}"


class _BadSetting(ValueError):
    """A setting rejected while the CLI instantiated the classes."""


def build_cli(args: Any = None, run: bool = True) -> Any:
    """The CLI over the mnist1d example; ``args`` and ``run`` as for Lightning's ``LightningCLI``.

    ``args`` is taken as it is: no built-in config is added or resolved (that is :func:`main`'s job).
    """
    from lightning_clip import _lightning
    from lightning_clip.demo import MNIST1DClassifier, MNIST1DDataModule

    ns = _lightning.preferred()

    LightningCLI = ns.get("cli", "LightningCLI")
    LightningArgumentParser = ns.get("cli", "LightningArgumentParser")

    class ClipArgumentParser(LightningArgumentParser):
        """Reports a bad argument in one line (``lightning-clip fit --help`` lists them all)."""

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            if not self.exit_on_error:
                super().error(message, ex)
            prog = self.prog.replace(" [options]", "")
            sys.stderr.write(f"lightning-clip: error: {condense_parser_error(message)} (see: {prog} --help)\n")
            sys.exit(2)

    class ClipCLI(LightningCLI):
        """LightningCLI that says, after ``fit``, where the TensorBoard logs are and what they hold."""

        def init_parser(self, **kwargs: Any) -> Any:
            parser = super().init_parser(**kwargs)
            parser.__class__ = ClipArgumentParser  # every Lightning version builds its parsers here
            return parser

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as err:
                bad = _user_error(err)
                if bad is None:
                    raise
                raise _BadSetting(str(bad).splitlines()[0]) from None

        def after_fit(self) -> None:
            if not self.trainer.is_global_zero:
                return
            from lightning_clip.callback import AdaptiveGradientClipping
            from lightning_clip.monitor import UpdateSparsityMonitor

            dashboards = [
                cb
                for cb in self.trainer.callbacks
                if isinstance(cb, (AdaptiveGradientClipping, UpdateSparsityMonitor)) and cb.dashboard
            ]
            for logger in self.trainer.loggers:
                if not _lightning.is_tensorboard_logger(logger):
                    continue
                what = (
                    "the CUSTOM SCALARS tab holds the clipping dashboard"
                    if dashboards
                    else "no clipping callback ran: the SCALARS tab holds the Trainer's own metrics"
                )
                print(
                    f"\nTensorBoard logs: {os.path.abspath(logger.log_dir)}\n"
                    f"Open the dashboard with:  tensorboard --logdir {logger.save_dir}\n"
                    f"then browse http://localhost:6006 ({what}).",
                    flush=True,
                )

    return ClipCLI(MNIST1DClassifier, MNIST1DDataModule, seed_everything_default=0, args=args, run=run)


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-clip`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["configs"]:
        return _configs_command(argv[1:])
    missing = _missing_extra()
    if missing is not None:
        print(f"lightning-clip: the command needs {missing} (the \"cli\" extra): {_EXTRA_HINT}", file=sys.stderr)
        return 1
    argv = _rewrite_args(argv)
    try:
        if args is None:  # the console script: LightningCLI reads sys.argv itself
            sys.argv[1:] = argv
            build_cli()
        else:
            build_cli(argv)
    except Exception as err:
        bad = err if isinstance(err, _BadSetting) else _user_error(err)
        if bad is None:
            raise
        print(f"lightning-clip: error: {str(bad).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def console() -> None:  # pragma: no cover - the console script's wrapper
    try:
        code = main()
    except BrokenPipeError:  # `lightning-clip configs | head`
        sys.stderr.close()
        code = 0
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
