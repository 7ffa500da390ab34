"""Readers: image loading errors, COCO captions/instances, CZSL in the CSP layout, and coco-mini if present."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from vlkit.data.coco import CaptionPairs, CocoCaptions, CocoInstances
from vlkit.data.czsl import CZSLDataset
from vlkit.data.images import ImageLoadError, SkipReport, find_images, load_image
from vlkit.data.shapes import SHAPES, generate_shapes

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2

COCO_MINI = Path(os.environ.get("VLKIT_COCO_MINI", Path(__file__).resolve().parents[2] / "shared/data/coco-mini"))
N_TRAIN = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_shapes(out, n_train=N_TRAIN, n_val=4, n_test=4, image_size=32, n_czsl_per_pair=2, progress=False)
    return out


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, Path]:
    """A 4-image captions set: two good PNGs, one truncated PNG and one text file posing as a PNG."""
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (k * 100, 0, 0)).save(images / f"good{k}.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "full.png")
    data = (images / "full.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "full.png").unlink()
    (images / "notanimage.png").write_text("hello")
    files = ["good0.png", "truncated.png", "good1.png", "notanimage.png"]
    ann = {"images": [{"id": i + 1, "file_name": f, "width": 8, "height": 8} for i, f in enumerate(files)],
           "annotations": [{"id": 10 * (i + 1) + k, "image_id": i + 1, "caption": f"caption {k} of {f}"}
                           for i, f in enumerate(files) for k in range(3)]}
    ann_file = tmp_path / "captions.json"
    ann_file.write_text(json.dumps(ann))
    return images, ann_file


def test_load_image_errors_name_the_file(broken, tmp_path):
    images, _ = broken
    assert load_image(images / "good0.png").mode == "RGB"
    Image.new("L", (4, 4)).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
    for name, why in [("missing.png", "no such file"), ("notanimage.png", "not an image"),
                      ("truncated.png", "truncated or corrupt")]:
        with pytest.raises(ImageLoadError, match=why) as e:
            load_image(images / name)
        assert name in str(e.value) and e.value.path == images / name and isinstance(e.value, ValueError)


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "c.txt", "a/z/0.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a/1.jpg", "a/z/0.jpeg", "b/2.PNG"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_images(tmp_path / "nope")


def test_skip_report_summarises():
    r = SkipReport()
    assert not r and r.summary() == "skipped 0 images"
    for k in range(12):
        r.add(f"/x/{k}.png", "bad")
    assert r.count == len(r) == 12 and r.names[0] == "0.png" and r.summary(2).endswith("and 10 more")


def test_captions_grouped_pairs_and_positives(world):
    ds = CocoCaptions(world / "images" / "train", world / "annotations" / "captions_train.json",
                      transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert len(ds) == N_TRAIN and len(ds.captions) == 5 * N_TRAIN
    item = ds[3]
    assert item["image"].shape == (32, 32, 3) and item["image_id"] == 4 and len(item["captions"]) == 5
    assert [ds.captions[k] for k, i in enumerate(ds.caption_image_index) if i == 3] == item["captions"]
    pos = ds.positives()
    assert pos.shape == (5 * N_TRAIN, N_TRAIN) and (pos.sum(1) == 1).all() and (pos.sum(0) == 5).all()
    pairs = ds.pairs()
    assert isinstance(pairs, CaptionPairs) and len(pairs) == 5 * N_TRAIN
    p = pairs[17]
    assert p["caption"] == ds.captions[17] and p["image_index"] == ds.caption_image_index[17] == 17 // 5
    assert torch.equal(p["image"], ds[p["image_index"]]["image"])


def test_captions_bad_images_raise_or_skip_with_report(broken, caplog):
    images, ann_file = broken
    ds = CocoCaptions(images, ann_file)  # raise mode: files exist, decoding is lazy
    assert len(ds) == 4 and ds[0]["captions"] == [f"caption {k} of good0.png" for k in range(3)]
    with pytest.raises(ImageLoadError, match="truncated.png"):
        ds[1]
    with caplog.at_level(logging.WARNING):
        skip = CocoCaptions(images, ann_file, on_error="skip")
    assert len(skip) == 2 and skip.files == ["good0.png", "good1.png"] and len(skip.captions) == 6
    assert skip.skipped.count == 2 and set(skip.skipped.names) == {"truncated.png", "notanimage.png"}
    assert "skipped 2 images" in caplog.text and "truncated.png" in caplog.text
    (images / "good1.png").unlink()
    with pytest.raises(ImageLoadError, match="good1.png") as e:
        CocoCaptions(images, ann_file)
    assert "1 of 4 images" in str(e.value)
    assert len(CocoCaptions(images, ann_file, on_error="skip")) == 1
    with pytest.raises(ValueError, match="on_error"):
        CocoCaptions(images, ann_file, on_error="ignore")


def test_coco_file_errors_are_clear(broken, tmp_path):
    images, _ = broken
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoCaptions(images, tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"images": [}')
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoCaptions(images, tmp_path / "bad.json")
    (tmp_path / "inst.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match=r"missing top-level keys \['categories'\]"):
        CocoInstances(images, tmp_path / "inst.json")


def test_instances_decode_the_stored_masks(world):
    ds = CocoInstances(world / "images" / "val", world / "annotations" / "instances_val.json")
    raw = json.loads((world / "annotations" / "instances_val.json").read_text())
    assert len(ds) == 4 and [ds.cat_names[c] for c in ds.cat_ids] == list(SHAPES)
    for k in range(len(ds)):
        item = ds[k]
        anns = [a for a in raw["annotations"] if a["image_id"] == item["image_id"]]
        assert item["masks"].shape == (len(anns), 32, 32) and item["masks"].dtype == torch.bool
        for m, a in zip(item["masks"], anns):
            assert np.array_equal(m.numpy(), mask_utils.decode(a["segmentation"]).astype(bool))
        assert item["category_names"] == [SHAPES[a["category_id"] - 1] for a in anns]
        assert item["boxes"].tolist() == [a["bbox"] for a in anns] and not item["iscrowd"].any()


def _czsl_copy(world: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "czsl"
    shutil.copytree(world / "czsl", root)
    meta_file = root / "metadata_compositional-split-natural.t7"
    meta = torch.load(meta_file, weights_only=True)
    torch.save(edit(meta), meta_file)
    return root


def test_czsl_filters_like_the_reference_and_indexes_pairs(world, tmp_path):
    base = CZSLDataset(world / "czsl", "test")
    unseen = next(p for p in base.test_pairs if p not in base.train_pairs)

    def edit(meta):
        extra = dict(meta[0])
        return meta + [{**extra, "set": "NA"}, {**extra, "attr": "NA"},  # unlabeled / unassigned
                       {**extra, "set": "train", "attr": unseen[0], "obj": unseen[1]}]  # pair not in train_pairs
    root = _czsl_copy(world, tmp_path, edit)
    assert [len(CZSLDataset(root, s)) for s in ("train", "val", "test")] == \
           [len(CZSLDataset(world / "czsl", s)) for s in ("train", "val", "test")]
    ds = CZSLDataset(root, "test")
    assert ds.attrs == sorted(ds.attrs) and ds.pairs == sorted(set(ds.train_pairs + ds.val_pairs + ds.test_pairs))
    assert ds.seen_mask.sum() == len(ds.train_pairs)
    item = ds[0]
    assert ds.pairs[item["pair"]] == (ds.attrs[item["attr"]], ds.objs[item["obj"]])
    ow = CZSLDataset(root, "test", open_world=True)
    assert len(ow.pairs) == len(ow.attrs) * len(ow.objs) and len(ow) == len(ds)


def test_czsl_missing_files_say_which_layout(world, tmp_path):
    root = tmp_path / "czsl"
    shutil.copytree(world / "czsl", root)
    (root / "metadata_compositional-split-natural.t7").unlink()
    with pytest.raises(FileNotFoundError, match="metadata_compositional-split-natural.t7") as e:
        CZSLDataset(root, "train")
    assert "_pairs.txt" in str(e.value) and "CSP" in str(e.value)
    with pytest.raises(FileNotFoundError, match="other-split/train_pairs.txt"):
        CZSLDataset(root, "train", split_name="other-split")
    with pytest.raises(ValueError, match="split='dev'"):
        CZSLDataset(root, "dev")


coco_mini = pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"coco-mini not found at {COCO_MINI} "
                               "(set VLKIT_COCO_MINI to its folder to run these tests)")


@coco_mini
def test_coco_mini_captions():
    for split, n in [("train2017", 80), ("val2017", 79)]:
        ds = CocoCaptions(COCO_MINI / split, COCO_MINI / f"annotations/captions_{split}.json")
        assert len(ds) == n and len(ds.captions) == 5 * n and (ds.positives().sum(0) == 5).all()
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].mode == "RGB"


@coco_mini
def test_coco_mini_instances_with_polygons_and_crowd_rle():
    ds = CocoInstances(COCO_MINI / "val2017", COCO_MINI / "annotations/instances_val2017.json")
    assert len(ds) == 79 and len(ds.cat_ids) == 80
    crowd_image = next(a["image_id"] for a in ds.coco.anns.values() if a["iscrowd"])
    poly_image = next(a["image_id"] for a in ds.coco.anns.values() if isinstance(a["segmentation"], list))
    for image_id in (crowd_image, poly_image):
        item = ds[ds.image_ids.index(image_id)]
        w, h = item["image"].size
        assert item["masks"].shape[1:] == (h, w) and len(item["category_names"]) == len(item["masks"])
        assert (item["masks"].flatten(1).sum(1) > 0).all()
        areas = torch.tensor([ds.coco.anns[int(i)]["area"] for i in item["ann_ids"]])
        assert torch.allclose(item["masks"].flatten(1).sum(1).float(), areas.float(), rtol=0.1)
    assert ds[ds.image_ids.index(crowd_image)]["iscrowd"].any()


def test_oversized_images_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from vlkit.data.images import ImageLoadError, load_image

    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    assert load_image(path).size == (300, 200)
    monkeypatch.setenv("VLKIT_MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(ImageLoadError, match="300 x 200 pixels is over the limit of 50,000"):
        load_image(path)
