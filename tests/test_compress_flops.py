"""The analytic FLOP model agrees exactly with torch's FlopCounterMode, dense and pruned."""

from __future__ import annotations

import pytest
import torch

from vlkit.compress.flops import count_flops, flop_model, head_flops, neuron_flops
from vlkit.compress.materialize import materialize
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs, tiny_resnet_clip


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_analytic_matches_counter_dense():
    model = tiny_clip()
    images, tokens = tiny_inputs(model, batch=3)
    fm = flop_model(model)
    counted = count_flops(model, images, tokens)
    assert counted == {"image": 3 * fm["image"].dense, "text": 3 * fm["text"].dense}
    img = fm["image"]
    assert img.tokens == 5 and img.head_cost[0] == head_flops(5, 64, 16) == 8 * 5 * 64 * 16 + 4 * 25 * 16
    assert img.neuron_cost[0] == neuron_flops(5, 64)
    assert img.fixed == img.fixed_parts["patch_embed"] + img.fixed_parts["proj"] == 2 * 4 * 64 * 3 * 256 + 2 * 64 * 32
    assert fm["text"].tokens == 16 and fm["text"].fixed == 2 * 64 * 32


def test_analytic_matches_counter_pruned_and_predicts_selection():
    model = tiny_clip(custom=True)
    images, tokens = tiny_inputs(model, batch=2)
    heads = {("image", 0): torch.tensor([1.0, 0, 0, 1]), ("text", 2): torch.zeros(4)}
    neurons = {("image", 2): torch.arange(256).lt(40).float(), ("text", 0): torch.zeros(256)}
    before = flop_model(model)
    small = materialize(model, heads, neurons)
    after = flop_model(small)
    assert count_flops(small, images, tokens) == {"image": 2 * after["image"].dense, "text": 2 * after["text"].dense}
    # the dense model's FLOP model predicts the pruned FLOPs from the kept unit counts alone
    assert before["image"].total([2, 4, 4], [256, 256, 40]) == after["image"].dense
    assert before["text"].total([4, 4, 0], [0, 256, 256]) == after["text"].dense
    assert after["text"].dense < before["text"].dense


def test_counter_leaves_the_model_as_it_was():
    model = tiny_clip().train()
    images, tokens = tiny_inputs(model, batch=1)
    count_flops(model, images, tokens)
    attn = model.visual.transformer.resblocks[0].attn
    assert model.training and "forward" not in attn.__dict__


def test_conv_tower_is_counted_as_is():
    model = tiny_resnet_clip()
    images = torch.randn(1, 3, 64, 64)
    counted = count_flops(model, images=images)
    assert counted["image"] > 0 and set(counted) == {"image"}
