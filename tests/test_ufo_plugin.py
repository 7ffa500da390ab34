"""The ufo plugin end to end: config, data (crowd, COCO), training, COCO evaluation, segment() and demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from vlkit.cli import resolve_config
from vlkit.config import ConfigError
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import build, evaluate, train
from vlkit.plugins import get_plugin


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny shapes world at the tiny-test model's input size (32 px)."""
    root = tmp_path_factory.mktemp("ufo-world")
    generate_shapes(root, n_train=48, n_val=12, n_test=12, image_size=32, seed=0, n_czsl_per_pair=1,
                    progress=False, workers=1)
    return root


def _coco_like(src: Path, dst: Path, height: int) -> Path:
    """The world cropped to non-square 32x``height`` images (masks cropped alike, RLE re-encoded), with
    the first annotation of every split turned into a crowd region."""
    (dst / "annotations").mkdir(parents=True)
    for split in ("train", "val", "test"):
        data = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        (dst / "images" / split).mkdir(parents=True)
        for im in data["images"]:
            Image.open(src / "images" / split / im["file_name"]).crop((0, 0, im["width"], height)).save(
                dst / "images" / split / im["file_name"])
            im["height"] = height
        anns = []
        for a in data["annotations"]:
            m = mask_utils.decode(a["segmentation"])[:height]
            if m.any():
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode()
                anns.append({**a, "segmentation": rle, "area": int(m.sum()),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        anns[0]["iscrowd"] = 1
        data["annotations"] = anns
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def crowd_world(world, tmp_path_factory) -> Path:
    return _coco_like(world, tmp_path_factory.mktemp("ufo-crowd") / "w", height=24)


def _base(root: Path, *extra: str) -> list[str]:
    return ["plugin=ufo", "model=tiny-test", f"data.root={root}", "data.image_size=32", "train.progress=false",
            "train.batch_size=8", "train.eval_batch_size=12", *extra]


def _build(root: Path, *extra: str):
    plugin, cfg = resolve_config(_base(root, *extra))
    return build(cfg, plugin)


def test_plugin_loads_by_name_and_composes_its_config():
    plugin = get_plugin("ufo")
    assert plugin.name == "ufo" and plugin.segment is not None and plugin.demo_tab.key == "ufo"
    _, cfg = resolve_config(["plugin=ufo"])
    assert cfg.model.name == "cached:vlkit-tiny-shapes" and cfg.ufo.method == "head"
    assert cfg.train.best_metric == "segm/AP"
    # model=... and experiments still choose the backbone (the plugin selects a model option, not a name)
    _, cfg = resolve_config(["plugin=ufo", "model=tiny-test", "ufo.top_k=5", "ufo.dense_mode=clearclip"])
    assert cfg.model.name == "vlkit-tiny-test" and cfg.ufo.top_k == 5 and cfg.ufo.dense_mode == "clearclip"
    _, cfg = resolve_config(["plugin=ufo", "experiment=smoke"])
    assert cfg.model.name == "vlkit-tiny-test"
    with pytest.raises(ConfigError, match="ufo.num_slot"):
        resolve_config(["plugin=ufo", "ufo.num_slot=3"])


def test_bad_choice_fails_before_any_work_naming_the_key(world):
    with pytest.raises(ConfigError, match=r"ufo\.method='segformer'.*head, training_free"):
        _build(world, "ufo.method=segformer")


def test_training_items_hold_every_query_of_an_image_with_its_masks(world):
    _, data, _ = _build(world)
    vocab = data.info["vocab"]
    assert vocab.texts[:6] == ["circle", "square", "triangle", "star", "cross", "ring"]
    assert any(" " in t for t in vocab.texts[6:])  # 'red circle'-style phrases from the 'color' key
    coco = data.info["coco"]["train"]
    for index in range(6):
        item = data.train[index]
        queries = item["queries"].tolist()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(item["image_id"])]))
        present = {vocab.category_index(a["category_id"]) for a in anns}
        # every category name is asked (5 absent <= negatives_per_image), each once
        assert sorted(q for q in queries if q < 6) == list(range(6)) and len(set(queries)) == len(queries)
        assert item["image"].shape == (3, 32, 32) and item["masks"].shape == (len(anns), 32, 32)
        # mask m answers query q exactly when q is its category or its colour phrase
        for m, a in enumerate(sorted(anns, key=lambda a: a["id"])):
            answered = {vocab.texts[queries[j]] for j in item["mask_query"][m].nonzero().flatten().tolist()}
            name = vocab.texts[vocab.category_index(a["category_id"])]
            assert answered == {name, f"{a['color']} {name}"}
        # one wrong-colour phrase of a present category: a query no mask answers
        phrases = [q for q in queries if q >= 6]
        unanswered = [q for j, q in enumerate(queries) if not item["mask_query"][:, j].any()]
        assert len([q for q in phrases if q in unanswered]) == 1
        assert {vocab.category_index(a["category_id"]) for a in anns} == present
    batch = data.collate([data.train[i] for i in range(6)])
    n_q = max(len(data.train[i]["queries"]) for i in range(6))
    assert batch["queries"].shape == (6, n_q) and batch["mask_query"].shape[2] == n_q
    assert (batch["queries"] == -1).any() or all(len(data.train[i]["queries"]) == n_q for i in range(6))


