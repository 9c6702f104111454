"""The ``lightning-clip`` console script: a LightningCLI over the built-in mnist1d example.

``lightning-clip fit`` runs the built-in ``demo`` config (Adam + adaptive clipping on an MLP over mnist1d, with a
rare gradient spike the clipping visibly holds); ``lightning-clip fit --config NAME`` runs another built-in config
(``lightning-clip configs`` lists them) or any YAML file. Every argument of the model, the data, the Trainer, its
callbacks (``AdaptiveGradientClipping`` among them) and the optimizer is settable from YAML or the command line
(``lightning-clip fit --help``). ``lightning-clip validate``, ``test`` and ``predict`` run on mnist1d's 1000 held-out
sequences (from a fit's checkpoint with ``--ckpt_path``); ``predict`` saves the predicted classes to
``predictions.pt`` in the Trainer's ``default_root_dir``. The Lightning namespace is ``lightning.pytorch`` when
installed, else ``pytorch_lightning`` (``$LIGHTNING_CLIP_NAMESPACE`` picks one).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

#: The built-in config that ``lightning-clip fit`` (and validate/test/predict) runs when given no ``--config``.
DEFAULT_CONFIG = "demo"
_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The file, in the Trainer's ``default_root_dir``, where ``lightning-clip predict`` saves the predicted classes.
PREDICTIONS_FILE = "predictions.pt"
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
    """One line from jsonargparse's error report: the argument's full key, the value given and what it accepts.

    ``Parser key "trainer.max_epochs": ... Expected a <class 'int'> ... Given value: x`` becomes
    ``Invalid trainer.max_epochs: 'x'; expected int or None``; a value outside a ``Literal`` becomes
    ``Invalid trainer.callbacks.nonfinite: 'ignore' is not one of 'zero', 'skip', 'error'``. For a class given by
    ``class_path`` (a callback, the optimizer, the scheduler, the logger) the report on that class is read, not the
    union of everything the argument accepts: an unknown key becomes ``Invalid trainer.callbacks: alpah is not an
    argument of AdaptiveGradientClipping; did you mean alpha?``. A message without a key (an unknown top-level
    argument, a missing file) keeps its first line.
    """
    return _condense(message, [], None)


#: The report on one class in jsonargparse's list of the union's failures; the first is the class given.
_CLASS_PROBLEM = re.compile(
    r"^(?P<indent>[ \t]*)(?:- )?Problem with given class_path '(?P<cls>[^']+)':[ \t]*$", re.MULTILINE
)
#: The same for a callable argument (``model.optimizer``), which reports on one line ending in ``Namespace(...)``.
_CALLABLE_PROBLEM = re.compile(
    r"^(?P<indent>[ \t]*)- Type .*? expects a function or a callable class: (?P<rest>.*)$", re.MULTILINE
)
_NAMESPACE_TAIL = re.compile(r"\.? Got value: Namespace\(.*$")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\](?=\.\s|\s*$)", re.MULTILINE)


def _class_problem(message: str) -> tuple[int, str, str] | None:
    """Where the first class's report starts in ``message``, the class path and the report, dedented."""
    found = [m for m in (_CLASS_PROBLEM.search(message), _CALLABLE_PROBLEM.search(message)) if m is not None]
    if not found:
        return None
    m = min(found, key=lambda match: match.start())
    indent = len(m.group("indent"))
    lines: list[str] = []
    for line in message[m.end() :].splitlines()[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line)
    report = textwrap.dedent("\n".join(lines))
    if m.re is _CALLABLE_PROBLEM:
        cls = re.search(r"class_path='([^']+)'", message[m.start() :])
        if cls is None:
            return None
        report = "\n".join(_NAMESPACE_TAIL.sub("", ln) for ln in [m.group("rest"), *report.splitlines()])
        return m.start(), cls.group(1), report
    return m.start(), m.group("cls"), report


def _condense(message: str, outer: list[str], cls: str | None, whole: str | None = None) -> str:
    """:func:`condense_parser_error` of ``message``, the report on class ``cls`` under the keys ``outer``
    (``whole``: the whole report it was cut from)."""
    problem = _class_problem(message)
    head = message if problem is None else message[: problem[0]]
    keys = [*outer, *dict.fromkeys(re.findall(r'Parser key "([^"]+)"', head))]
    if problem is not None:
        return _condense(problem[2], keys, problem[1], whole or message)
    if not keys:
        return message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    key = ".".join(keys)
    # "Option 'x' is not accepted" (jsonargparse >= 4.3x), "No action for key "x"" (older releases)
    unknown = re.search(r"Option '([^']+)' is not accepted|No action for key \"([^\"]+)\"", message)
    if cls is not None and unknown is not None:
        return f"Invalid {key}: {_unknown_argument(unknown.group(1) or unknown.group(2), cls)}"
    stray = _stray_init_arg(whole or message, cls) if cls is not None else None
    if stray is not None:  # older releases report the required argument a misspelt one left unset
        return f"Invalid {key}: {_unknown_argument(stray, cls)}"  # type: ignore[arg-type]
    detail = _value_detail(message)
    if detail is not None:
        return f"Invalid {key}: {detail}"
    lines = message.strip().splitlines() or ["invalid value"]
    if cls is not None:  # e.g. a class path that does not import
        return f"Invalid {key}: {cls}: {lines[0].strip()}{_missing_class_hint(lines[0])}"
    last = re.sub(r'^(Parser key "[^"]+":\s*)+', "", lines[-1].strip())
    return f"Invalid {key}: {last}"


