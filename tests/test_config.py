"""Config composition: every file under configs/ composes and validates; overrides are typed."""

from __future__ import annotations

import pytest

from vlkit.cli import resolve_config
from vlkit.config import ConfigError, config_dir, group_options


def test_every_config_file_composes():
    options = group_options()
    for group in ("model", "data", "optim"):
        for option in options[group]:
            _, cfg = resolve_config([f"{group}={option}"])
            assert cfg.plugin == "retrieval"
    for option in options["experiment"]:  # a recipe composes with the plugin whose keys it sets
        composed = []
        for plugin in options["plugin"]:
            try:
                composed.append(resolve_config([f"plugin={plugin}", f"experiment={option}"])[1].plugin)
            except ConfigError:
                continue
        assert composed, f"experiment={option} composes with no plugin"
    for plugin in options["plugin"]:
        _, cfg = resolve_config([f"plugin={plugin}"])
        assert cfg.plugin == plugin and plugin in cfg
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
    from vlkit.commands import SearchArgs
    from vlkit.config import ConfigError, parse_kv

    with pytest.raises(ConfigError, match=r"'k': 0 \(it must be >= 1\)"):
        parse_kv(["index=x", "text=a", "k=0"], SearchArgs)
    assert parse_kv(["index=x", "text=a", "k=3"], SearchArgs).k == 3
