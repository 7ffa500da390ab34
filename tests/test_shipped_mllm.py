"""The tiny MLLM shipped inside vlkit: its hash holds, and its captions name what an unseen scene holds."""

from __future__ import annotations

import json

import pytest
import torch
from vlkit_caption.task import caption_metrics

from vlkit.backbone import load_backbone
from vlkit.backbone.shipped import WEIGHTS_DIR, manifest, sha256_of
from vlkit.cache import provide_backbone
from vlkit.data.images import load_image
from vlkit.data.shapes import SHAPES, generate_shapes

NAME = "vlkit-tiny-llava-shapes"


@pytest.fixture(scope="module")
def shipped():
    backbone = load_backbone(provide_backbone(NAME))
    backbone.eval()
    return backbone


def test_shipped_mllm_matches_its_recorded_hash():
    record = manifest()[NAME]
    assert sha256_of(WEIGHTS_DIR / NAME / "model.safetensors") == record["sha256"]
    assert record["command"].startswith("vlkit train plugin=caption")
    assert load_backbone(WEIGHTS_DIR / NAME).identity == record["identity"]


def test_captions_of_an_unseen_world_name_its_colours_and_shapes(shipped, tmp_path):
    # a world generated here with another seed: none of these images was seen in training. Measured when
    # shipped on these 64 images: the colour F1 of the greedy captions is far above the floor of naming the
    # commonest pair everywhere, as on the test split (README, "The tiny MLLM").
    generate_shapes(tmp_path, n_train=0, n_val=0, n_test=64, image_size=64, seed=12345, n_czsl_per_pair=0,
                    progress=False, workers=1)
    data = json.loads((tmp_path / "annotations" / "instances_test.json").read_text())
    objects: dict[int, list[tuple[str, str]]] = {}
    for a in data["annotations"]:
        objects.setdefault(a["image_id"], []).append((a["color"], SHAPES[a["category_id"] - 1]))
    images = data["images"]
    batch = torch.stack([shipped.preprocess(load_image(tmp_path / "images" / "test" / im["file_name"]))
                         for im in images])
    captions = shipped.generate_captions(batch, max_new_tokens=40)
    m = caption_metrics(captions, [objects[im["id"]] for im in images], [frozenset() for _ in images])
    assert m["color_f1"] > 80 and m["shape_f1"] > 40 and m["pair_f1"] > 4 * m["pair_f1_floor"]
