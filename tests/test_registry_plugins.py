"""Registry, plugin discovery through entry points, register_plugin, and the CLI's errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import vlkit
from vlkit.cli import main
from vlkit.plugins import Plugin, PluginError, get_plugin
from vlkit.registry import Registry


def test_registry_register_get_duplicate_and_miss():
    reg: Registry[int] = Registry("loss")
    reg.register("hinge", 1)

    @reg.register("contrastive")
    def f():
        return 2

    assert reg.get("hinge") == 1 and reg.get("contrastive") is f and reg.names() == ["contrastive", "hinge"]
    with pytest.raises(KeyError, match="already registered"):
        reg.register("hinge", 3)
    with pytest.raises(KeyError) as err:
        reg.get("hnge")
    msg = str(err.value)
    assert "unknown loss 'hnge'" in msg and "Did you mean 'hinge'" in msg and "contrastive, hinge" in msg


def test_first_party_plugins_are_listed_without_import():
    # in a fresh interpreter (this one may have imported them already); loading one shows the probe can see it
    code = ("import sys, vlkit; names = vlkit.list_plugins(); print(','.join(names)); "
            "print(sorted(m for m in sys.modules if m.startswith('vlkit_'))); vlkit.load_plugin('csp'); "
            "print('vlkit_csp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    names, imported, probe = out.stdout.splitlines()
    assert {"csp", "retrieval", "ufo", "caption"} <= set(names.split(","))
    assert imported == "[]" and probe == "True"


@pytest.mark.parametrize("name", vlkit.list_plugins())
def test_first_party_plugins_load_as_validated_bundles(name):
    from vlkit.cli import resolve_config

    plugin = get_plugin(name)
    assert isinstance(plugin, Plugin) and plugin.name == name
    cfg = resolve_config([f"plugin={name}"])[1]
    section = plugin.settings(cfg)  # the one way to read a plugin's section: a typed instance of its schema
    assert isinstance(section, plugin.config) and plugin.settings(section) is section
    assert cfg.train.best_metric == plugin.headline_metric  # the declared headline picks 'best'


def test_unknown_plugin_suggests_and_lists():
    with pytest.raises(PluginError) as err:
        get_plugin("cps")
    assert "Did you mean 'csp'" in str(err.value) and "retrieval" in str(err.value)


@dataclass
class _Cfg:
    x: int = 1


def _noop(*a):
    return None


def test_register_plugin_validates_and_rejects_duplicates():
    p = vlkit.register_plugin(name="notebook_task", config=_Cfg, build_data=_noop, build_task=_noop)
    try:
        assert get_plugin("notebook_task") is p and "notebook_task" in vlkit.list_plugins()
        with pytest.raises(KeyError, match="already registered"):
            vlkit.register_plugin(name="notebook_task", config=_Cfg, build_data=_noop, build_task=_noop)
    finally:
        vlkit.plugins.unregister_plugin("notebook_task")
    with pytest.raises(PluginError, match="already installed"):
        vlkit.register_plugin(name="csp", config=_Cfg, build_data=_noop, build_task=_noop)
    with pytest.raises(PluginError, match="must be a dataclass"):
        Plugin(name="bad", config=dict, build_data=_noop, build_task=_noop)


def test_plugin_whose_import_fails_names_entry_point(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="broken", value="vlkit_no_such_module:plugin", group="vlkit.plugins")
    monkeypatch.setattr(vlkit.plugins, "_entry_points", lambda: {"broken": ep})
    with pytest.raises(PluginError) as err:
        get_plugin("broken")
    assert "vlkit_no_such_module:plugin" in str(err.value) and "ModuleNotFoundError" in str(err.value)
    assert isinstance(err.value.__cause__, ModuleNotFoundError)


def test_cli_unknown_plugin_and_key_fail_before_work(capsys):
    assert main(["train", "plugin=cps"]) == 2
    assert "Did you mean 'csp'" in capsys.readouterr().err
    assert main(["train", "plugin=csp", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
    assert main(["train", "plugin=csp", "optim.lr=abc"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_help_lists_groups_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and f"plugin: {', '.join(vlkit.list_plugins())}" in out
    assert main(["train", "--help", "plugin=retrieval"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr (float)" in out and "retrieval.margin" in out


def test_cli_help_shows_the_defaults_the_plugin_yaml_sets(capsys):
    """--help gives what a run would use: the plugin's YAML over the schema, and the user's own overrides."""
    from vlkit.cli import resolve_config

    for plugin in ("csp", "retrieval"):
        cfg = resolve_config([f"plugin={plugin}"])[1]
        assert main(["train", "--help", f"plugin={plugin}", "train.epochs=7"]) == 0
        out = capsys.readouterr().out
        assert f"model.name (str) = {cfg.model.name!r}" in out and f"optim.lr (float) = {cfg.optim.lr!r}" in out
        assert "train.epochs (int) = 7" in out
    assert resolve_config(["plugin=csp"])[1].model.name != resolve_config(["plugin=retrieval"])[1].model.name


def test_console_script_lists_plugins_from_another_directory(tmp_path):
    exe = str(Path(sys.executable).with_name("vlkit"))  # the console script beside this interpreter
    out = subprocess.run([exe, "plugins"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()][:4] == ["caption", "csp", "retrieval", "ufo"]


def test_public_api_is_lazy_and_the_version_is_one_string():
    import subprocess
    import sys
    from importlib import metadata

    import vlkit

    code = ("import sys, vlkit; assert 'torch' not in sys.modules, 'import vlkit pulled in torch'; "
            "bb = vlkit.load_backbone('vlkit-tiny-test'); assert bb.name == 'vlkit-tiny-test'; "
            "assert vlkit.Retriever.__name__ == 'Retriever' and vlkit.load_plugin('csp').name == 'csp'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert metadata.version("vlkit") == vlkit.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlkit.nope  # noqa: B018


def test_a_broken_plugin_is_named_and_left_out_of_the_providers(monkeypatch):
    from vlkit import plugins

    real = plugins.get_plugin

    def flaky(name):
        if name == "csp":
            raise PluginError("plugin 'csp' failed to import (simulated)")
        return real(name)

    monkeypatch.setattr(plugins, "get_plugin", flaky)
    with pytest.warns(RuntimeWarning, match="simulated.*left out of the plugins that provide segment"):
        found = plugins.plugins_with("segment")
    assert [p.name for p in found] == ["ufo"]
    with pytest.raises(PluginError, match="no installed plugin provides nothing here"):
        plugins.plugin_with("no_such_hook", "nothing here")
