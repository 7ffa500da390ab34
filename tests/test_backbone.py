"""The shared backbone: every loading path, the saved form, errors, and dense features."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlkit.backbone import BackboneError, load_backbone
from vlkit.backbone.dense import dense_features
from vlkit.errors import VlkitError


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return load_backbone("vlkit-tiny-test").eval()


@pytest.fixture(scope="module")
def batch(bb):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a red circle", "a star"])


def test_save_load_round_trip_is_identical(bb, batch, tmp_path):
    images, tokens = batch
    bb.save(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {"model.safetensors", "vlkit_backbone.json"}
    again = load_backbone(tmp_path / "saved").eval()
    assert torch.equal(again.encode_image(images), bb.encode_image(images))
    assert torch.equal(again.encode_text(tokens), bb.encode_text(tokens))
    assert again.identity == bb.identity and again.name == "vlkit-tiny-test"


def test_identity_changes_with_weights(bb, tmp_path):
    other = load_backbone("vlkit-tiny-test")
    assert other.identity != bb.identity


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(bb, batch, tmp_path, suffix):
    images, _ = batch
    path = tmp_path / f"weights{suffix}"
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    loaded = load_backbone("vlkit-tiny-test", pretrained=str(path)).eval()
    assert torch.equal(loaded.encode_image(images), bb.encode_image(images))


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    state = load_backbone("vlkit-tiny").model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(BackboneError) as err:
        load_backbone("vlkit-tiny-test", pretrained=str(tmp_path / "tiny.safetensors"))
    msg = str(err.value)
    assert "'positional_embedding'" in msg or "tensor '" in msg
    assert "[16, 64]" in msg.replace("(", "[").replace(")", "]") or "shape" in msg
    assert "model.name" in msg


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BackboneError, match="weights_only"):
        load_backbone("vlkit-tiny-test", pretrained=str(tmp_path / "evil.pt"))


def test_unknown_model_suggests_names():
    with pytest.raises(BackboneError, match="Did you mean 'ViT-B-32'"):
        load_backbone("ViT-B-23")


def test_offline_pretrained_tag_says_how_to_pass_a_file(monkeypatch):
    def offline(*a, **k):
        raise RuntimeError("Failed to download weights: no network")

    monkeypatch.setattr(open_clip, "create_model", offline)  # no network is touched
    tag = open_clip.list_pretrained_tags_by_model("ViT-B-32")[0]
    with pytest.raises(BackboneError) as err:
        load_backbone("ViT-B-32", pretrained=tag)
    assert "model.pretrained=/path/to" in str(err.value) and "local-dir:" in str(err.value)


def test_local_dir_schema(bb, batch, tmp_path):
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": bb.config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    loaded = load_backbone(f"local-dir:{folder}").eval()
    assert torch.equal(loaded.encode_image(batch[0]), bb.encode_image(batch[0]))


@pytest.mark.parametrize("mode", ["plain", "maskclip", "clearclip"])
def test_dense_features_shape(bb, batch, mode):
    feats = bb.dense_features(batch[0], mode=mode)
    grid = bb.image_size // 8
    assert feats.shape == (2, grid, grid, bb.embed_dim)


def test_plain_dense_path_agrees_with_encode_image(bb, batch):
    _, cls = dense_features(bb.model.visual, batch[0], "plain", return_cls=True)
    torch.testing.assert_close(cls, bb.encode_image(batch[0], normalize=False), rtol=1e-5, atol=1e-5)


def test_maskclip_last_block_is_local_and_clearclip_mixes(bb):
    """MaskCLIP's value path keeps each token's own content; ClearCLIP's q-q attention mixes tokens."""
    from vlkit.backbone.dense import _last_block_dense

    block = bb.model.visual.transformer.resblocks[-1]
    x = torch.randn(1, 5, bb.model.visual.transformer.width, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 2] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(4))
    for mode, local in (("maskclip", True), ("clearclip", False)):
        diff = (_last_block_dense(block, y, mode) - _last_block_dense(block, x, mode)).abs().amax(dim=-1)[0]
        assert diff[2] > 1e-4
        others = torch.cat([diff[:2], diff[3:]])
        assert (others.max() == 0) if local else (others.max() > 1e-6)


