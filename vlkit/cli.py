"""The `vlkit` command: `vlkit <command> key=value ...`; each command validates its keys before any work."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from vlkit.config import (
    BaseConfig,
    check_overrides,
    compose_config,
    describe,
    group_options,
    schema_for,
)
from vlkit.errors import VlkitError
from vlkit.plugins import PluginError, get_plugin, list_plugins, plugin_entry_points


@dataclass
class Command:
    run: Callable[[list[str]], int]
    summary: str
    help: Callable[[list[str]], str] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, help: Callable[[list[str]], str] | None = None):
    def register(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        COMMANDS[name] = Command(fn, summary, help)
        return fn

    return register


def _selected_plugin(overrides: list[str], default: str = "retrieval") -> str:
    chosen = default
    for item in overrides:
        if item.startswith("plugin="):
            chosen = item.split("=", 1)[1]
    return chosen


def resolve_config(overrides: list[str], name: str = "train"):
    """Plugin first (did-you-mean on a typo), then the keys, then Hydra composition."""
    plugin = get_plugin(_selected_plugin(overrides))
    schema = schema_for(plugin.name, plugin.config)
    check_overrides(overrides, schema)
    _ensure_plugin_config(plugin.name)
    cfg = compose_config(overrides, name=name, plugin_config=plugin.config)
    return plugin, cfg


def _ensure_plugin_config(name: str) -> None:
    """Plugins without a configs/plugin/<name>.yaml (third-party ones) get a minimal group entry."""
    from hydra.core.config_store import ConfigStore

    if name not in group_options().get("plugin", []):
        ConfigStore.instance().store(group="plugin", name=name, node={"plugin": name}, package="_global_")


def _config_help(args: list[str], verb: str) -> str:
    plugin_name = _selected_plugin(args)
    lines = [f"usage: vlkit {verb} [plugin=NAME] [GROUP=OPTION ...] [key=value ...]", "", "config groups:"]
    for group, options in group_options().items():
        lines.append(f"  {group}: {', '.join(options)}")
    lines.append(f"  (plugins installed: {', '.join(list_plugins())})")
    try:
        plugin = get_plugin(plugin_name)
        schema = schema_for(plugin.name, plugin.config)
        if plugin.description:
            lines += ["", f"plugin {plugin.name}: {plugin.description}"]
    except PluginError:
        schema = BaseConfig
    try:  # the defaults as the config files set them for this command line (a plugin's YAML included)
        values = resolve_config(args, name=verb)[1]
    except VlkitError:
        values = None
    lines += ["", "keys (type = default):", *describe(schema, values=values)]
    return "\n".join(lines)


@command("train", "train a plugin's task (vlkit train plugin=csp ...)", lambda a: _config_help(a, "train"))
def _train(args: list[str]) -> int:
    plugin, cfg = resolve_config(args)
    from vlkit.engine.run import train

    train(cfg, plugin)
    return 0


@command("eval", "evaluate a trained run or a backbone (vlkit eval plugin=csp checkpoint=RUN)",
         lambda a: _config_help(a, "eval"))
def _eval(args: list[str]) -> int:
    plugin, cfg = resolve_config(args, name="eval")
    from vlkit.engine.run import evaluate

    evaluate(cfg, plugin)
    return 0


@command("plugins", "list the installed plugins (without importing them)")
def _plugins(args: list[str]) -> int:
    for name, target in plugin_entry_points().items():
        print(f"{name:12s} {target}")
    return 0


def _load_extra_commands() -> None:
    # Commands that live beside their subsystem; importing registers them.
    import vlkit.commands  # noqa: F401
    import vlkit.compress_commands  # noqa: F401
    import vlkit.demo_command  # noqa: F401


def _usage() -> str:
    _load_extra_commands()
    lines = ["usage: vlkit <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:10s} {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "config groups (train/eval):"]
    lines += [f"  {g}: {', '.join(o)}" for g, o in group_options().items()]
    lines += ["", "`vlkit <command> --help` lists a command's keys and their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    _load_extra_commands()
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        from vlkit.registry import did_you_mean

        print(f"vlkit: unknown command {name!r}.{did_you_mean(name, list(COMMANDS))} "
              f"Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
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

