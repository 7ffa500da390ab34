"""Named trained backbones: shipped inside the package (sha256-checked) or exported into the cache; nothing is
trained on demand."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from vlkit.backbone import load_backbone
from vlkit.backbone.core import SAVED_WEIGHTS, BackboneError
from vlkit.backbone.shipped import WEIGHTS_DIR, sha256_of, ship, shipped_backbone
from vlkit.cache import WORLD_VERSION, backbone_dir, provide_backbone
from vlkit.data.shapes import GENERATOR_VERSION
from vlkit.engine.run import load_model
from vlkit.errors import VlkitError


def test_an_exported_backbone_loads_by_name_from_the_cache():
    torch.manual_seed(0)
    bb = load_backbone("vlkit-tiny-test")
    bb.save(backbone_dir("unit-test-bb"))
    loaded = load_model(OmegaConf.create({"name": "cached:unit-test-bb", "pretrained": None}))
    assert loaded.identity == bb.identity


def test_unknown_named_backbone_is_a_clear_error_that_says_how_to_make_it():
    with pytest.raises(VlkitError, match=r"no backbone named 'nobody-makes-this'.*retrieval.export_as=nobody"):
        provide_backbone("nobody-makes-this")


def test_ship_stores_fp16_within_tolerance_and_the_hash_guards_the_file(tmp_path):
    torch.manual_seed(0)
    src = load_backbone("vlkit-tiny-test").save(tmp_path / "trained")
    root = tmp_path / "weights"
    record = ship(src, "unit-shipped", root=root, metrics={"test": {"t2i_R@1": 1.0}}, command="cmd")
    folder = shipped_backbone("unit-shipped", root=root)
    assert record["sha256"] == sha256_of(folder / SAVED_WEIGHTS)
    assert record["dtype"] == "float16" and record["min_cosine_to_fp32"] >= 0.9995
    assert json.loads((root / "shipped.json").read_text())["unit-shipped"]["command"] == "cmd"
    # fp16 storage: every weight equals the fp32 one rounded to half precision
    original, stored = load_backbone(src), load_backbone(folder)
    for (name, a), (_, b) in zip(original.model.state_dict().items(), stored.model.state_dict().items()):
        assert torch.equal(a.half().float(), b), name
    with open(folder / SAVED_WEIGHTS, "r+b") as fh:  # one flipped byte in the tensor data
        fh.seek(-5, 2)
        byte = fh.read(1)
        fh.seek(-5, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BackboneError, match="was changed or damaged; reinstall vlkit"):
        shipped_backbone("unit-shipped", root=root)


def test_the_default_backbone_is_shipped_and_resolves_without_training():
    path = provide_backbone("vlkit-tiny-shapes")
    assert path == WEIGHTS_DIR / "vlkit-tiny-shapes"
    assert (path / SAVED_WEIGHTS).stat().st_size <= 20 * 2**20


def test_world_version_in_the_cache_tag_follows_the_generator():
    assert WORLD_VERSION == GENERATOR_VERSION
