"""The `vlkit` command: `vlkit <command> key=value ...`; each command validates its keys before any work.

``BUILTIN`` is the static table of vlkit's own commands (one module per group, imported only when its command
runs, so `vlkit --help` starts without torch); plugins add commands through the entry-point group
``vlkit.commands``. ``resolve_config`` composes the config of `vlkit train` for scripts and notebooks."""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from vlkit.cli.common import Command, resolve_config
from vlkit.errors import VlkitError
from vlkit.registry import did_you_mean

COMMAND_GROUP = "vlkit.commands"

# name -> ("module:attr" of its Command, summary)
BUILTIN: dict[str, tuple[str, str]] = {
    "train": ("vlkit.cli.train:TRAIN", "train a plugin's task (vlkit train plugin=csp ...)"),
    "eval": ("vlkit.cli.train:EVAL", "evaluate a trained run or a backbone (vlkit eval plugin=csp checkpoint=RUN)"),
    "plugins": ("vlkit.cli.train:PLUGINS", "list the installed plugins (without importing them)"),
    "data": ("vlkit.cli.data:DATA", "write a data set: vlkit data shapes out=DIR [n_train=.. image_size=.. seed=..]"),
    "index": ("vlkit.cli.index:INDEX", "embed a folder of images into a search index: vlkit index images=DIR "
                                       "out=INDEX [model=...]"),
    "search": ("vlkit.cli.index:SEARCH", "search an index: vlkit search index=DIR text=\"a red circle\" k=5 "
                                         "(or image=PATH)"),
    "caption": ("vlkit.cli.data:CAPTION", "describe an image with an MLLM backbone: vlkit caption image=PATH "
                                          "[model=...]"),
    "prune": ("vlkit.cli.compress:PRUNE", "prune heads and MLP neurons to a FLOP budget: vlkit prune model=... "
                                          "method=optin flops=0.6 out=DIR"),
    "sparsify": ("vlkit.cli.compress:SPARSIFY", "zero weights by magnitude or N:M pattern: vlkit sparsify "
                                                "model=... pattern=2:4 out=DIR"),
    "export": ("vlkit.cli.compress:EXPORT", "export the encoders to ONNX (+ INT8): vlkit export model=... "
                                            "quantize=int8 out=DIR"),
    "demo": ("vlkit.cli.demo:DEMO", "a web page to search an index and segment images (plugin tabs): vlkit demo "
                                    "[index=DIR] [<tab>=RUN_DIR]"),
}

__all__ = ["BUILTIN", "Command", "main", "resolve_config"]


def _contributed() -> dict[str, metadata.EntryPoint]:
    """Commands plugins register (entry-point group ``vlkit.commands``); vlkit's own names win."""
    return {ep.name: ep for ep in metadata.entry_points(group=COMMAND_GROUP) if ep.name not in BUILTIN}


def _load(target: str, name: str) -> Command:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # a plugin's command that fails to import: say which and why
        raise VlkitError(f"command {name!r} failed to load from {target!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Command):
        raise VlkitError(f"command {name!r}: {target!r} is a {type(obj).__name__}, not a vlkit.cli.Command")
    return obj


def find_command(name: str) -> Command:
    """The Command called ``name`` (vlkit's own or a plugin's); a VlkitError with did-you-mean otherwise."""
    if name in BUILTIN:
        return _load(BUILTIN[name][0], name)
    contributed = _contributed()
    if name in contributed:
        return _load(contributed[name].value, name)
    names = [*BUILTIN, *contributed]
    raise VlkitError(f"unknown command {name!r}.{did_you_mean(name, names)} Commands: {', '.join(names)}")


def _usage() -> str:
    from vlkit.config import group_options
    from vlkit.plugins import list_plugins

    lines = ["usage: vlkit <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:10s} {summary}" for name, (_, summary) in BUILTIN.items()]
    for name, ep in sorted(_contributed().items()):
        package = ep.value.split(":")[0].split(".")[0]
        lines.append(f"  {name:10s} from the {package} package: `vlkit {name} --help` says what it does")
    lines += ["", "config groups (train/eval; plugins may add options):"]
    lines.append(f"  plugin: {', '.join(list_plugins())}")
    lines += [f"  {g}: {', '.join(o)}" for g, o in group_options().items()]
    lines += ["", "`vlkit <command> --help` lists a command's keys and their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(_usage())
        except BrokenPipeError:  # `vlkit --help | head`: the reader left, nothing is wrong
            sys.stderr.close()
        return 0
    name, args = argv[0], argv[1:]
    try:
        cmd = find_command(name)
    except VlkitError as exc:
        print(f"vlkit: {exc}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in args):
        print(cmd.help([a for a in args if a not in ("-h", "--help")]) if cmd.help else cmd.summary)
        return 0
    try:
        return cmd.run(args)
    except VlkitError as exc:
        print(f"vlkit {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlkit {name}: interrupted", file=sys.stderr)
        return 130
