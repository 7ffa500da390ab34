"""Unstructured and N:M sparsity hit exactly the requested zeros and fold into plain tensors."""

from __future__ import annotations

import pytest
import torch

from vlkit.compress.sparsity import apply_sparsity, make_permanent, nm_mask, sparsifiable, sparsity_report
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs, tiny_resnet_clip


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_layerwise_sparsity_is_exact_per_layer():
    model = tiny_clip()
    report = apply_sparsity(model, 0.3, scope="layer")
    names = [n for n, _, _ in sparsifiable(model)]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in names and "visual.conv1.weight" in names
    for name, rec in report["layers"].items():
        assert rec["zeros"] == round(0.3 * rec["numel"]), name


def test_global_sparsity_is_exact_overall_and_uneven_per_layer():
    model = tiny_clip()
    report = apply_sparsity(model, 0.6, scope="global", towers=["image"])
    assert report["zeros"] == round(0.6 * report["numel"])
    assert all(n.startswith("visual.") for n in report["layers"])
    per_layer = {round(r["sparsity"], 3) for r in report["layers"].values()}
    assert len(per_layer) > 1  # global magnitude pruning spreads zeros unevenly


def test_two_four_pattern_and_make_permanent():
    model = tiny_clip()
    images, tokens = tiny_inputs(model, batch=2)
    keys = set(model.state_dict())
    report = apply_sparsity(model, pattern="2:4")
    assert report["skipped"] == [] and report["sparsity"] == pytest.approx(0.5)
    for _, module, pname in sparsifiable(model):
        w = getattr(module, pname)
        groups = w.reshape(w.shape[0], -1, 4)
        assert torch.all((groups == 0).sum(-1) == 2)
    with torch.no_grad():
        masked_out = model.encode_text(tokens)
    assert make_permanent(model) == len(sparsifiable(model))
    assert set(model.state_dict()) == keys
    attn = model.transformer.resblocks[0].attn
    assert type(attn.in_proj_weight) is torch.nn.Parameter and not attn._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), masked_out, atol=1e-5, rtol=1e-5)
        model.encode_image(images)
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.5)


def test_nm_mask_keeps_largest_and_rejects_bad_shapes():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, 2.5, -0.1, 9.0]])
    assert nm_mask(w).tolist() == [[0, 1, 1, 0, 0, 1, 0, 1]]
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.ones(2, 6))
    with pytest.raises(ValueError, match="N:M"):
        apply_sparsity(tiny_clip(), pattern="4:4")


def test_sparsity_is_module_generic_on_a_resnet_tower():
    model = tiny_resnet_clip()
    report = apply_sparsity(model, 0.5, towers=["image"])
    convs = [r for n, r in report["layers"].items() if "layer1.0.conv" in n]
    assert convs and all(r["zeros"] == round(0.5 * r["numel"]) for r in convs)
    report = apply_sparsity(model, pattern="2:4", towers=["image"])
    assert "visual.conv1.weight" in report["skipped"]  # 3*3*3 inputs is not a multiple of 4
    make_permanent(model)
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 32)
