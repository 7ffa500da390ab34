"""What every command shares: the ``Command`` record, key=value help, config resolution and model loading.

Nothing here imports torch: the CLI lists and explains its commands in a fraction of a second."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlkit.config import BaseConfig, check_overrides, compose_config, describe, group_options, schema_for
from vlkit.errors import VlkitError
from vlkit.plugins import PluginError, get_plugin, list_plugins, plugin_config_dirs


@dataclass(frozen=True)
class Command:
    """One `vlkit <name>` command: ``run(args) -> exit code``; ``help(args)`` the text of ``--help``.

    vlkit's own commands are listed in ``vlkit.cli.BUILTIN``; a plugin contributes one through the entry-point
    group ``vlkit.commands`` (``name = "package.module:attr"``, ``attr`` a Command)."""

    run: Callable[[list[str]], int]
    summary: str
    help: Callable[[list[str]], str] | None = None


def kv_help(verb: str, schema: type, note: str = "", usage: str = "key=value ...") -> str:
    """``--help`` of a key=value command: usage line, an optional note, then every key with its type and default."""
    lines = [f"usage: vlkit {verb} {usage}", *([note] if note else []), "", "keys (type = default):"]
    return "\n".join(lines + describe(schema))


def selected_plugin(overrides: list[str], default: str = "retrieval") -> str:
    """The plugin a command line selects (``plugin=NAME``; the last one wins), else ``default``."""
    chosen = default
    for item in overrides:
        if item.startswith("plugin="):
            chosen = item.split("=", 1)[1]
    return chosen


def resolve_config(overrides: list[str], name: str = "train"):
    """Plugin first (did-you-mean on a typo), then the keys, then Hydra composition (the plugin's own YAML
    defaults included). Returns ``(plugin, cfg)``."""
    plugin = get_plugin(selected_plugin(overrides))
    schema = schema_for(plugin.name, plugin.config)
    check_overrides(overrides, schema)
    if not any(o.startswith("plugin=") for o in overrides):
        overrides = [f"plugin={plugin.name}", *overrides]
    cfg = compose_config(overrides, name=name, plugin_config=plugin.config,
                         search_path=plugin_config_dirs(plugin), plugin_name=plugin.name)
    if not cfg.train.best_metric and plugin.headline_metric and not any(
            o.lstrip("+").startswith("train.best_metric=") for o in overrides):
        cfg.train.best_metric = plugin.headline_metric  # the plugin's declared headline picks 'best'
    return plugin, cfg


def config_help(args: list[str], verb: str) -> str:
    """``vlkit train|eval --help``: config groups, the selected plugin, every key with its default as the
    config files set it for this command line."""
    plugin_name = selected_plugin(args)
    extra: tuple = ()
    try:
        plugin = get_plugin(plugin_name)
        schema = schema_for(plugin.name, plugin.config)
        extra = plugin_config_dirs(plugin)
    except PluginError:
        plugin, schema = None, BaseConfig
    lines = [f"usage: vlkit {verb} [plugin=NAME] [GROUP=OPTION ...] [key=value ...]", "", "config groups:"]
    for group, options in group_options(extra).items():
        lines.append(f"  {group}: {', '.join(options)}")
    lines.append(f"  (plugins installed: {', '.join(list_plugins())})")
    if plugin is not None and plugin.description:
        lines += ["", f"plugin {plugin.name}: {plugin.description}"]
    try:
        values = resolve_config(args, name=verb)[1]
    except VlkitError:
        values = None
    lines += ["", "keys (type = default):", *describe(schema, values=values)]
    return "\n".join(lines)


def load_model_arg(name: str, pretrained: str | None = None) -> Any:
    """A backbone from a command's ``model=`` / ``pretrained=`` keys (folder, open_clip name, cached:NAME, hf:...)."""
    from omegaconf import OmegaConf

    from vlkit.engine.run import load_model

    return load_model(OmegaConf.create({"name": name, "pretrained": pretrained}))
