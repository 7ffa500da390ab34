"""Least-squares reconstruction after structured pruning (vlkit.compress.reconstruct)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from vlkit.backbone.blocks import transformer_blocks
from vlkit.compress.prune import prune_backbone
from vlkit.compress.reconstruct import reconstruct, ridge_fit, snapshot_blocks
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_ridge_fit_recovers_an_exact_linear_map_and_falls_back_to_the_mean():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    w, b = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    weight, bias = ridge_fit(x, x @ w.T + b, ridge=0.0)
    assert torch.allclose(weight, w, atol=1e-5) and torch.allclose(bias, b, atol=1e-5)
    shrunk, _ = ridge_fit(x, x @ w.T + b, ridge=10.0)  # the ridge pulls the weights towards zero, not the bias
    assert shrunk.norm() < 0.5 * w.norm()
    y = torch.randn(50, 4, generator=gen)
    none, mean = ridge_fit(y.new_zeros(50, 0), y)  # no inputs left (every unit pruned): the best constant
    assert none.shape == (4, 0) and torch.allclose(mean, y.mean(0), atol=1e-6)


def _embedding_cos(a, b, images, tokens) -> float:
    with torch.no_grad():
        i = F.cosine_similarity(a.encode_image(images), b.encode_image(images)).mean()
        t = F.cosine_similarity(a.encode_text(tokens), b.encode_text(tokens)).mean()
    return float(i + t) / 2


@pytest.mark.parametrize("custom", [False, True], ids=["open_clip-blocks", "qk-norm-blocks"])
def test_reconstruction_lowers_every_refit_error_and_brings_held_out_embeddings_closer_to_the_dense_model(custom):
    dense = tiny_clip(mlp_ratio=2.0, custom=custom)
    calib, held_out = tiny_inputs(dense, batch=48, seed=1), tiny_inputs(dense, batch=16, seed=2)
    plain, _ = prune_backbone(copy.deepcopy(dense), "magnitude", 0.5)
    refit, report = prune_backbone(copy.deepcopy(dense), "magnitude", 0.5,
                                   reconstruct_on={"image": calib[0], "text": calib[1]})
    fits = report["reconstruction"]["fits"]
    assert set(fits) == {"image", "text"} and report["reconstruction"]["n"] == {"image": 48, "text": 48}
    modules = {(t, f["block"], f["module"]) for t, rows in fits.items() for f in rows}
    assert any(m[2] == "mlp" for m in modules) and any(m[2] == "attention" for m in modules)
    assert all(f["err_after"] < f["err_before"] for rows in fits.values() for f in rows)
    # same structure, only the projections changed; and closer to the dense model on inputs it never saw
    assert refit.vlkit_pruned_spec == plain.vlkit_pruned_spec
    assert _embedding_cos(refit, dense, *held_out) > _embedding_cos(plain, dense, *held_out) + 0.01


def test_a_fully_pruned_attention_keeps_the_best_constant_and_unpruned_blocks_are_untouched():
    from vlkit.compress.materialize import materialize

    dense = tiny_clip(mlp_ratio=1.0)
    images, tokens = tiny_inputs(dense, batch=32, seed=3)
    targets = snapshot_blocks(dense, ["image"])
    heads = {("image", 1): torch.zeros(4)}  # block 1 loses every head; blocks 0 and 2 keep all
    pruned = materialize(dense, heads, None)
    before = {k: copy.deepcopy(v.module.state_dict()) for k, v in
              ((v.key, v) for v in transformer_blocks(pruned, ["image"]))}
    report = reconstruct(pruned, targets, {"image": images})
    assert [(f["block"], f["module"], f["kept"]) for f in report["image"]] == [(1, "attention", 0)]
    views = {v.key: v for v in transformer_blocks(pruned, ["image"])}
    for key in (("image", 0), ("image", 2)):
        assert all(torch.equal(a, views[key].module.state_dict()[n]) for n, a in before[key].items())
    assert report["image"][0]["err_after"] <= report["image"][0]["err_before"]


def test_vlkit_prune_refits_by_default_and_reconstruct_0_turns_it_off(tmp_path):
    from vlkit.cli import main

    on, off = tmp_path / "on", tmp_path / "off"
    common = ["prune", "model=vlkit-tiny-test", "method=magnitude", "flops=0.6", "n_calib=4"]
    assert main([*common, f"out={on}", "reconstruct=24"]) == 0
    assert main([*common, f"out={off}", "reconstruct=0"]) == 0
    rep = json.loads((on / "prune_report.json").read_text())
    assert rep["reconstruction"]["n"] == {"image": 24, "text": 24}
    assert rep["reconstruction"]["calibration"]["texts"] == "captions"
    assert "reconstruction" not in json.loads((off / "prune_report.json").read_text())
    assert main([*common, f"out={tmp_path / 'bad'}", "ridge=-1"]) != 0