def test_a_few_training_steps_lower_the_loss(world):
    torch.manual_seed(0)
    _, data, task = _build(world)
    batch = data.collate([data.train[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    task.train()
    losses = []
    for _ in range(8):
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses
    assert not any(p.requires_grad for p in task.backbone.parameters())  # frozen by default


@pytest.mark.parametrize("mode", ["maskclip", "plain"])
def test_unfrozen_image_tower_gets_a_gradient_in_every_trainable_tensor(world, mode):
    _, data, task = _build(world, "ufo.freeze_backbone=false", f"ufo.dense_mode={mode}")
    task.train()
    task(data.collate([data.train[i] for i in range(4)]))["loss"].backward()
    trainable = {n: p for n, p in task.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.model.visual.") for n in trainable)
    assert not any(n.startswith("backbone.model.transformer.") for n in trainable)  # the text tower
    assert [n for n, p in trainable.items() if p.grad is None] == []  # DDP needs every one used


def _ground_truth_predictor(task):
    """Replaces the model: every category's non-crowd gt instances of the batch, score 1."""
    from vlkit_ufo.task import pack_masks, semantic_gt

    def predict(batch):
        masks, cats, crowd, n = batch["masks"], batch["mask_cat"], batch["iscrowd"], batch["num_masks"]
        q, k, e = task.num_classes, task.cfg.top_k, masks.shape[-1]
        out, scores = torch.zeros(len(n), q, k, e, e, dtype=torch.bool), torch.zeros(len(n), q, k)
        for b in range(len(n)):
            used = [0] * q
            for j in range(int(n[b])):
                c = int(cats[b, j])
                if not crowd[b, j]:
                    out[b, c, used[c]], scores[b, c, used[c]], used[c] = masks[b, j], 1.0, used[c] + 1
        labels = semantic_gt(masks, cats, crowd, q, task.ignore_index)
        return pack_masks(out), scores, torch.where(labels == task.ignore_index, q, labels)

    return predict


def _evaluate_split(task, data, split="test"):
    task.eval()
    ds = getattr(data, split)
    outs = [task.eval_step(data.collate([ds[i] for i in range(s, min(s + 8, len(ds)))]))
            for s in range(0, len(ds), 8)]
    return task.compute_metrics({k: torch.cat([o[k] for o in outs]) for k in outs[0]}, split)


@pytest.mark.parametrize("which", ["square", "non-square with crowd"])
def test_ground_truth_predictions_score_ap_one(world, crowd_world, which):
    """Proves the eval path: packing, gathering layout, resizing to the original (non-square) size,
    COCO encoding and crowd handling; transposed masks are the control that the check has teeth."""
    from vlkit_ufo.task import pack_masks, unpack_masks

    _, data, task = _build(world if which == "square" else crowd_world)
    task.predict_batch = _ground_truth_predictor(task)
    m = _evaluate_split(task, data)
    assert m["segm/AP"] == pytest.approx(1.0) and m["bbox/AP"] == pytest.approx(1.0)
    assert m["mIoU"] == pytest.approx(1.0)
    gt = task.predict_batch

    def transposed(batch):
        packed, scores, labels = gt(batch)
        return pack_masks(unpack_masks(packed, task.eval_mask_size).transpose(-1, -2)), scores, labels

    task.predict_batch = transposed
    assert _evaluate_split(task, data)["segm/AP"] < 0.2


def test_crowd_regions_are_ignored_not_targets(crowd_world):
    _, data, task = _build(crowd_world)
    coco = data.info["coco"]["train"]
    crowd = next(a for a in coco.anns.values() if a["iscrowd"])
    index = coco.getImgIds().index(crowd["image_id"])  # the shapes world lists images in id order
    sample = data.train[index]
    assert int(sample["image_id"]) == crowd["image_id"]
    vocab = data.info["vocab"]
    name = vocab.texts[vocab.category_index(crowd["category_id"])]
    j = [vocab.category_of(q) for q in sample["queries"].tolist()].index(name)
    assert sample["ignore"][j].any() and sample["ignore"].shape[1:] == (32, 32)
    # a crowd region is never a target mask, and ignores only the queries about its category
    assert len(sample["masks"]) == len(coco.getAnnIds(imgIds=[crowd["image_id"]], iscrowd=False))
    others = [k for k, q in enumerate(sample["queries"].tolist()) if vocab.category_of(q) != name]
    assert not sample["ignore"][others].any()
    # anchors whose centre lies in the ignore region get no objectness gradient for that query; others do
    held = {}
    objectness = task.decoder.objectness

    def keep_logits(*args, **kwargs):
        out = objectness(*args, **kwargs)
        out.retain_grad()
        held["obj"] = out
        return out

    task.decoder.objectness = keep_logits
    task.train()
    task(data.collate([sample]))["loss"].backward()
    grad = held["obj"].grad[0, j].abs()  # [anchors]
    from vlkit_ufo.anchored import anchor_centres

    h = int(len(grad) ** 0.5)
    xy = (anchor_centres(h, h) * 32).long()
    inside = sample["ignore"][j][xy[:, 1], xy[:, 0]]
    assert inside.any() and (~inside).any()
    assert float(grad[inside].sum()) == 0.0 and bool((grad[~inside] > 0).all())


@pytest.fixture(scope="module")
def trained_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("ufo-run") / "run"
    plugin, cfg = resolve_config(_base(world, f"run.dir={run}", "train.max_steps=4", "optim.warmup_steps=2",
                                       "train.checkpoint_every=0"))
    return run, train(cfg, plugin)


def _check_metrics(m):
    for key in ("segm/AP", "segm/AP50", "bbox/AP", "bbox/AR100"):
        assert 0.0 <= m[key] <= 1.0, key
    assert 0.0 <= m["mIoU"] <= 1.0 and m["images"] == 12


def test_vlkit_train_and_eval_run_end_to_end(world, trained_run):
    run, metrics = trained_run
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "checkpoints/last/task.safetensors"):
        assert (run / name).exists(), name
    _check_metrics(metrics["val"])
    _check_metrics(metrics["test"])
    plugin, cfg = resolve_config(_base(world, f"checkpoint={run}", "split=test", "ufo.method=training_free"),
                                 name="eval")
    _check_metrics(evaluate(cfg, plugin)["test"])


def test_segment_returns_masks_at_the_original_size(world):
    from vlkit.backbone import load_backbone
    from vlkit_ufo import segment
    from vlkit_ufo.config import UfoConfig
    from vlkit_ufo.head import masks_to_boxes
    from vlkit_ufo.segment import build_decoder

    torch.manual_seed(0)
    bb = load_backbone("vlkit-tiny-test")
    image = Image.open(next((world / "images" / "test").glob("*.png"))).resize((50, 37))
    found = segment(image, "red circle", bb, build_decoder(UfoConfig(), bb.embed_dim), threshold=0.0)
    assert found and all(i.mask.shape == (37, 50) and i.mask.dtype == bool for i in found)
    assert [i.score for i in found] == sorted((i.score for i in found), reverse=True)
    for inst in found:
        box = masks_to_boxes(torch.from_numpy(inst.mask)[None])[0][0].tolist()
        assert list(inst.box) == box
    # training-free: with every pixel foreground, the one component is the whole original image
    path = world / "images" / "test" / "000001.png"
    whole = segment(path, "circle", bb, None, threshold=0.0, mask_threshold=0.0)
    assert len(whole) == 1 and whole[0].mask.shape == (32, 32) and whole[0].mask.all()
    assert whole[0].box == (0.0, 0.0, 32.0, 32.0)


def test_segmenter_loads_a_run_and_demo_writes_the_overlay(world, trained_run, tmp_path):
    from vlkit_ufo import Segmenter
    from vlkit_ufo.segment import segment_to_file

    run, _ = trained_run
    seg = Segmenter.from_run(run)
    assert seg.head is not None and not seg.head.training
    image = world / "images" / "test" / "000002.png"
    found = seg(image, "circle", threshold=0.0)
    assert all(i.mask.shape == (32, 32) for i in found)
    out = tmp_path / "overlay.png"
    assert len(segment_to_file(str(image), "circle", str(run / "checkpoints" / "last"), str(out), threshold=0.0)) == len(found)
    drawn = Image.open(out)
    assert drawn.size == (256, 256)  # 32 px upscaled 8x so the labels are legible


def test_overlay_tints_masks_and_draws_boxes():
    from vlkit_ufo.overlay import overlay
    from vlkit_ufo.segment import Instance

    image = Image.new("RGB", (40, 30), (0, 0, 0))
    mask = np.zeros((30, 40), bool)
    mask[10:20, 5:25] = True
    out = np.asarray(overlay(image, [Instance(mask, (5.0, 10.0, 25.0, 20.0), 0.9, "box")], min_side=30))
    assert out.shape == (30, 40, 3)
    assert out[15, 15].sum() > 0 and out[0, 39].sum() == 0  # inside tinted, far corner untouched
    with pytest.raises(ValueError, match="does not match the image"):
        overlay(image, [Instance(mask[:10], (0.0, 0.0, 1.0, 1.0), 0.5)])


def test_coco_mini_loads_through_the_plugin_data_path(coco_mini):
    plugin, cfg = resolve_config(["plugin=ufo", "model=tiny-test", "data=coco-mini", f"data.root={coco_mini}",
                                  "ufo.negatives_per_image=1"])
    from vlkit.backbone import load_backbone

    data = plugin.build_data(cfg, load_backbone("vlkit-tiny-test"))
    vocab = data.info["vocab"]
    assert len(vocab.categories) == 80 and not vocab.phrases  # COCO has no 'color' key
    assert data.val is data.test or len(data.val) == len(data.test) == 79
    for index in range(3):
        item = data.train[index]
        assert all(vocab.texts[q] in {n for _, n in vocab.categories} for q in item["queries"].tolist())
        assert item["image"].shape == (3, 32, 32) and item["mask_query"].shape == (len(item["masks"]), len(item["queries"]))
        assert item["mask_query"].any(1).all()  # every mask answers a query: the categories present are asked
    crowd_seen = any(bool(data.val[i]["iscrowd"].any()) for i in range(len(data.val)))
    assert crowd_seen  # coco-mini's val split holds 5 crowd regions


def test_lora_adapters_train_on_the_image_tower_and_merge_for_inference(world, tmp_path):
    from vlkit.engine.checkpoint import find_checkpoint, load_checkpoint
    from vlkit_ufo import Segmenter

    _, data, task = _build(world, "ufo.lora_rank=4")
    task.train()
    task(data.collate([data.train[i] for i in range(4)]))["loss"].backward()
    trainable = {n: p for n, p in task.named_parameters() if p.requires_grad}
    adapters = [n for n in trainable if n.startswith("backbone.")]
    assert adapters and all("lora_" in n and ".visual." in n for n in adapters)
    assert not any(".resblocks.1.mlp." in n for n in adapters)  # the last block's MLP: never run by maskclip
    assert [n for n, p in trainable.items() if p.grad is None] == []  # DDP needs every one used
    with pytest.raises(ConfigError, match="choose one"):
        _build(world, "ufo.lora_rank=4", "ufo.freeze_backbone=false")

    run = tmp_path / "lora-run"
    plugin, cfg = resolve_config(_base(world, f"run.dir={run}", "train.max_steps=2", "optim.warmup_steps=1",
                                       "train.checkpoint_every=0", "ufo.lora_rank=4", "optim.lr=1e-2"))
    train(cfg, plugin)
    seg = Segmenter.from_run(run, prefer="last")
    assert not any("lora" in n for n, _ in seg.backbone.named_parameters())  # merged: plain weights
    _, _, fresh = _build(world, "ufo.lora_rank=4")
    plain = fresh.backbone.dense_features(data.collate([data.test[0]])["image"]).detach()
    load_checkpoint(find_checkpoint(run, "last"), fresh, None, "ufo", "vlkit-tiny-test")
    fresh.eval()
    image = data.collate([data.test[0]])["image"]
    with torch.no_grad():
        tuned, merged = fresh.features(image), seg.backbone.dense_features(image)
    assert not torch.allclose(tuned, plain)  # the adapters learned something
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-5)


def test_a_shipped_head_round_trips_and_refuses_tampering_and_other_backbones(world, trained_run, tmp_path):
    from vlkit.backbone import load_backbone
    from vlkit.errors import VlkitError
    from vlkit.io import IntegrityError
    from vlkit_ufo import Segmenter
    from vlkit_ufo.shipped import HEAD_META, HEAD_WEIGHTS, ship, shipped_head

    run, _ = trained_run
    root = tmp_path / "weights"
    meta = ship(run, "t", root=root, command="vlkit train plugin=ufo (test)")
    assert meta["files"][HEAD_WEIGHTS] and meta["backbone_identity"].startswith("vlkit-tiny-test:")
    assert shipped_head("t", root)[0]["command"] == "vlkit train plugin=ufo (test)"
    assert meta["checkpoint"] == "best (step 4)"  # the checkpoint's own step (the run stopped at max_steps=4)
    image = world / "images" / "test" / "000003.png"
    from_run, shipped = Segmenter.from_run(run), Segmenter.shipped("t", root=root)
    a, b = from_run(image, "circle", threshold=0.0), shipped(image, "circle", threshold=0.0)
    assert [i.score for i in a] == [i.score for i in b] and all((x.mask == y.mask).all() for x, y in zip(a, b))
    # the very backbone object may be passed in; another model is refused with the reason
    assert Segmenter.shipped("t", root=root, backbone=from_run.backbone).backbone is from_run.backbone
    torch.manual_seed(1)
    with pytest.raises(VlkitError, match="trained on backbone"):
        Segmenter.shipped("t", root=root, backbone=load_backbone("vlkit-tiny-test"))
    with pytest.raises(VlkitError, match="no shipped ufo head 'nope'; shipped: t"):
        shipped_head("nope", root)
    weights = root / "t" / HEAD_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="sha256"):
        shipped_head("t", root)
    (root / "t" / HEAD_META).write_text((root / "t" / HEAD_META).read_text().replace('"version": 1', '"version": 2'))
    with pytest.raises(IntegrityError, match="checksum"):
        shipped_head("t", root)
