"""The MLLM backbone: loading paths, the embedding protocol, save/load, heads and neurons, plugins on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vlkit.backbone import BackboneError, load_backbone
from vlkit.backbone.hf_blocks import hf_blocks, hf_masked, materialize_hf
from vlkit.backbone.tiny_llava import save_hf
from vlkit.cli import resolve_config
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import train
from vlkit.plugins import PluginError

TEXTS = ["a red circle", "two shapes: a blue star to the left of a green ring", "one gray cross on a dark background"]


@pytest.fixture(scope="module")
def tiny():
    bb = load_backbone("vlkit-tiny-llava-test")
    bb.eval()
    return bb


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=48, n_val=16, n_test=16, image_size=32, seed=3, progress=False, workers=1)
    return root


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_transformers_folder_loads_offline_with_normalised_embeddings(tiny, tmp_path):
    folder = save_hf(tiny, tmp_path / "llava")
    assert (folder / "config.json").is_file()
    for source in (f"hf:{folder}", str(folder)):
        bb = load_backbone(source)
        assert bb.kind == "mllm" and bb.name == f"hf:{folder}"
        with torch.no_grad():
            img, txt = bb.encode_image(_images()), bb.encode_text(bb.tokenize(TEXTS))
            ref = tiny.encode_image(_images())
        assert img.shape == (3, tiny.embed_dim) and txt.shape == (3, tiny.embed_dim)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(img, ref, atol=1e-6)
        assert bb.dense_features(_images(2)).shape == (2, 8, 8, tiny.embed_dim)


def test_an_unreachable_hub_id_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="local-dir FOLDER"):
        load_backbone("hf:vlkit-test/no-such-model")


def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(tiny):
    with torch.no_grad():
        batch = tiny.encode_text(tiny.tokenize(TEXTS))
        alone = torch.cat([tiny.encode_text(tiny.tokenize([t])) for t in TEXTS])
    tokens = tiny.tokenize(TEXTS)
    assert tokens[0, 0] == tiny.pad_id and tokens[:, -1].unique().numel() == 1  # left padding, common last token
    assert torch.allclose(batch, alone, atol=1e-5)


def test_vlkit_save_load_round_trip_is_identical(tiny, tmp_path):
    tiny.save(tmp_path / "saved")
    again = load_backbone(tmp_path / "saved")
    assert again.identity == tiny.identity
    with torch.no_grad():
        assert torch.equal(again.encode_image(_images()), tiny.encode_image(_images()))
        assert torch.equal(again.encode_text(again.tokenize(TEXTS)), tiny.encode_text(tiny.tokenize(TEXTS)))
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(Exception, match="save the backbone again"):
        load_backbone(tmp_path / "saved")


def test_a_masked_head_changes_the_output_exactly_as_the_narrower_model(tiny, tmp_path):
    bb = load_backbone("vlkit-tiny-llava-test")
    bb.eval()
    views = {v.key: v for v in hf_blocks(bb.model)}
    assert views[("text", 0)].n_heads == 2 and views[("image", 0)].mlp_hidden == 128
    heads = {("text", 1): torch.tensor([0.0, 1.0])}
    neurons = {("image", 0): (torch.arange(128) % 4 != 0).float(), ("text", 0): (torch.arange(64) < 40).float()}
    images, tokens = _images(), bb.tokenize(TEXTS)
    with torch.no_grad():
        dense = bb.encode_image(images), bb.encode_text(tokens)
        with hf_masked(bb.model, heads, neurons):
            masked = bb.encode_image(images), bb.encode_text(tokens)
        assert torch.equal(bb.encode_image(images), dense[0])  # the masks came off
        n_before = bb.num_parameters()
        materialize_hf(bb.model, heads, neurons)
        narrow = bb.encode_image(images), bb.encode_text(tokens)
    assert (masked[1] - dense[1]).abs().max() > 1e-3 and (masked[0] - dense[0]).abs().max() > 1e-3
    assert torch.allclose(narrow[0], masked[0], atol=1e-6) and torch.allclose(narrow[1], masked[1], atol=1e-6)
    # width 32, head_dim 16: one text head = q, k, v rows + o columns (no biases in Llama) = 4 * 16 * 32;
    # 32 image neurons = fc1 rows with their biases + fc2 columns = 32 * 33 + 32 * 32;
    # 24 text neurons = gate and up rows + down columns = 3 * 24 * 32
    assert bb.num_parameters() == n_before - 4 * 16 * 32 - (32 * 33 + 32 * 32) - 3 * 24 * 32
    bb.save(tmp_path / "pruned")
    again = load_backbone(tmp_path / "pruned")
    assert again.pruned_spec()["blocks"][0] == {"tower": "image", "index": 0, "heads": None, "mlp_hidden": 96}
    with torch.no_grad():
        assert torch.equal(again.encode_text(tokens), narrow[1])


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
def test_retrieval_trains_on_the_mllm_with_the_loss_falling(world, tmp_path):
    plugin, cfg = resolve_config([
        "plugin=retrieval", "model=tiny-llava-test", f"data.root={world}", f"run.dir={tmp_path / 'r'}",
        "train.epochs=0", "train.max_steps=12", "train.batch_size=16", "train.progress=false",
        "train.checkpoint_every=0", "train.eval_every=1000", "optim.lr=2e-3", "optim.warmup_steps=0",
        "train.log_every=1", "retrieval.train_mode=lora", "retrieval.lora_rank=4", "train.best_metric="])
    metrics = train(cfg, plugin)
    log = [json.loads(x) for x in (tmp_path / "r/train_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.05
    assert 0 <= metrics["test"]["t2i_R@1"] <= 100 and metrics["test"]["n_images"] == 16
    saved = load_backbone(tmp_path / "r" / "backbone")  # adapters merged, a plain MLLM again
    assert saved.kind == "mllm" and (tmp_path / "r" / "adapter" / "adapter.json").is_file()


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
def test_captioning_lowers_the_loss_and_scores_greedy_captions(world, tmp_path):
    plugin, cfg = resolve_config([
        "plugin=caption", "model=tiny-llava-test", f"data.root={world}", f"run.dir={tmp_path / 'c'}",
        "train.epochs=0", "train.max_steps=15", "train.batch_size=16", "train.progress=false",
        "train.checkpoint_every=0", "train.eval_every=1000", "optim.lr=3e-3", "optim.warmup_steps=0",
        "train.log_every=1", "caption.max_new_tokens=8", "train.best_metric=", "caption.vision_from="])
    metrics = train(cfg, plugin)
    log = [json.loads(x) for x in (tmp_path / "c/train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    assert set(metrics["test"]) >= {"pair_f1", "color_f1", "shape_f1", "exact", "pair_f1_floor"}


def test_caption_metrics_match_a_hand_count():
    from vlkit_caption.task import caption_metrics, mentioned

    assert mentioned("a red circle to the left of two blue squares") == (
        {("red", "circle"), ("blue", "square")}, {"red", "blue"}, {"circle", "square"})
    m = caption_metrics(["a red circle", "a blue star and a red ring"],
                        [[("red", "circle")], [("blue", "star"), ("green", "ring")]],
                        [frozenset({"a red circle"}), frozenset({"a blue star"})])
    # pairs: predicted {rc} | {bs, rr}; true {rc} | {bs, gr}: tp 2, 3 predicted, 3 true -> F1 = 4/6
    assert m["pair_f1"] == pytest.approx(100 * 4 / 6)
    # colours: {red} | {blue, red} vs {red} | {blue, green}: tp 2 of 3 and 3 -> 4/6; shapes all right
    assert m["color_f1"] == pytest.approx(100 * 4 / 6) and m["shape_f1"] == pytest.approx(100.0)
    assert m["exact"] == pytest.approx(50.0)
    # floor: "red circle" (the commonest true pair) everywhere: tp 1, 2 predicted, 3 true -> 2/5
    assert m["pair_f1_floor"] == pytest.approx(100 * 2 / 5)


@pytest.mark.parametrize("name", ["csp"])
def test_a_clip_only_plugin_refuses_the_mllm_clearly(world, tmp_path, name):
    plugin, cfg = resolve_config([f"plugin={name}", "model=tiny-llava-test", f"data.root={world}",
                                  f"run.dir={tmp_path / name}", "train.max_steps=1"])
    with pytest.raises(PluginError, match=rf"plugin '{name}' does not run on mllm backbones.*CLIP backbone"):
        train(cfg, plugin)
    assert not (tmp_path / name).exists()


def test_the_caption_plugin_refuses_a_clip_backbone(world, tmp_path):
    plugin, cfg = resolve_config(["plugin=caption", "model=tiny-test", f"data.root={world}",
                                  f"run.dir={tmp_path / 'c'}", "train.max_steps=1"])
    with pytest.raises(PluginError, match="needs an MLLM backbone"):
        train(cfg, plugin)


def test_prune_cuts_the_mllm_to_the_budget_with_flops_counted_by_torch(tmp_path, capsys):
    from vlkit.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "model=vlkit-tiny-llava-test", "method=magnitude", "flops=0.5", f"out={out}"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    for tower in ("image", "text"):
        r = report["towers"][tower]
        # the analytic model the selection uses equals what FlopCounterMode counts, before and after
        assert r["flops_before_analytic"] == r["flops_before_counted"]
        assert r["flops_after_analytic"] == r["flops_after_counted"]
        assert r["budget_met"] and 0.4 < r["flops_ratio"] <= 0.5
    both = sum(report["towers"][t]["flops_after_counted"] for t in ("image", "text"))
    assert report["model_flops"]["after_counted"] == both and 0.4 < report["model_flops"]["ratio"] <= 0.5
    pruned = load_backbone(out)
    assert pruned.num_parameters() == report["params_after"] < report["params_before"]
    with torch.no_grad():
        assert pruned.encode_image(_images()).shape == (3, 32)
    assert main(["prune", "model=vlkit-tiny-llava-test", "flops=0.5", f"out={tmp_path / 'x'}"]) == 2
    assert "use one of magnitude, random" in capsys.readouterr().err
    assert main(["prune", "model=vlkit-tiny-llava-test", "method=magnitude", "budget=model",
                 f"out={tmp_path / 'x'}"]) == 2
    assert "is an MLLM: prune it with budget=tower" in capsys.readouterr().err


def test_sparsify_leaves_the_tied_output_head_dense(tmp_path):
    from vlkit.cli import main

    assert main(["sparsify", "model=vlkit-tiny-llava-test", "amount=0.5", f"out={tmp_path / 's'}"]) == 0
    report = json.loads((tmp_path / "s" / "sparsify_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not any("lm_head" in name or "embed_tokens" in name for name in report["layers"])
    assert any(name.startswith("model.vision_tower.") for name in report["layers"])
    bb = load_backbone(tmp_path / "s")
    dense = load_backbone("vlkit-tiny-llava-test")  # the same seeded weights, not sparsified
    emb = bb.model.model.language_model.embed_tokens.weight
    assert torch.equal(emb, dense.model.model.language_model.embed_tokens.weight)


def test_caption_command_prints_a_caption_and_refuses_a_clip_model(tiny, tmp_path, capsys, world):
    from vlkit.cli import main

    tiny.save(tmp_path / "m")
    image = world / "images" / "test" / "000001.png"
    assert main(["caption", f"image={image}", f"model={tmp_path / 'm'}", "max_new_tokens=3"]) == 0
    text = capsys.readouterr().out.strip()
    with torch.no_grad():
        expected = tiny.generate_captions(tiny.preprocess(Image.open(image).convert("RGB"))[None], 3)[0]
    assert text == expected
    assert main(["caption", f"image={image}", "model=vlkit-tiny-test"]) == 2
    assert "cannot write text" in capsys.readouterr().err


def test_the_retriever_indexes_and_searches_with_the_mllm(tiny, world, tmp_path):
    from vlkit.index.retriever import Retriever

    retriever = Retriever(tiny, num_workers=0, progress=False)
    retriever.add_images(world / "images" / "test")
    first = retriever.search(image=world / "images" / "test" / "000003.png", k=2)
    assert first[0].metadata["path"].endswith("000003.png") and first[0].score == pytest.approx(1.0, abs=1e-5)
    retriever.save(tmp_path / "index")
    again = Retriever.load(tmp_path / "index", progress=False)
    assert again.backbone.kind == "mllm"
    assert [h.id for h in again.search(text="a red circle", k=4)] == [h.id for h in retriever.search(text="a red circle", k=4)]


def test_the_vision_tower_starts_from_a_clip_image_tower():
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import LlavaForConditionalGeneration

    from vlkit.backbone.mllm import MLLMBackbone
    from vlkit.backbone.tiny_llava import distill_vision, llava_config, vision_from_clip

    torch.manual_seed(0)
    clip = load_backbone("vlkit-tiny-test")  # ViT width 64, 2 layers, patch 8 on 32 px, a plain patch projection
    tok = load_backbone("vlkit-tiny-llava-test").tokenizer
    cfg = llava_config(tok, width=32, layers=1, heads=2, mlp=64, vision_width=64, vision_layers=2, image_size=32)
    mllm = MLLMBackbone(LlavaForConditionalGeneration(cfg).eval(), tok, "t", mean=OPENAI_DATASET_MEAN,
                        std=OPENAI_DATASET_STD)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stats = vision_from_clip(mllm, clip.eval(), images)
    assert stats["token_cosine"] == pytest.approx(1.0, abs=1e-5)  # the same tower, weight for weight

    conv = load_backbone("vlkit-tiny-conv").eval()  # a convolutional stem: fitted, then distilled
    big = load_backbone("vlkit-tiny-llava")
    images = torch.randn(96, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fitted = vision_from_clip(big, conv, images[:64])
    assert 0.0 < fitted["stem_fit_r2"] < 1.0
    fresh = load_backbone("vlkit-tiny-llava")  # a random tower learns to match the CLIP tower's tokens
    distilled = distill_vision(fresh, conv, images, steps=20, batch_size=16, lr=2e-3, held_out=32, progress=False)
    assert distilled["token_cosine_after"] > distilled["token_cosine_before"] + 0.2
    with pytest.raises(ValueError, match="does not match"):
        vision_from_clip(big, clip, images)


@pytest.mark.slow
def test_two_processes_train_the_mllm(world, tmp_path):
    """DDP with an MLLM: weights no task reaches (the vision tower's last norm) must not stop the run."""
    from test_distributed import _free_port

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "vlkit", "train", "plugin=caption", "model=tiny-llava-test",
           f"data.root={world}", "train.epochs=0", "train.max_steps=3", "train.batch_size=8", "train.progress=false",
           "train.checkpoint_every=0", "train.best_metric=", "data.limit_eval=8", "caption.max_new_tokens=4",
           "caption.vision_from=",
           f"run.dir={run}"]
    # cwd: not the repository root, whose vlkit/ folder would shadow the installed package for `-m vlkit`
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3
    assert load_backbone(run / "backbone").kind == "mllm"


