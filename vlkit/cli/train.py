"""`vlkit train`, `vlkit eval` and `vlkit plugins`."""

from __future__ import annotations

from vlkit.cli.common import Command, config_help, resolve_config
from vlkit.plugins import PluginError, plugin_entry_points


def _train(args: list[str]) -> int:
    plugin, cfg = resolve_config(args)
    if plugin.evaluation_only:
        raise PluginError(f"plugin {plugin.name!r} only evaluates (it declares evaluation_only); run "
                          f"`vlkit eval plugin={plugin.name} ...` instead")
    from vlkit.engine.run import train

    train(cfg, plugin)
    return 0


def _eval(args: list[str]) -> int:
    plugin, cfg = resolve_config(args, name="eval")
    from vlkit.engine.run import evaluate

    evaluate(cfg, plugin)
    return 0


def _plugins(args: list[str]) -> int:
    for name, target in plugin_entry_points().items():
        print(f"{name:12s} {target}")
    return 0


TRAIN = Command(_train, "train a plugin's task", lambda a: config_help(a, "train"))
EVAL = Command(_eval, "evaluate a trained run or a backbone", lambda a: config_help(a, "eval"))
PLUGINS = Command(_plugins, "list the installed plugins (without importing them)")
