"""UFO on an MLLM backbone: the <MASK> token, the answer layout, the pixel-shuffle readout, training and
segment() through a trained run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vlkit.backbone import load_backbone
from vlkit.cli import resolve_config
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import train
from vlkit.errors import VlkitError
from vlkit_ufo.mllm import (
    MASK_EMBEDS,
    MASK_TOKEN,
    Answers,
    MllmSegmenter,
    grid_points,
    lm_hidden,
    mask_logits,
    prepare_backbone,
)
from vlkit_ufo.segment import Segmenter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ufo-mllm-world")
    generate_shapes(root, n_train=48, n_val=12, n_test=12, image_size=32, seed=5, n_czsl_per_pair=1,
                    progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A short ufo run on the tiny test MLLM (losses logged every step)."""
    out = tmp_path_factory.mktemp("ufo-mllm-run") / "r"
    plugin, cfg = resolve_config([
        "plugin=ufo", "model=tiny-llava-test", f"data.root={world}", f"run.dir={out}", "train.epochs=0",
        "train.max_steps=16", "train.batch_size=8", "train.eval_batch_size=12", "train.progress=false",
        "train.checkpoint_every=0", "train.eval_every=1000", "optim.lr=3e-3", "optim.warmup_steps=0",
        "train.log_every=1", "ufo.mllm_grid=4", "ufo.mllm_train_points=8"])
    metrics = train(cfg, plugin)
    return out, metrics


def test_the_mask_token_is_added_once_and_survives_save_and_load(tmp_path):
    bb = load_backbone("vlkit-tiny-llava-test")
    before = len(bb.tokenizer)
    tokens = prepare_backbone(bb)
    grown = len(bb.tokenizer)
    # <MASK> and the prompt's word 'segment' (the shapes tokenizer knows 'background' and ',' already)
    assert grown == before + 2 and bb.tokenizer.unk_token_id not in bb._ids("segment background ,")
    assert bb.model.get_input_embeddings().num_embeddings == grown == bb.model.config.text_config.vocab_size
    assert bb.model.get_output_embeddings().weight is bb.model.get_input_embeddings().weight  # still tied
    assert prepare_backbone(bb) == tokens and len(bb.tokenizer) == grown  # a second call adds nothing
    assert bb._ids(f"circle , {MASK_TOKEN}{MASK_TOKEN}")[-2:] == [tokens.masks[0]] * 2
    with torch.no_grad():
        bb.model.get_input_embeddings().weight[tokens.masks[0]] = 0.5  # as if trained
    bb.save(tmp_path / "m")
    again = load_backbone(tmp_path / "m")
    assert len(again.tokenizer) == grown and again.tokenizer.convert_tokens_to_ids(MASK_TOKEN) == tokens.masks[0]
    assert prepare_backbone(again) == tokens and len(again.tokenizer) == grown
    assert torch.equal(again.model.get_input_embeddings().weight, bb.model.get_input_embeddings().weight)
    assert len(set(tokens.masks)) == 1 and len(tokens.masks) == MASK_EMBEDS  # UFO: one token written 16 times
    distinct = prepare_backbone(again, 16)  # or one token per mask embedding, added beside it
    assert len(set(distinct.masks)) == MASK_EMBEDS and len(again.tokenizer) == grown + MASK_EMBEDS


def test_the_pixel_shuffle_readout_equals_a_hand_made_case():
    """A 2 x 2 image grid, one answer: mask pixel (4y + dy, 4x + dx) = embedding 4dy + dx . feature (y, x) / sqrt(D)."""
    image, pad, d = 99, 0, 3
    answers = Answers(prefix=[[1] + [image] * 4 + [7, 8]], groups=[[(0, [5, 6] + [4] * 17)]])
    layout = answers.tensors(image, pad, torch.device("cpu"))
    length = layout["ids"].shape[1]
    hidden = torch.randn(1, length, d, generator=torch.Generator().manual_seed(0))
    first = 2  # the answer's steps: 0 point token, 1 a class token, 2 the comma (the first state before <MASK>)
    got = mask_logits(hidden, layout, [(0, 0, first)], (8, 8))[0]
    feats = hidden[0, 1:5].reshape(2, 2, d)
    start = 7 + first  # prefix of 7 tokens, then the answer
    emb = hidden[0, start:start + MASK_EMBEDS]
    want = torch.empty(8, 8)
    for y in range(2):
        for x in range(2):
            for dy in range(4):
                for dx in range(4):
                    want[4 * y + dy, 4 * x + dx] = emb[4 * dy + dx] @ feats[y, x] / math.sqrt(d)
    assert torch.allclose(got, want, atol=1e-6)