def test_tokenizer_and_preprocess(bb):
    from PIL import Image

    tokens = bb.tokenize(["a red circle"])
    assert tokens.shape == (1, bb.context_length) and tokens[0, 0] == 49406
    x = bb.preprocess(Image.new("RGB", (100, 60), (255, 0, 0)))
    assert x.shape == (3, bb.image_size, bb.image_size)


def test_damaged_saved_backbone_files_are_clear_errors(tmp_path):
    folder = load_backbone("vlkit-tiny-test").save(tmp_path / "bb")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(VlkitError, match="model.safetensors was changed or damaged"):  # its recorded sha256
        load_backbone(folder)
    (folder / "model.safetensors").write_bytes(weights)
    meta = (folder / "vlkit_backbone.json").read_text()
    (folder / "vlkit_backbone.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(BackboneError, match="vlkit_backbone.json is damaged"):
        load_backbone(folder)


def _conv_stem_backbone(stem):
    from vlkit.backbone.core import Backbone, _build_model, _model_config

    cfg = _model_config("vlkit-tiny-test")
    cfg["vision_cfg"]["stem"] = stem
    torch.manual_seed(0)
    return Backbone(_build_model(cfg), "vlkit-tiny-test-conv", cfg).eval()


def test_conv_stem_keeps_the_patch_grid_and_round_trips(batch, tmp_path):
    from vlkit.backbone.stem import ConvStem
    from vlkit.compress.flops import count_flops, flop_model

    bb = _conv_stem_backbone([8, 16])
    stem = bb.model.visual.conv1
    assert isinstance(stem, ConvStem) and [c.stride for c in stem.convs] == [(2, 2)] * 3
    images, tokens = batch
    assert bb.dense_features(images).shape == (2, 4, 4, 64)  # 32 px / 8 px patches, as without the stem
    bb.save(tmp_path / "conv")
    again = load_backbone(tmp_path / "conv").eval()
    assert isinstance(again.model.visual.conv1, ConvStem)
    assert torch.equal(again.encode_image(images), bb.encode_image(images))
    # the analytic FLOP model counts every stem convolution at its own resolution: 16, 8 and 4 px outputs
    stem_flops = 2 * (16 * 16 * 8 * 3 * 9 + 8 * 8 * 16 * 8 * 9 + 4 * 4 * 64 * 16 * 9)
    fm = flop_model(bb.model)["image"]
    assert fm.fixed_parts["patch_embed"] == stem_flops
    assert count_flops(bb.model, images=images) == {"image": 2 * fm.dense}


def test_a_stem_that_does_not_make_the_patch_size_is_a_clear_error():
    with pytest.raises(BackboneError, match="patch_size is 8"):
        _conv_stem_backbone([8])


def test_text_encoding_skips_the_padding_exactly(bb):
    """Positions after the batch's last end-of-text token are not computed; the embeddings are unchanged."""
    tokens = bb.tokenize(["a red circle", "two shapes: a blue star and a green ring"])
    seen = []
    hook = bb.model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            fast = bb.encode_text(tokens)
    finally:
        hook.remove()
    full = bb.model.encode_text(tokens, normalize=True)
    last_eot = int(tokens.argmax(dim=-1).max())
    assert seen == [last_eot + 1] and last_eot + 1 < bb.context_length
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)


def test_a_text_longer_than_the_context_is_cut_with_a_warning(bb):
    from vlkit.backbone import TextTruncatedWarning

    ctx = bb.context_length  # 16: start + 14 words + end fit exactly
    fits, over = " ".join(["red"] * (ctx - 2)), " ".join(["red"] * (ctx - 1))
    assert bb.truncated([fits, over, "a star"]) == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb.tokenize([fits, "a star"])  # no warning when nothing is cut
    with pytest.warns(TextTruncatedWarning, match="longer than the text encoder's 16-token context"):
        tokens = bb.tokenize([fits, over])
    assert torch.equal(tokens[0], tokens[1])  # the cut text keeps exactly what fits
