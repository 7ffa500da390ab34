"""Config composition: every file under configs/ composes and validates; overrides are typed."""

from __future__ import annotations

import pytest

from vlkit.cli import resolve_config
from vlkit.config import ConfigError, config_dir, group_options
from vlkit.plugins import get_plugin, list_plugins, plugin_config_dirs


def test_every_config_file_composes():
    options = group_options()
    for group in ("model", "data", "optim"):
        for option in options[group]:
            _, cfg = resolve_config([f"{group}={option}"])
            assert cfg.plugin == "retrieval"
    experiments = set(options.get("experiment", []))
    for name in list_plugins():  # each plugin's own YAML defaults, found on its config search path
        plugin = get_plugin(name)
        _, cfg = resolve_config([f"plugin={name}"])
        assert cfg.plugin == name and name in cfg
        assert cfg.train.best_metric == (plugin.headline_metric or cfg.train.best_metric)
        experiments |= set(group_options(plugin_config_dirs(plugin)).get("experiment", []))
    assert "ufo-tiny-llava" in experiments  # shipped inside the ufo plugin, not in vlkit's configs/
    for option in sorted(experiments):  # a recipe composes with the plugin whose keys it sets
        composed = []
        for plugin in list_plugins():
            try:
                composed.append(resolve_config([f"plugin={plugin}", f"experiment={option}"])[1].plugin)
            except ConfigError:
                continue
        assert composed, f"experiment={option} composes with no plugin"
    for name in ("train", "eval"):
        assert (config_dir() / f"{name}.yaml").is_file()
    _, cfg = resolve_config(["plugin=csp"], name="eval")
    assert cfg.split == "test"


def test_overrides_are_typed_and_checked():
    _, cfg = resolve_config(["plugin=retrieval", "optim.lr=1e-4", "train.epochs=2", "run.dir=out/x",
                             "retrieval.max_violation=false"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.train.epochs == 2 and cfg.run.dir == "out/x"
    assert cfg.retrieval.max_violation is False
    with pytest.raises(ConfigError, match="train.epochs"):
        resolve_config(["train.epochs=many"])
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        resolve_config(["optim.lrr=1"])
    with pytest.raises(ConfigError, match="model"):
        resolve_config(["model=nope"])


def test_experiment_overrides_group_and_values():
    _, cfg = resolve_config(["experiment=smoke"])
    assert cfg.model.name == "vlkit-tiny-test" and cfg.data.n_train == 256 and cfg.train.epochs == 1
    _, cfg = resolve_config(["experiment=smoke", "train.epochs=3"])
    assert cfg.train.epochs == 3  # the command line wins over the experiment file


def test_simple_commands_check_ranges_too():
    from vlkit.cli.index import SearchArgs
    from vlkit.config import ConfigError, parse_kv

    with pytest.raises(ConfigError, match=r"'k': 0 \(it must be >= 1\)"):
        parse_kv(["index=x", "text=a", "k=0"], SearchArgs)
    assert parse_kv(["index=x", "text=a", "k=3"], SearchArgs).k == 3


def test_one_of_refuses_other_strings_and_help_lists_the_choices():
    from vlkit.config import describe, one_of

    with pytest.raises(ConfigError, match=r"'optim.scheduler': 'cosin' \(one of cosine, constant, linear\) "
                                          r"Did you mean 'cosine'"):
        resolve_config(["optim.scheduler=cosin"])
    assert resolve_config(["train.mixed_precision=bf16"])[1].train.mixed_precision == "bf16"
    from vlkit.config import OptimConfig

    assert "  scheduler (str) = 'cosine' (one of cosine, constant, linear)" in describe(OptimConfig)
    with pytest.raises(ValueError, match="not among the choices"):
        one_of("a", "b", "c")


def _register_yaml_plugin(name: str, folder, yaml_text: str, extra: dict[str, str] | None = None):
    from dataclasses import dataclass

    from vlkit.plugins import register_plugin

    @dataclass
    class Section:
        x: int = 1

    (folder / "plugin").mkdir(parents=True)
    (folder / "plugin" / f"{name}.yaml").write_text(yaml_text)
    for rel, text in (extra or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return register_plugin(name=name, config=Section, build_data=lambda *a: None, build_task=lambda *a: None,
                           configs=str(folder), headline_metric="x_metric")


def test_a_plugin_ships_yaml_defaults_and_its_mistakes_are_named(tmp_path):
    from vlkit.plugins import unregister_plugin

    _register_yaml_plugin("yamlok", tmp_path / "ok", "# @package _global_\nyamlok:\n  x: 5\ntrain:\n  epochs: 3\n",
                          {"experiment/yamlok-long.yaml": "# @package _global_\ntrain:\n  epochs: 9\n"})
    _register_yaml_plugin("yamlbad", tmp_path / "bad", "yamlbad:\n  x: 5\n")
    _register_yaml_plugin("yamlshadow", tmp_path / "shadow", "# @package _global_\nyamlshadow:\n  x: 2\n",
                          {"experiment/smoke.yaml": "# @package _global_\ntrain:\n  epochs: 9\n"})
    try:
        _, cfg = resolve_config(["plugin=yamlok"])
        assert cfg.yamlok.x == 5 and cfg.train.epochs == 3 and cfg.train.best_metric == "x_metric"
        assert resolve_config(["plugin=yamlok", "experiment=yamlok-long"])[1].train.epochs == 9
        assert resolve_config(["plugin=yamlok", "train.best_metric="])[1].train.best_metric == ""
        with pytest.raises(ConfigError, match="must begin with the line '# @package _global_'"):
            resolve_config(["plugin=yamlbad"])
        with pytest.raises(ConfigError, match=r"experiment/smoke.yaml has the name of vlkit's own"):
            resolve_config(["plugin=yamlshadow"])
    finally:
        for name in ("yamlok", "yamlbad", "yamlshadow"):
            unregister_plugin(name)
