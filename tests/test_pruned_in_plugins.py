"""A pruned backbone saves, reloads and trains/evaluates in every first-party plugin."""

from __future__ import annotations

import pytest
import torch

from vlkit.backbone import load_backbone
from vlkit.cli import resolve_config
from vlkit.compress import prune_backbone
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import train
from vlkit.plugins import get_plugin, list_plugins


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    torch.manual_seed(0)
    bb = load_backbone("vlkit-tiny-test")
    prune_backbone(bb.model, "magnitude", 0.6, inplace=True)
    path = tmp_path_factory.mktemp("pruned") / "bb"
    bb.save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_shapes(root, n_train=24, n_val=8, n_test=8, image_size=32, seed=5, n_czsl_per_pair=2,
                    progress=False, workers=1)
    return root


@pytest.mark.parametrize("plugin", [n for n in list_plugins() if "clip" in get_plugin(n).backbones])
def test_pruned_backbone_runs_in_every_plugin(plugin, pruned_dir, world, tmp_path):
    reloaded = load_backbone(pruned_dir)
    assert reloaded.pruned_spec() is not None
    args = [f"plugin={plugin}", "experiment=smoke", f"model.name={pruned_dir}", f"data.root={world}",
            "train.max_steps=2", "train.batch_size=8", "train.eval_batch_size=8", "train.progress=false",
            "train.best_metric=", f"run.dir={tmp_path / plugin}"]
    if plugin == "retrieval":
        args.append("retrieval.export_as=")
    p, cfg = resolve_config(args)
    metrics = train(cfg, p)
    headline = p.headline_metric
    assert metrics["step"] == 2 and 0.0 <= metrics["test"][headline] < float("inf")