def _stray_init_arg(report: str, cls: str) -> str | None:
    """A key of the ``init_args`` the report shows as given (``Given value: Namespace(class_path=...,
    init_args=Namespace(step_sise='3', ...))``) that class ``cls`` does not take, else None."""
    given = re.search(r"init_args=Namespace\((.*)\)", report)
    accepted = _init_arguments(cls)
    if given is None or not accepted:
        return None
    return next((k for k in re.findall(r"(?:^|, )(\w+)=", given.group(1)) if k not in accepted), None)


def _value_detail(report: str) -> str | None:
    """``'x'; expected int or None`` or ``'x' is not one of 'a', 'b'`` from a report on one value, else None."""
    value = re.search(r"Got value: (.*)", report) or re.search(r"Given value: (.*)", report)
    types = list(dict.fromkeys(re.findall(r"Expected a <class '([^']+)'>", report)))
    types = ["None" if t == "NoneType" else t.rsplit(".", 1)[-1] for t in types]
    choices: list[Any] = []
    for listed in _LITERAL.findall(report):
        try:
            choices += [c for c in ast.literal_eval(f"[{listed}]") if c not in choices]
        except (ValueError, SyntaxError):
            return None
    if value is None or not (types or choices):
        return None
    given = value.group(1).strip()
    if not choices:
        return f"{given!r}; expected {' or '.join(types)}"
    if "None" in types:
        choices.append(None)
    others = [t for t in types if t != "None"]
    nor = f" nor {' or '.join(others)}" if others else ""
    return f"{given!r} is not one of {', '.join(map(repr, choices))}{nor}"


def _missing_class_hint(report: str) -> str:
    """``; did you mean lightning_clip.AdaptiveGradientClipping?`` for ``module 'lightning_clip' has no attribute
    'AdaptiveGradientClippin'``, else ``""``."""
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", report)
    if missing is None:
        return ""
    try:
        names = [n for n in dir(importlib.import_module(missing.group(1))) if not n.startswith("_")]
    except ImportError:
        return ""
    close = difflib.get_close_matches(missing.group(2), names, n=3)
    return f"; did you mean {' or '.join(f'{missing.group(1)}.{n}' for n in close)}?" if close else ""


def _unknown_argument(name: str, cls: str) -> str:
    """``alpah is not an argument of AdaptiveGradientClipping; did you mean alpha?`` (from the class's signature)."""
    accepted = _init_arguments(cls)
    short = cls.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, accepted, n=3)
    if close:
        hint = f"; did you mean {' or '.join(close)}?"
    elif accepted:
        hint = f"; it takes {', '.join(accepted)}"
    else:
        hint = ""
    return f"{name} is not an argument of {short}{hint}"


def _init_arguments(cls: str) -> list[str]:
    """The arguments a config can give class ``cls`` (import path): its signature's named parameters, less the
    optimizer's ``params`` and the scheduler's ``optimizer`` that LightningCLI passes itself; [] if it does not
    import."""
    module, _, name = cls.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
        params = list(inspect.signature(obj).parameters.values())
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    import torch

    linked: set[str] = set()
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
        linked.add("params")
    lr_scheduler = torch.optim.lr_scheduler
    schedulers = tuple(
        getattr(lr_scheduler, n) for n in ("LRScheduler", "ReduceLROnPlateau") if hasattr(lr_scheduler, n)
    )
    if isinstance(obj, type) and issubclass(obj, schedulers):
        linked.add("optimizer")
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in params if p.kind not in variadic and p.name not in linked]


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
        """LightningCLI that says, after ``fit``, where the TensorBoard logs are and what they hold, and saves the
        predictions of ``predict``."""

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

        def after_predict(self) -> None:
            """Saves the predicted classes, one per example of the predict split in order, as one tensor in
            ``<trainer.default_root_dir>/predictions.pt`` and says where (LightningCLI itself keeps none)."""
            if not self.trainer.is_global_zero:
                return
            import torch

            batches = self.trainer.predict_loop.predictions
            if not batches:
                return
            predictions = torch.cat([torch.as_tensor(b).reshape(-1) for b in batches])
            path = os.path.abspath(os.path.join(self.trainer.default_root_dir, PREDICTIONS_FILE))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(predictions, path)
            print(f"\nPredictions: {len(predictions)} classes saved to {path} (torch.load it)", flush=True)

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
