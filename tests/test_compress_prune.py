"""OPTIN importance, budgeted selection, prune_backbone reports and conv channel pruning."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlkit.backbone.blocks import transformer_blocks
from vlkit.compress.flops import flop_model
from vlkit.compress.importance import _optin_tower, magnitude_importance, optin_importance, random_importance
from vlkit.compress.masks import masked
from vlkit.compress.materialize import rebuild_pruned
from vlkit.compress.prune import (
    plot_kept_units,
    prune_backbone,
    prune_conv_channels,
    relation_damage,
    select_under_budget,
    tower_splits,
)
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs, tiny_resnet_clip


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def small():
    model = tiny_clip(mlp_ratio=1.0)
    return model, *tiny_inputs(model, batch=3)


def _zero_head(model, block, head):
    view = transformer_blocks(model, ["image"])[block]
    with torch.no_grad():
        view.out_weight()[:, view.head_cols(head)] = 0


def test_optin_scores_a_dead_head_zero_and_the_most_harmful_head_above_it():
    model = tiny_clip(mlp_ratio=1.0)
    images, tokens = tiny_inputs(model, batch=3)
    _zero_head(model, 1, 2)
    imp = optin_importance(model, images, tokens, chunk=16)
    heads = imp["heads"][("image", 1)]
    assert heads[2] <= 1e-4 * heads.max()
    with torch.no_grad():  # brute force: which head of block 1 moves the embedding most when removed?
        ref = F.normalize(model.encode_image(images), dim=-1)
        change = []
        for h in range(4):
            with masked(model, {("image", 1): torch.ones(4).index_fill(0, torch.tensor([h]), 0)}):
                change.append(float(1 - (F.normalize(model.encode_image(images), dim=-1) * ref).sum(-1).mean()))
    assert change[2] < 1e-6 and heads[max(range(4), key=change.__getitem__)] > heads[2]
    assert set(imp["neurons"]) == {(t, i) for t in ("image", "text") for i in range(3)}
    assert all(v.shape == (64,) and torch.all(v >= 0) for v in imp["neurons"].values())


def test_optin_restart_from_cached_block_equals_a_full_masked_forward(small):
    model, _, tokens = small
    traj, emb = _optin_tower(model, "text", tokens, chunk=7, max_tokens=10_000, seed=0)
    layer, head = 0, 3
    blocks = model.transformer.resblocks
    valid = torch.arange(16)[None, :] <= tokens.argmax(-1)[:, None]

    def run(mask):
        outs = []
        hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in blocks]
        try:
            with torch.no_grad(), masked(model, mask, all_blocks=True):
                emb_ = F.normalize(model.encode_text(tokens), dim=-1)
        finally:
            for h in hooks:
                h.remove()
        grams = [(F.normalize(o, dim=-1)[valid] @ F.normalize(o, dim=-1)[valid].T) for o in outs]
        return grams, emb_

    g0, e0 = run({})
    g1, e1 = run({("text", layer): torch.ones(4).index_fill(0, torch.tensor([head]), 0)})
    want_traj = sum((a - b).pow(2).mean() for a, b in zip(g0[layer + 1:], g1[layer + 1:], strict=True))
    want_emb = (1 - (e0 * e1).sum(-1)).mean()
    torch.testing.assert_close(traj[("text", layer)][head], want_traj, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(emb[("text", layer)][head], want_emb, atol=1e-6, rtol=1e-3)


def test_optin_chunking_does_not_change_scores(small):
    model, images, _ = small
    a = optin_importance(model, images, towers=["image"], chunk=5)
    b = optin_importance(model, images, towers=["image"], chunk=200)
    for kind in ("heads", "neurons"):
        for key in a[kind]:
            torch.testing.assert_close(a[kind][key], b[kind][key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("flops", [0.45, 0.6, 0.9])
def test_select_under_budget_meets_budget_and_keeps_top_units(small, flops):
    model, _, _ = small
    imp, fm = magnitude_importance(model), flop_model(model)
    heads, neurons, info = select_under_budget(imp, fm, flops)
    for tower, tf in fm.items():
        keys = [(tower, i) for i in range(3)]
        kept = tf.total([int(heads[k].sum()) for k in keys], [int(neurons[k].sum()) for k in keys])
        assert kept == info[tower]["selected"] <= flops * tf.dense
        assert kept > (flops - 0.1) * tf.dense  # the budget is used, not wasted
        for kind, masks in (("heads", heads), ("neurons", neurons)):
            scores = torch.cat([imp[kind][k] for k in keys])
            keep = torch.cat([masks[k] for k in keys]).bool()
            if keep.any() and (~keep).any():
                assert scores[keep].min() >= scores[~keep].max()  # kept units are a prefix of the ranking
    with pytest.raises(ValueError, match="cannot hold"):
        select_under_budget(imp, fm, 0.5, min_heads=4)


def test_tower_splits_spend_the_whole_model_budget_and_per_tower_fractions_are_kept(small):
    model, _, _ = small
    fm = flop_model(model)
    dense = {t: tf.dense for t, tf in fm.items()}
    splits = tower_splits(fm, 0.5, step=0.1)
    assert splits[0] == {"image": 0.5, "text": 0.5}  # the even split first
    assert len(splits) > 3 and len({round(s["image"], 6) for s in splits}) == len(splits)
    for split in splits:
        assert all(0 < f <= 1 for f in split.values())
        assert sum(split[t] * dense[t] for t in fm) == pytest.approx(0.5 * sum(dense.values()))
    assert tower_splits({"image": fm["image"]}, 0.3) == [{"image": 0.3}]
    imp = magnitude_importance(model)
    heads, neurons, info = select_under_budget(imp, fm, {"image": 0.8, "text": 0.3})
    for tower, frac in (("image", 0.8), ("text", 0.3)):
        assert (frac - 0.15) * dense[tower] < info[tower]["selected"] <= frac * dense[tower]
    with pytest.raises(ValueError, match="no FLOP fraction for the text tower"):
        select_under_budget(imp, fm, {"image": 0.5})
    with pytest.raises(ValueError, match="text tower"):
        select_under_budget(imp, fm, {"image": 0.5, "text": 1.5})


def test_relation_damage_is_zero_for_the_dense_model_and_grows_with_the_cut(small):
    model, _, _ = small
    images, tokens = tiny_inputs(model, batch=8)
    assert relation_damage(model, model, images, tokens) == pytest.approx(0.0, abs=1e-6)
    damage = [relation_damage(model, prune_backbone(model, "magnitude", f)[0], images, tokens) for f in (0.9, 0.6)]
    assert 0 < damage[0] < damage[1]


def test_a_model_budget_takes_the_split_that_keeps_the_relations_best(small):
    model, images, tokens = small
    pairs = tiny_inputs(model, batch=8)
    pruned, report = prune_backbone(model, "magnitude", 0.5, budget="model",
                                    select_on={"image": pairs[0], "text": pairs[1]})
    tried = report["split"]["tried"]
    assert len(tried) > 2 and report["split"]["fractions"] == min(tried, key=lambda r: r["damage"])["fractions"]
    assert report["split"]["fractions"] != {"image": 0.5, "text": 0.5}  # the tiny model's towers differ
    best = report["split"]["fractions"]
    for tower, rep in report["towers"].items():  # each tower meets its share, the towers together meet flops
        assert rep["flops_after_counted"] <= best[tower] * rep["flops_before_counted"] and rep["budget_met"]
    assert report["model_flops"]["after_counted"] <= 0.5 * report["model_flops"]["before_counted"]
    assert report["model_flops"]["ratio"] > 0.45 and report["budget"] == "model"
    # the reported damage is the pruned model's own
    assert relation_damage(model, pruned, *pairs) == pytest.approx(min(r["damage"] for r in tried), rel=1e-4)
    with pytest.raises(ValueError, match="select_on"):
        prune_backbone(model, "magnitude", 0.5, budget="model")
    with pytest.raises(ValueError, match="budget must be 'tower'"):
        prune_backbone(model, "magnitude", 0.5, budget="global")


@pytest.mark.parametrize("method", ["optin", "magnitude", "random"])
def test_prune_backbone_reports_counted_flops_within_budget(small, method, tmp_path):
    model, images, tokens = small
    before = model.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"].clone()
    pruned, report = prune_backbone(model, method, 0.6, images, tokens, chunk=64)
    for rep in report["towers"].values():
        assert rep["budget_met"] and rep["flops_after_counted"] <= 0.6 * rep["flops_before_counted"]
        assert rep["flops_before_counted"] == rep["flops_before_analytic"]
        assert rep["flops_after_counted"] == rep["flops_after_analytic"]
        assert len(rep["kept_heads"]) == 3 and all(k <= t for k, t in zip(rep["kept_heads"], rep["total_heads"]))
    assert report["params_after"] < report["params_before"]
    assert report["spec"] == pruned.vlkit_pruned_spec and json.dumps(report)
    assert torch.equal(model.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"], before)
    png = plot_kept_units(report, tmp_path / "kept.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with torch.no_grad():
        assert pruned.encode_image(images).shape == (3, 32) and pruned.encode_text(tokens).shape == (3, 32)


def test_random_is_seeded_and_optin_needs_inputs(small):
    model, images, _ = small
    a, b = random_importance(model, seed=3), random_importance(model, seed=3)
    assert all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])
    with pytest.raises(ValueError, match="calib_texts"):
        optin_importance(model, images, towers=["image", "text"])


def test_conv_channel_pruning_keeps_outputs_valid_and_reloads():
    model = tiny_resnet_clip()
    x = torch.randn(2, 3, 64, 64)
    report = prune_conv_channels(model, 0.5, x)
    assert report["params_after"] < 0.8 * report["params_before"]
    assert report["output_shape"] == [2, 32]
    assert model.visual.layer1[0].conv1.out_channels == 8  # 16 -> 8 internal bottleneck channels
    spec = json.loads(json.dumps(model.vlkit_pruned_spec))
    assert spec["resized"]["modules"]["visual.layer1.0.conv1"]["out_channels"] == 8
    fresh = rebuild_pruned(tiny_resnet_clip(seed=1), spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(x), model.encode_image(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="head/neuron"):
        prune_conv_channels(tiny_clip(), 0.5, torch.randn(1, 3, 32, 32))


def test_a_resnet_clip_prunes_its_text_tower_only():
    model = tiny_resnet_clip()
    pruned, report = prune_backbone(model, "magnitude", 0.7)
    assert set(report["towers"]) == {"text"} and report["towers"]["text"]["budget_met"]
    assert {b["tower"] for b in pruned.vlkit_pruned_spec["blocks"]} == {"text"}


def test_random_baseline_keeps_heads_and_neurons_in_proportion(small):
    """Uniform random scores with the importance-per-FLOP search would drop every (costly) head first;
    the proportional split keeps about the same cost fraction of each kind, within the budget."""
    model = small[0]
    imp = random_importance(model, ("image",), seed=0)
    fm = flop_model(model, ("image",))
    heads, neurons, info = select_under_budget(imp, fm, 0.6, split="proportional")
    kept_h = sum(int(m.sum()) for m in heads.values()) / sum(m.numel() for m in heads.values())
    kept_n = sum(int(m.sum()) for m in neurons.values()) / sum(m.numel() for m in neurons.values())
    assert kept_h > 0.2 and abs(kept_h - kept_n) < 0.35
    assert info["image"]["selected"] <= info["image"]["budget"]
    with pytest.raises(ValueError, match="split must be"):
        select_under_budget(imp, fm, 0.6, split="fair")


def test_every_name_vlkit_compress_exports_is_the_object_even_after_its_submodules_load():
    import importlib
    import types

    import vlkit.compress as vc

    for module in sorted(set(vc._WHERE.values())):
        importlib.import_module(f"vlkit.compress.{module}")
    shadowed = [name for name in vc.__all__ if isinstance(getattr(vc, name), types.ModuleType)]
    assert not shadowed, f"submodules shadow these exports: {shadowed}"
