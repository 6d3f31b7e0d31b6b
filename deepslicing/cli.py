"""The ``deepslicing`` command line, generated from the config dataclasses.

Each subcommand is a config dataclass plus a ``run(config)`` function. Its flags are the dataclass
fields (``--episode-length 50``; lists as words or comma lists, ``--policy equal oracle`` or
``--policy equal,oracle``; booleans as ``--x/--no-x``), its help the fields' ``help`` metadata.
Every subcommand also takes ``--config FILE.yaml`` and repeatable ``--set key=value`` (dotted keys
reach nested sections); precedence is defaults < file < flags < --set. ``--print-config`` shows
the resolved config as commented YAML (a valid ``--config`` file) and exits. Modules are imported
only for the subcommand that runs, so ``deepslicing --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import dataclass

from deepslicing.config import (
    ConfigError,
    commented_yaml,
    from_mapping,
    merge,
    parse_overrides,
    read_yaml,
)


@dataclass(frozen=True)
class Command:
    name: str
    target: str  # "module:ConfigClass:run_function"
    help: str
    positional: tuple[str, ...] = ()  # fields given as positional arguments
    config_positional: bool = False  # the first argument may be the YAML file (same as --config)


COMMANDS = (
    Command(
        "evaluate",
        "deepslicing.evaluation:EvaluateConfig:run",
        "evaluate allocation policies over traffic scenarios; writes summary.csv and plots",
    ),
    Command(
        "fidelity",
        "deepslicing.fidelity:FidelityConfig:run",
        "the fast model against ns-3 packets: per-kind throughput error, p95 ratio, loss, "
        "SLA-verdict agreement; CSV and plots",
    ),
    Command(
        "train",
        "deepslicing.train:TrainConfig:run",
        "train MADDPG slice allocators on RLlib; checkpoints, MLflow run, final evaluation",
    ),
    Command(
        "tune",
        "deepslicing.sweep:SweepConfig:run",
        "sweep MADDPG hyperparameters with Ray Tune (ASHA or PBT); every trial an MLflow run",
        config_positional=True,
    ),
    Command(
        "bench",
        "deepslicing.bench:BenchConfig:run",
        "benchmark a part of deepslicing against its comparator; last line is JSON",
        positional=("target",),
    ),
    Command(
        "export",
        "deepslicing.export:ExportConfig:run",
        "export a MADDPG checkpoint's actors as ONNX, TorchScript and int8 ONNX with metadata",
    ),
    Command(
        "register",
        "deepslicing.registry:RegisterConfig:run",
        "evaluate, export and register a checkpoint in MLflow; champion alias only if it is better",
    ),
    Command(
        "serve",
        "deepslicing.serving:ServeConfig:run_serve",
        "serve the champion allocation policy over HTTP with Ray Serve (127.0.0.1:8000)",
    ),
    Command(
        "run",
        "deepslicing.serving:RunConfig:run_main",
        "the main job: train, register, serve on 127.0.0.1 and print a real /allocate answer",
    ),
    Command(
        "compare",
        "deepslicing.compare:CompareConfig:run",
        "compare the runs of an MLflow experiment: table of params and metrics, and a plot",
    ),
    Command(
        "dashboard",
        "deepslicing.dashboard:DashboardConfig:run",
        "write the Grafana dashboard of the service and training (cluster/grafana/deepslicing.json)",
    ),
    Command(
        "kuberay",
        "deepslicing.kuberay:KubeRayConfig:run",
        "write the KubeRay manifests (cluster/kuberay/); the RayService from serve_config.yaml",
    ),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = argparse.ArgumentParser(
        prog="deepslicing",
        description="Learn and serve 5G network-slice resource allocations on Ray. "
        "Run `deepslicing COMMAND --help` for a command's options.",
    )
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        sub.add_parser(c.name, help=c.help, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in {c.name for c in COMMANDS}:
        top.parse_args(argv or ["--help"])
        return 2
    command = next(c for c in COMMANDS if c.name == argv[0])
    module_name, config_name, run_name = command.target.split(":")
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = build_parser(command, config_cls)
    args = parser.parse_args(argv[1:])
    try:
        config = resolve(config_cls, args)
    except ConfigError as e:
        parser.exit(2, f"deepslicing {command.name}: error: {e}\n")
    if args.print_config:
        print(commented_yaml(config), end="")
        return 0
    result = getattr(module, run_name)(config)
    return int(result or 0)


def build_parser(command: Command, config_cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"deepslicing {command.name}",
        description=(config_cls.__doc__ or command.help).strip(),
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) or _holds_dataclasses(tp):
            continue  # nested sections and lists of them come from --config or --set
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text = f"{help_text} (default: {_show(f.default)})"
        kwargs: dict = {"help": help_text, "default": argparse.SUPPRESS}
        base, choices = _flag_type(tp)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if base is _comma_list and f.name not in command.positional:
                kwargs["nargs"] = "+"  # `--format onnx int8` and `--format onnx,int8` alike
            if choices:
                kwargs["choices"] = choices
            kwargs["metavar"] = _metavar(tp, f.name)
        if f.name in command.positional:
            # argparse checks a SUPPRESSed positional default against choices; from_mapping checks
            if choices:
                kwargs.pop("choices")
                kwargs["help"] = f"one of: {', '.join(map(str, choices))}; {help_text}"
            kwargs.pop("metavar", None)
            parser.add_argument(
                f.name, nargs=None if f.default is dataclasses.MISSING else "?", **kwargs
            )
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    if command.config_positional:
        parser.add_argument(
            "config_file", nargs="?", metavar="FILE.yaml", help="the YAML file (same as --config)"
        )
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the keys above")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (dotted for nested sections); repeatable",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def resolve(config_cls: type, args: argparse.Namespace):
    ignored = ("config", "config_file", "set", "print_config")
    flags = {k: _flatten(v) for k, v in vars(args).items() if k not in ignored}
    path = args.config or getattr(args, "config_file", None)
    if args.config and getattr(args, "config_file", None):
        raise ConfigError("--config: give the YAML file once, as the argument or with --config")
    base = read_yaml(path) if path else {}
    return from_mapping(config_cls, merge(merge(base, flags), parse_overrides(args.set)))


def _holds_dataclasses(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return any(dataclasses.is_dataclass(a) or _holds_dataclasses(a) for a in args)


def _flag_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if origin is tuple:
        return _comma_list, None
    if tp in (int, float, str, bool):
        return tp, None
    return str, None


def _flatten(value):
    """A list flag given as several words, each a comma list, as one list."""
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return [item for words in value for item in words]
    return value


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _metavar(tp, name: str) -> str:
    return (
        "A[,B]"
        if typing.get_origin(tp) is tuple or _flag_type(tp)[0] is _comma_list
        else name.upper()
    )


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