def test_the_default_caption_recipe_starts_the_tower_from_the_shipped_clip(world, tmp_path, capsys):
    from vlkit.errors import VlkitError

    common = ["plugin=caption", f"data.root={world}", "train.epochs=0", "train.max_steps=1", "train.batch_size=8",
              "train.progress=false", "train.checkpoint_every=0", "train.best_metric=", "data.limit_eval=4",
              "caption.max_new_tokens=2", "caption.vision_distill_steps=3", "caption.vision_distill_images=300"]
    plugin, cfg = resolve_config([*common, f"run.dir={tmp_path / 'a'}"])  # model=tiny-llava by default
    assert cfg.caption.vision_from == "cached:vlkit-tiny-shapes"
    train(cfg, plugin)
    said = capsys.readouterr().out
    assert "vision tower from cached:vlkit-tiny-shapes: stem_fit_r2" in said and "token_cosine_after" in said
    plugin, cfg = resolve_config([*common, "model=tiny-llava-test", f"run.dir={tmp_path / 'b'}"])
    with pytest.raises(VlkitError, match="caption.vision_from='cached:vlkit-tiny-shapes'.*does not match"):
        train(cfg, plugin)


def test_evaluating_a_trained_mllm_leaves_its_vision_tower_alone(tiny, world, tmp_path, capsys):
    # caption.vision_from (on by default) only starts a freshly built model; a loaded one is evaluated as it is
    tiny.save(tmp_path / "m")
    plugin, cfg = resolve_config(["plugin=caption", f"model.name={tmp_path / 'm'}", f"data.root={world}",
                                  "split=test", "data.limit_eval=8", "caption.max_new_tokens=3"])
    assert cfg.caption.vision_from
    from vlkit.engine.run import build

    backbone, _, _ = build(cfg, plugin)
    assert "skipped" in capsys.readouterr().out
    assert backbone.identity == load_backbone(tmp_path / "m").identity
