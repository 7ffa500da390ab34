"""Named trained backbones: a cached one loads; a missing one is built by the plugin that provides it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import vlkit
from vlkit.backbone import load_backbone
from vlkit.cache import backbone_dir, provide_backbone
from vlkit.engine.run import load_model
from vlkit.errors import VlkitError


@dataclass
class _Cfg:
    x: int = 0


def test_missing_backbone_is_built_once_by_its_provider(capsys):
    calls = []

    def build(dest):
        calls.append(dest)
        load_backbone("vlkit-tiny-test").save(dest)

    vlkit.register_plugin(name="provider_test", config=_Cfg, build_data=lambda *a: None,
                          build_task=lambda *a: None, provides={"unit-test-bb": build})
    try:
        path = provide_backbone("unit-test-bb")
        assert path == backbone_dir("unit-test-bb") and calls == [path]
        assert "training it first with plugin 'provider_test'" in capsys.readouterr().out
        from omegaconf import OmegaConf

        bb = load_model(OmegaConf.create({"name": "cached:unit-test-bb", "pretrained": None}))
        assert bb.name == "vlkit-tiny-test" and len(calls) == 1  # second use: from the cache
    finally:
        vlkit.plugins.unregister_plugin("provider_test")


def test_unknown_cached_backbone_is_a_clear_error():
    with pytest.raises(VlkitError, match="no plugin provides the backbone 'nobody-makes-this'"):
        provide_backbone("nobody-makes-this")
