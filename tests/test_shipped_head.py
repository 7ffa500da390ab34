"""The ufo head shipped inside vlkit: its hash holds, it fits the shipped backbone, and it has really learned
the shapes world (COCOeval on a world generated here with another seed, so no image was seen in training)."""

from __future__ import annotations

import numpy as np
import pytest

from vlkit.data.shapes import generate_shapes
from vlkit.metrics.coco_eval import coco_evaluate, instances_to_coco_results
from vlkit_ufo import Segmenter, segment
from vlkit_ufo.shipped import DEFAULT_HEAD, HEAD_WEIGHTS, WEIGHTS_DIR, shipped_head


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory):
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("unseen-ufo")
    generate_shapes(root, n_train=0, n_val=0, n_test=150, image_size=64, seed=4242, n_czsl_per_pair=0,
                    progress=False, workers=1)
    return root, COCO(str(root / "annotations" / "instances_test.json"))


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter.shipped()


def _coco_ap(coco, find) -> dict[str, float]:
    """Every category asked in every image (the COCO protocol), scored by COCOeval."""
    results = []
    for image_id in coco.getImgIds():
        path = coco.imgs[image_id]["path"]
        for cat in coco.loadCats(coco.getCatIds()):
            found = find(path, cat["name"])
            if found:
                masks = np.stack([f.mask for f in found])
                results += instances_to_coco_results(image_id, masks, [f.score for f in found], cat["id"])
    return coco_evaluate(coco, results, ["segm"])


def test_shipped_head_matches_its_record():
    meta, weights = shipped_head()
    assert weights == WEIGHTS_DIR / DEFAULT_HEAD / HEAD_WEIGHTS and meta["bytes"] <= 20 * 2**20
    assert meta["model"]["name"] == "cached:vlkit-tiny-shapes"
    assert meta["command"].startswith("vlkit train plugin=ufo")
    assert meta["metrics"]["test"]["segm/AP"] >= 0.30 and meta["metrics"]["test"]["segm/AP50"] >= 0.60


def test_shipped_head_segments_an_unseen_world_far_above_the_training_free_baseline(segmenter, fresh_world):
    # measured when shipped (150 unseen images, 6 queries each): head segm AP 0.763, AP50 0.971;
    # training-free 0.001 / 0.005. The bounds leave room for another machine's float arithmetic.
    root, coco = fresh_world
    for info in coco.imgs.values():
        info["path"] = root / "images" / "test" / info["file_name"]
    head = _coco_ap(coco, lambda path, q: segmenter(path, q, threshold=0.05))
    free = _coco_ap(coco, lambda path, q: segment(path, q, segmenter.backbone, None, threshold=0.05))
    assert head["segm/AP"] >= 0.65, head
    assert head["segm/AP50"] >= 0.90, head
    assert head["segm/AP"] >= 5 * max(free["segm/AP"], 0.01), (head, free)


def test_segment_without_a_backbone_uses_the_shipped_head(segmenter, fresh_world):
    root, coco = fresh_world
    singles = [i for i in coco.getImgIds() if len(coco.getAnnIds(imgIds=[i])) == 1][:10]
    good = 0
    for image_id in singles:
        ann = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))[0]
        path = root / "images" / "test" / coco.imgs[image_id]["file_name"]
        name = coco.loadCats([ann["category_id"]])[0]["name"]
        found = segment(path, name)
        assert [f.score for f in found] == [f.score for f in segmenter(path, name)]
        if found:
            gt = coco.annToMask(ann).astype(bool)
            good += (found[0].mask & gt).sum() / (found[0].mask | gt).sum() >= 0.5
    assert good >= 8, f"the best instance covers the one object (IoU >= 0.5) in {good} of {len(singles)} images"


def test_the_demo_uses_the_shipped_head_only_on_its_own_backbone(segmenter):
    from vlkit.backbone import load_backbone
    from vlkit_ufo.demo_tab import SEGMENTATION

    chosen = SEGMENTATION.load(segmenter.backbone, "")
    assert chosen.mode == "trained ufo head" and chosen.backbone is segmenter.backbone
    assert chosen.threshold == round(segmenter.threshold, 2)
    other = load_backbone("vlkit-tiny-conv")  # the same architecture with other (random) weights
    fallback = SEGMENTATION.load(other, "")  # the tab falls back to the training-free baseline
    assert fallback.backbone is other and fallback.mode.startswith("training-free")