def test_answers_see_the_prompt_and_themselves_never_each_other():
    bb = load_backbone("vlkit-tiny-llava-test").eval()
    tokens = prepare_backbone(bb)
    seg = MllmSegmenter(bb, tokens, grid=2)
    images = torch.randn(1, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
    circle, star = bb._ids("circle")[0], bb._ids("star")[0]

    def hidden(second: list[int], classes=("circle", "star")):
        answers = Answers([seg.prefix(list(classes))], [[(0, [circle, tokens.comma]), (3, second)]])
        layout = answers.tensors(bb.image_token_id, bb.pad_id, images.device)
        with torch.no_grad():
            return lm_hidden(bb, images, layout, grid_points(2)), layout

    h1, layout = hidden([star, tokens.comma, tokens.masks[0]])
    h2, _ = hidden([tokens.background, tokens.eos, tokens.eos])
    first = layout["seg"][0] == 0
    assert torch.equal(h1[0, first], h2[0, first])  # answer 0 never sees answer 1
    assert not torch.allclose(h1[0, layout["seg"][0] == 1], h2[0, layout["seg"][0] == 1])
    h3, _ = hidden([star, tokens.comma, tokens.masks[0]], classes=("star", "circle"))
    assert not torch.allclose(h1[0, first], h3[0, first])  # the prompt is seen
    # answers start at one position; the image tokens see each other both ways, never the prompt after them
    assert layout["pos"][0, first].tolist() == layout["pos"][0, layout["seg"][0] == 1][:3].tolist()
    img = layout["is_image"][0].nonzero()[:, 0]
    allowed = layout["allowed"][0]
    assert allowed[img[0], img[-1]] and not allowed[img[-1], img[-1] + 1]


def test_a_few_training_steps_lower_the_loss_and_evaluate_with_cocoeval(run):
    out, metrics = run
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.7 * first
    assert log[-1]["loss_text"] < log[0]["loss_text"] and log[-1]["loss_dice"] < log[0]["loss_dice"]
    test = metrics["test"]
    assert {"segm/AP", "bbox/AP", "agnostic/segm/AP", "mIoU", "mIoU_floor"} <= set(test)
    assert 0.0 <= test["segm/AP"] <= 1.0 and test["images"] == 12


def test_segment_runs_a_trained_mllm_run_at_the_original_size(run, world):
    out, _ = run
    segmenter = Segmenter.from_run(out)
    assert isinstance(segmenter.head, MllmSegmenter)
    image = Image.open(next((world / "images" / "test").iterdir())).convert("RGB").resize((48, 40))
    found = segmenter(image, "circle", threshold=0.0)
    assert all(i.mask.shape == (40, 48) and i.query == "circle" for i in found)
    assert [i.score for i in found] == sorted((i.score for i in found), reverse=True)
    with pytest.raises(VlkitError, match="same token"):
        segmenter(image, "background", threshold=0.0)  # an answer of that class would read as 'no instance'
    with pytest.raises(VlkitError, match="same token"):
        segmenter.head(segmenter.head.backbone.preprocess(image)[None], [["red circle", "red star"]])


def test_a_clip_method_on_the_mllm_is_refused_clearly(world, tmp_path):
    plugin, cfg = resolve_config(["plugin=ufo", "model=tiny-llava-test", f"data.root={world}",
                                  f"run.dir={tmp_path / 'r'}", "ufo.method=training_free", "train.max_steps=1"])
    with pytest.raises(VlkitError, match="ufo.method=head"):
        train(cfg, plugin)
