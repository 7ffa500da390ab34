"""The retrieval plugin end to end, LoRA adapters, and the Retriever API with its index."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from vlkit.backbone import load_backbone
from vlkit.cli import main, resolve_config
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import train
from vlkit.errors import VlkitError
from vlkit.index import IndexMismatchError
from vlkit.index.retriever import Retriever
from vlkit_retrieval.config import RetrievalConfig
from vlkit_retrieval.lora import add_lora, load_adapter, merge_lora, save_adapter
from vlkit_retrieval.task import caption_positives


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=48, n_val=16, n_test=16, image_size=32, seed=3, progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "tiny"
    load_backbone("vlkit-tiny-test").save(path)
    return path


def test_caption_positives_share_identical_captions():
    caps, pos = caption_positives([["a red circle", "a star"], ["A red  circle"], ["a ring"]], 3)
    assert caps == ["a red circle", "a star", "A red  circle", "a ring"]
    assert pos.rows(0, 4).tolist() == [[True, True, False], [True, False, False], [True, True, False],
                                       [False, False, True]]


def test_training_raises_recall_and_exports_backbone(world, tmp_path):
    # test on the training images: on a world this small, fitting them is the signal a short run can show
    args = ["plugin=retrieval", "model=tiny-test", f"data.root={world}", "data.test_split=train",
            "train.epochs=20", "train.batch_size=16", "train.progress=false", "train.checkpoint_every=0",
            "train.eval_every=1000", "optim.lr=3e-4", "optim.warmup_steps=5", "retrieval.export_as=tiny-world",
            "train.best_metric="]
    plugin, cfg = resolve_config([*args, "train.epochs=0", "train.max_steps=1", f"run.dir={tmp_path / 'r0'}"])
    before = train(cfg, plugin)
    plugin, cfg = resolve_config([*args, f"run.dir={tmp_path / 'r'}"])
    after = train(cfg, plugin)
    assert after["test"]["rsum"] > before["test"]["rsum"] + 60  # chance is about 66 on 48 images
    log = [json.loads(x) for x in (tmp_path / "r/train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    exported = load_backbone(tmp_path / "r" / "backbone")
    from vlkit.cache import backbone_dir

    assert load_backbone(backbone_dir("tiny-world")).identity == exported.identity


def test_validation_log_has_training_time_and_a_recall_plot(world, tmp_path):
    plugin, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}", "train.epochs=3",
                                  "train.batch_size=16", "train.progress=false", "optim.warmup_steps=1",
                                  f"run.dir={tmp_path / 'r'}"])
    train(cfg, plugin)
    # validation at the end of every epoch, each with the training time so far, plotted against CPU minutes
    evals = [json.loads(x) for x in (tmp_path / "r/eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6, 9]
    assert all(0 < a["cpu_s"] < b["cpu_s"] and a["wall_s"] < b["wall_s"] for a, b in zip(evals, evals[1:]))
    assert (tmp_path / "r/recall.png").stat().st_size > 0 and "zeroshot_acc" in evals[-1]


def test_export_under_a_shipped_name_is_refused_before_training(world, tmp_path):
    plugin, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}",
                                  "retrieval.export_as=vlkit-tiny-shapes", f"run.dir={tmp_path / 'r'}"])
    with pytest.raises(VlkitError, match="names a backbone shipped with vlkit"):
        train(cfg, plugin)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_scene_positives_and_hard_negatives_in_a_batch(world):
    from vlkit.data.shapes import true_captions
    from vlkit_retrieval.data import build_data

    bb = load_backbone("vlkit-tiny-test")
    _, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}",
                             "retrieval.hard_negatives=true"])
    data = build_data(cfg, bb)
    torch.manual_seed(0)
    items = [data.train[i] for i in range(16)]
    batch = data.collate(items)
    n = len(items)
    assert batch["pos"].shape == (n, len(batch["captions"])) and len(batch["captions"]) > n
    scenes = data.train.scenes
    for i, it in enumerate(items):
        truths = true_captions(scenes.objects[it["image_id"]], 32)
        assert batch["pos"][i].tolist() == [c in truths for c in batch["captions"]]
        assert batch["pos"][i, i] and it["negative"] not in truths
    # positives=caption: the old rule (the same image or the very same text), no scene needed; with several
    # captions per image, each image row holds all of its own
    _, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}",
                             "retrieval.positives=caption", "retrieval.captions_per_image=2"])
    data = build_data(cfg, bb)
    items = [data.train[i] for i in range(16)]
    batch = data.collate(items)
    caps = batch["captions"]
    assert len(caps) == 32 and batch["pos"].shape == (16, 32)
    for i, it in enumerate(items):
        own = {" ".join(c.lower().split()) for c in it["captions"]}
        assert batch["pos"][i].tolist() == [j // 2 == i or " ".join(c.lower().split()) in own
                                            for j, c in enumerate(caps)]


def test_lock_image_trains_only_the_text_tower(tiny_dir):
    from vlkit_retrieval.task import set_trainable

    bb = load_backbone(tiny_dir)
    set_trainable(bb, "lock_image", RetrievalConfig())
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("visual.") for n in trainable)


def test_lora_adapter_save_load_merge_round_trip(tiny_dir, tmp_path):
    cfg = RetrievalConfig(train_mode="lora", lora_rank=4, lora_alpha=8)
    bb = load_backbone(tiny_dir)
    add_lora(bb, cfg)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # peft initialises B to zero: make the adapters do something
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(["a red circle", "two stars"])
    with torch.no_grad():
        ref_i, ref_t = bb.encode_image(images), bb.encode_text(tokens)
    save_adapter(bb, tmp_path / "adapter")
    assert (tmp_path / "adapter/adapter.safetensors").stat().st_size < 200_000
    fresh = load_backbone(tiny_dir)
    load_adapter(fresh, tmp_path / "adapter")
    merged = merge_lora(fresh)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(images), ref_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.encode_text(tokens), ref_t, rtol=1e-5, atol=1e-5)
    merged.save(tmp_path / "merged")
    again = load_backbone(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(tokens), ref_t, rtol=1e-5, atol=1e-5)


def test_retriever_search_save_load_and_wrong_backbone(world, tiny_dir, tmp_path):
    bb = load_backbone(tiny_dir)
    folder = tmp_path / "imgs"
    shutil.copytree(world / "images" / "test", folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.jpg").write_text("hello")
    retriever = Retriever(bb, num_workers=0, progress=False)
    report = retriever.add_images(folder)
    assert report.count == 2 and sorted(report.names) == ["broken.png", "notes.jpg"]
    assert len(retriever.indexes["images"]) == 16
    retriever.add_texts(["a red circle", "a blue star"])
    first = retriever.search(image=folder / "000001.png", k=3)
    assert first[0].metadata["path"].endswith("000001.png") and first[0].score == pytest.approx(1.0, abs=1e-5)
    hits = retriever.search(text="a red circle", k=5)
    retriever.save(tmp_path / "index")
    loaded = Retriever.load(tmp_path / "index", progress=False)
    again = loaded.search(text="a red circle", k=5)
    assert [(h.id, h.metadata) for h in hits] == [(h.id, h.metadata) for h in again]
    assert loaded.search(image=Image.open(folder / "000002.png"), k=2, target="texts")[0].metadata["text"]
    with pytest.raises(IndexMismatchError, match="rebuild it"):
        Retriever.load(tmp_path / "index", backbone=load_backbone("vlkit-tiny-test"))


def test_int8_retriever_embeds_close_to_fp32_and_keeps_the_setting(world, tiny_dir, tmp_path):
    bb = load_backbone(tiny_dir)
    files = sorted((world / "images" / "test").glob("*.png"))
    _, fp32 = Retriever(bb, num_workers=0, progress=False).embed_images(files)
    int8 = Retriever(bb, num_workers=1, progress=False, int8=True)
    kept, q8 = int8.embed_images(files)
    assert kept == list(range(len(files))) and not torch.equal(q8, fp32)  # really another computation
    cos = (q8 * fp32).sum(-1)
    assert float(cos.min()) > 0.99 and torch.allclose(q8.norm(dim=-1), torch.ones(len(files)))
    # the backbone itself is untouched: still plain linear layers, same fp32 embeddings
    assert torch.equal(Retriever(bb, num_workers=0, progress=False).embed_images(files)[1], fp32)
    int8.add_images(files)
    int8.save(tmp_path / "index")
    loaded = Retriever.load(tmp_path / "index", progress=False)
    assert loaded.int8 and loaded.search(image=files[3], k=1)[0].id == 3  # queries encoded as the index was


def test_encoding_processes_give_the_embeddings_of_one_process_and_report_the_same_files(world, tiny_dir, tmp_path):
    from vlkit.data.images import SkipReport

    bb = load_backbone(tiny_dir)
    files = sorted((world / "images" / "test").glob("*.png"))[:11]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    files.insert(4, tmp_path / "broken.png")
    results = {}
    for encoders in (1, 3):  # 3 processes over the 3 batches of 4 files, each decoding and encoding its own
        report = SkipReport()
        kept, emb = Retriever(bb, batch_size=4, num_workers=0, progress=False, encoders=encoders).embed_images(
            files, report=report)
        results[encoders] = (kept, emb, report.names)
    (k1, e1, n1), (k3, e3, n3) = results[1], results[3]
    assert k1 == k3 == [i for i in range(12) if i != 4] and n1 == n3 == ["broken.png"]
    torch.testing.assert_close(e3, e1, rtol=0, atol=1e-5)
    with pytest.raises(VlkitError, match="encoders=0"):
        Retriever(bb, encoders=0)


@pytest.mark.slow
def test_two_process_index_equals_one_process(world, tiny_dir, tmp_path):
    import numpy as np
    from test_distributed import torchrun

    from vlkit.index import VectorIndex

    args = [f"images={world / 'images' / 'train'}", f"model={tiny_dir}", "batch_size=16", "workers=0",
            "progress=false"]
    assert main(["index", *args, f"out={tmp_path / 'one'}"]) == 0
    torchrun(2, "-m", ["vlkit", "index", *args, f"out={tmp_path / 'two'}"])
    a, b = VectorIndex.load(tmp_path / "one" / "images"), VectorIndex.load(tmp_path / "two" / "images")
    assert len(a) == len(b) == 48 and np.array_equal(a.ids, b.ids)
    queries = np.random.default_rng(0).standard_normal((4, 64)).astype("float32")
    for x, y in zip(a.search(queries, 10), b.search(queries, 10)):
        assert np.array_equal(x, y)
    assert json.loads((tmp_path / "one/retriever.json").read_text()) == json.loads(
        (tmp_path / "two/retriever.json").read_text())


def test_preloaded_images_equal_the_transform_and_training_is_unchanged(world, tmp_path):
    from vlkit.data.coco import CocoCaptions
    from vlkit_retrieval.data import DecodedImages

    bb = load_backbone("vlkit-tiny-test")
    source = CocoCaptions(world / "images" / "train", world / "annotations" / "captions_train.json")
    decoded = DecodedImages(source, bb.preprocess, progress=False)
    assert decoded.ok and decoded.array.dtype.name == "uint8"
    for k in (0, 7, len(source) - 1):
        assert torch.equal(decoded.tensor(k), bb.preprocess(source.load(k)))
    logs = {}
    for mb in (0, 64):  # preload off / on: the same losses, bit for bit
        plugin, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}", "train.epochs=1",
                                      "train.batch_size=16", "train.progress=false", "train.best_metric=",
                                      f"retrieval.preload_mb={mb}", f"run.dir={tmp_path / str(mb)}"])
        train(cfg, plugin)
        logs[mb] = [json.loads(x)["loss"] for x in (tmp_path / str(mb) / "train_log.jsonl").read_text().splitlines()]
    assert logs[0] == logs[64] and len(logs[0]) == 3


def test_a_folder_of_only_bad_images_is_a_clear_error_and_writes_no_index(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(VlkitError, match="none of the 2 images could be read"):
        Retriever(load_backbone(tiny_dir), num_workers=0, progress=False).add_images(bad)
    code = main(["index", f"images={bad}", f"out={tmp_path / 'idx'}", f"model={tiny_dir}", "workers=0",
                 "progress=false"])
    assert code != 0 and "none of the 2 images" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_resume_mid_epoch_replays_the_caption_draws_exactly(world, tmp_path):
    # the loader looks one batch ahead: a dataset drawing from the global RNG would be one batch off after
    # a resume from the middle of an epoch (constant lr: the schedule does not depend on max_steps)
    base = ["plugin=retrieval", "model=tiny-test", f"data.root={world}", "train.batch_size=8", "train.epochs=3",
            "train.progress=false", "train.best_metric=", "train.checkpoint_every=0", "optim.scheduler=constant",
            "optim.warmup_steps=0", "retrieval.hard_negatives=true"]
    plugin, cfg = resolve_config([*base, "train.max_steps=10", f"run.dir={tmp_path / 'whole'}"])
    train(cfg, plugin)
    plugin, cfg = resolve_config([*base, "train.max_steps=4", f"run.dir={tmp_path / 'cut'}"])
    train(cfg, plugin)  # stops at step 4 of 6 in epoch 0, writing checkpoints/last there
    plugin, cfg = resolve_config([*base, "train.max_steps=10", f"run.dir={tmp_path / 'cut'}", "resume=true"])
    train(cfg, plugin)
    logs = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "train_log.jsonl").read_text().splitlines()]
            for n in ("whole", "cut")}
    assert len(logs["whole"]) == 10 and logs["cut"] == logs["whole"]
    a, b = (load_backbone(tmp_path / n / "backbone") for n in ("whole", "cut"))
    assert a.identity == b.identity


def test_a_damaged_retriever_manifest_is_a_clear_error(world, tiny_dir, tmp_path):
    r = Retriever(load_backbone(tiny_dir), num_workers=0, progress=False)
    r.add_images(world / "images" / "val")
    r.save(tmp_path / "idx")
    manifest = tmp_path / "idx" / "retriever.json"
    text = manifest.read_text()
    for damaged in (text[: len(text) // 2], "{}", "[1, 2]"):
        manifest.write_text(damaged)
        with pytest.raises(VlkitError, match="retriever.json is damaged"):
            Retriever.load(tmp_path / "idx")
