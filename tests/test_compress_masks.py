"""Block views and head/neuron masks: identity when unmasked, exact removal of one head, restorable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlkit.backbone.blocks import available_towers, tower_stages, transformer_blocks
from vlkit.compress.masks import apply_masks, masked, remove_masks
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs, tiny_resnet_clip


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "custom"])
def clip(request):
    model = tiny_clip(custom=request.param)
    return model, *tiny_inputs(model)


def test_views_cover_both_towers(clip):
    model, _, _ = clip
    views = transformer_blocks(model)
    assert [(v.tower, v.index) for v in views] == [(t, i) for t in ("image", "text") for i in range(3)]
    v = views[0]
    assert (v.n_heads, v.head_dim, v.width, v.mlp_hidden) == (4, 16, 64, 256)
    assert v.qkv_weight().shape == (192, 64) and v.out_weight().shape == (64, 64)
    assert v.fc_weight().shape == (256, 64) and v.proj_weight().shape == (64, 256)
    assert v.head_rows(1).tolist()[:2] == [16, 17] and v.head_rows(1).tolist()[16] == 64 + 16


def test_stages_reproduce_encoders(clip):
    model, images, tokens = clip
    with torch.no_grad():
        assert torch.equal(tower_stages(model, "image").forward(images), model.encode_image(images))
        assert torch.equal(tower_stages(model, "text").forward(tokens), model.encode_text(tokens))


def test_unsupported_tower_is_a_clear_error():
    model = tiny_resnet_clip()
    assert available_towers(model) == ("text",)
    with pytest.raises(NotImplementedError, match="ModifiedResNet.*supported"):
        transformer_blocks(model)
    assert len(transformer_blocks(model, ["text"])) == 2


def test_nothing_masked_equals_original(clip):
    model, images, tokens = clip
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(images), model.encode_text(tokens)
        ones = {v.key: torch.ones(v.n_heads) for v in transformer_blocks(model)}
        with masked(model, ones, all_blocks=True):
            out_i, out_t = model.encode_image(images), model.encode_text(tokens)
            assert model.visual.transformer.resblocks[0].attn.__dict__.get("_vlkit_explicit")
    torch.testing.assert_close(out_i, ref_i, **TOL)
    torch.testing.assert_close(out_t, ref_t, **TOL)
    assert "forward" not in model.visual.transformer.resblocks[0].attn.__dict__


def _block_io(model, tower, fn):
    """Inputs and outputs of every block of ``tower`` during fn()."""
    blocks = model.visual.transformer.resblocks if tower == "image" else model.transformer.resblocks
    ins, outs = [], []

    def record(_module, args, output):
        ins.append(args[0])
        outs.append(output)

    hooks = [b.register_forward_hook(record) for b in blocks]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def _manual_block(block, x, attn_mask, drop_head, n_heads):
    """Reference math of a default ResidualAttentionBlock with one head removed."""
    attn = block.attn
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n, length, width = h.shape
    split = lambda t: t.reshape(n, length, n_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores + attn_mask
    heads = scores.softmax(-1) @ v
    heads[:, drop_head] = 0
    x = x + attn.out_proj(heads.transpose(1, 2).reshape(n, length, width))
    return x + block.mlp(block.ln_2(x))


@pytest.mark.parametrize("tower", ["image", "text"])
def test_one_head_masked_is_local_and_exact(tower):
    model = tiny_clip()
    images, tokens = tiny_inputs(model)
    run = (lambda: model.encode_image(images)) if tower == "image" else (lambda: model.encode_text(tokens))
    ins0, outs0 = _block_io(model, tower, run)
    layer, head = 1, 2
    mask = torch.ones(4)
    mask[head] = 0
    with masked(model, {(tower, layer): mask}):
        ins1, outs1 = _block_io(model, tower, run)
    torch.testing.assert_close(outs1[0], outs0[0], atol=0, rtol=0)  # blocks before l untouched
    block = (model.visual.transformer if tower == "image" else model.transformer).resblocks[layer]
    attn_mask = None if tower == "image" else model.attn_mask
    with torch.no_grad():
        want = _manual_block(block, ins1[layer], attn_mask, head, 4)
    torch.testing.assert_close(outs1[layer], want, **TOL)
    assert not torch.allclose(outs1[layer], outs0[layer], atol=1e-4)


def test_neuron_mask_and_per_sample_masks():
    model = tiny_clip()
    images, _ = tiny_inputs(model, batch=2)
    key = ("image", 0)
    neurons = torch.ones(256)
    neurons[:100] = 0
    with torch.no_grad():
        with masked(model, neuron_masks={key: neurons}):
            single = model.encode_image(images)
        with masked(model, neuron_masks={key: torch.stack([torch.ones(256), neurons])}):
            per_sample = model.encode_image(images)
        dense = model.encode_image(images)
    torch.testing.assert_close(per_sample[1], single[1], **TOL)
    torch.testing.assert_close(per_sample[0], dense[0], **TOL)
    assert not torch.allclose(single[1], dense[1], atol=1e-4)


def test_remove_masks_restores_forward_and_state_dict():
    model = tiny_clip()
    keys = set(model.state_dict())
    apply_masks(model, {("text", 0): torch.zeros(4)}, {("image", 2): torch.zeros(256)})
    assert set(model.state_dict()) == keys
    remove_masks(model)
    attn, mlp = model.transformer.resblocks[0].attn, model.visual.transformer.resblocks[2].mlp
    assert "forward" not in attn.__dict__ and not mlp.gelu._forward_hooks
    with pytest.raises(KeyError):
        apply_masks(model, {("image", 7): torch.ones(4)})
    with pytest.raises(ValueError, match="3 entries"):
        apply_masks(model, {("image", 0): torch.ones(3)})
    remove_masks(model)
