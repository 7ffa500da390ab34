"""The synthetic shapes world: real COCO/CZSL files, masks equal to the drawn pixels, captions, determinism."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vlkit.data.czsl import CZSLDataset
from vlkit.data.shapes import (
    COLORS,
    CZSL_COLOUR_SPLIT,
    PATTERNS,
    SHAPES,
    czsl_pair_split,
    czsl_scene_for,
    generate_shapes,
    render_background,
    scene_for,
    shape_mask,
)

# pycocotools' decode trips a numpy-2 DeprecationWarning (its __array__ lacks `copy`): not ours, not a bug.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE, SEED = 48, 0
COUNTS = {"train": 40, "val": 10, "test": 10}
PER_PAIR = 2


def _make(out: Path, seed: int = SEED, **kw) -> dict:
    return generate_shapes(out, n_train=COUNTS["train"], n_val=COUNTS["val"], n_test=COUNTS["test"],
                           image_size=SIZE, seed=seed, n_czsl_per_pair=PER_PAIR, progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, _make(out)


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_vocabulary_is_as_documented():
    assert set(COLORS) >= {"red", "green", "blue", "yellow", "purple", "orange", "white", "gray"}
    assert SHAPES == ("circle", "square", "triangle", "star", "cross", "ring")
    assert len(PATTERNS) >= 4 and not set(PATTERNS) & (set(COLORS) | set(SHAPES))


@pytest.mark.parametrize("shape,area", [
    ("circle", math.pi), ("ring", math.pi * (1 - 0.55**2)), ("square", 1.6**2),
    ("triangle", 3 * math.sqrt(3) / 4), ("cross", 2 * 0.6 * 2 - 0.6**2),
    ("star", 10 * 0.5 * 0.5 * math.sin(math.radians(36))),  # ten (centre, tip, notch) triangles
])
def test_shape_masks_have_the_analytic_area(shape, area):
    r = 60.0
    m = shape_mask(shape, 160, 80.0, 80.0, r, angle=0.3)
    assert m.sum() == pytest.approx(area * r * r, rel=0.02)
    assert m[80, 80] == (shape != "ring")  # the ring's hole is empty, every other shape covers its centre


def test_coco_files_load_and_are_consistent(world):
    out, summary = world
    for split, n in COUNTS.items():
        caps = _coco(out / "annotations" / f"captions_{split}.json")
        inst = _coco(out / "annotations" / f"instances_{split}.json")
        assert len(caps.imgs) == len(inst.imgs) == n
        assert all(len(caps.imgToAnns[i]) == 5 for i in caps.imgs)
        assert [c["name"] for c in inst.loadCats(sorted(inst.cats))] == list(SHAPES)
        assert {c["supercategory"] for c in inst.cats.values()} == {"shape"} and sorted(inst.cats) == [1, 2, 3, 4, 5, 6]
        for img_id, img in inst.imgs.items():
            assert (out / "images" / split / img["file_name"]).is_file()
            assert 1 <= len(inst.imgToAnns[img_id]) <= 3
        for a in inst.anns.values():
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
            assert a["color"] in COLORS and a["pattern"] in PATTERNS
            m = inst.annToMask(a)
            ys, xs = np.nonzero(m)
            assert a["area"] == m.sum()
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert summary["splits"][split]["images"] == n


def test_masks_match_the_drawn_pixels(world):
    """Pixels that differ from the scene's background, re-rendered alone from the seed, are exactly the
    union of the RLE masks stored in the JSON; masks are disjoint; each object shows its named colour."""
    out, _ = world
    for split, n in COUNTS.items():
        data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert len(data["images"]) == n
        for img in data["images"]:
            pixels = np.asarray(Image.open(out / "images" / split / img["file_name"]).convert("RGB"))
            background = render_background(scene_for(SEED, split, img["id"] - 1, SIZE))
            anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
            masks = np.stack([mask_utils.decode(a["segmentation"]).astype(bool) for a in anns])
            assert masks.sum(0).max() == 1, f"{split}/{img['file_name']}: overlapping masks"
            assert np.array_equal((pixels != background).any(-1), masks.any(0)), f"{split}/{img['file_name']}"
            for a, m in zip(anns, masks):
                inside = pixels[m].astype(int)
                brightest = inside[inside.sum(1).argmax()]
                nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - brightest).sum())
                assert nearest == a["color"]


WORD = re.compile(r"[a-z]+")
SINGULAR = {"crosses": "cross", **{s + "s": s for s in SHAPES}}
CAPTION_REL = re.compile(r"^an? (\w+) (\w+) (to the left of|to the right of|above|below) an? (\w+) (\w+)")


def test_captions_name_colours_shapes_and_true_relations_but_never_patterns(world):
    out, _ = world
    caps = json.loads((out / "annotations" / "captions_train.json").read_text())
    inst = json.loads((out / "annotations" / "instances_train.json").read_text())
    objs: dict[int, list[tuple[str, str, float, float]]] = {}
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        objs.setdefault(a["image_id"], []).append((a["color"], SHAPES[a["category_id"] - 1], x + w / 2, y + h / 2))
    checked = 0
    for c in caps["annotations"]:
        words = set(WORD.findall(c["caption"]))
        assert not words & set(PATTERNS), c["caption"]
        here = objs[c["image_id"]]
        named = {SINGULAR.get(w, w) for w in words} & set(SHAPES)
        assert named and named <= {shp for _, shp, *_ in here}, c["caption"]
        assert words & set(COLORS) <= {col for col, *_ in here}, c["caption"]
        m = CAPTION_REL.match(c["caption"])
        if m:  # "a red circle to the left of a blue star": some matching pair of objects is placed so
            c1, s1, rel, c2, s2 = m.groups()
            holds = {"to the left of": lambda a, b: a[2] < b[2], "to the right of": lambda a, b: a[2] > b[2],
                     "above": lambda a, b: a[3] < b[3], "below": lambda a, b: a[3] > b[3]}[rel]
            assert any(holds(a, b) for a in here for b in here if a is not b and a[:2] == (c1, s1)
                       and b[:2] == (c2, s2)), c["caption"]
            checked += 1
    assert checked > 0
    per_image = {}
    for c in caps["annotations"]:
        per_image.setdefault(c["image_id"], []).append(c["caption"])
    assert all(len(set(v)) == 5 for v in per_image.values())
    assert len({c["id"] for c in caps["annotations"]}) == len(caps["annotations"])


def test_czsl_split_has_unseen_pairs_and_loads(world):
    out, summary = world
    root = out / "czsl"
    sets = {s: CZSLDataset(root, s) for s in ("train", "val", "test")}
    train = set(sets["train"].train_pairs)
    unseen_val = set(sets["val"].val_pairs) - train
    unseen_test = set(sets["test"].test_pairs) - train
    assert unseen_val and unseen_test and not unseen_val & unseen_test
    assert set(sets["val"].val_pairs) & train and set(sets["test"].test_pairs) & train  # seen pairs too
    assert {a for a, _ in train} == set(PATTERNS) and {o for _, o in train} == set(SHAPES)
    for s, ds in sets.items():
        assert len(ds) == PER_PAIR * len(ds.split_pairs) == summary["czsl_images"][s]
        item = ds[0]
        assert item["image"].size == (SIZE, SIZE) and ds.pairs[item["pair"]] == (ds.attrs[item["attr"]],
                                                                                  ds.objs[item["obj"]])
    meta = torch.load(root / "metadata_compositional-split-natural.t7", weights_only=True)
    assert len(meta) == sum(summary["czsl_images"].values())
    for i, m in enumerate(meta):  # one object per image, of the pair's pattern and shape, and nothing else
        assert m["image"].startswith(f"{m['attr']}_{m['obj']}/")
        scene = czsl_scene_for(SEED, i, SIZE, m["attr"], m["obj"])
        pixels = np.asarray(Image.open(root / "images" / m["image"]).convert("RGB"))
        assert [(o.pattern, o.shape) for o in scene.objects] == [(m["attr"], m["obj"])]
        assert np.array_equal((pixels != render_background(scene)).any(-1), scene.objects[0].mask)


@pytest.mark.parametrize("seed", range(6))
def test_colour_split_composes_known_words_and_keeps_open_world_pairs_apart(seed):
    """CSP's premise: each unseen pair's colour and shape occur in several training pairs; no unseen pair is
    trained on; 16 pairs exist only in the open world (48 candidates against 32 in the closed world)."""
    split = czsl_pair_split(seed, CZSL_COLOUR_SPLIT)
    train = set(split["train"])
    unseen = set(split["unseen_val"]) | set(split["unseen_test"])
    assert len(split["unseen_val"]) == len(split["unseen_test"]) == 6 and not unseen & train
    assert not set(split["unseen_val"]) & set(split["unseen_test"])
    for a, o in unseen:
        assert sum(p[0] == a for p in train) >= 2 and sum(p[1] == o for p in train) >= 3
    closed = train | set(split["val"]) | set(split["test"])
    assert len(closed) == 32 and not closed & set(split["open_only"])
    assert closed | set(split["open_only"]) == {(c, s) for c in COLORS for s in SHAPES}
    assert set(split["val"]) - unseen <= train and set(split["test"]) - unseen <= train


def test_colour_czsl_images_show_the_pair_colour_and_shape(world):
    out, summary = world
    root = out / "czsl"
    sets = {s: CZSLDataset(root, s, split_name=CZSL_COLOUR_SPLIT) for s in ("train", "val", "test")}
    unseen = set(sets["test"].test_pairs) - set(sets["train"].train_pairs)
    assert unseen and not {ds.pairs[ds[i]["pair"]] for ds in [sets["train"]] for i in range(len(ds))} & unseen
    assert set(sets["train"].attrs) <= set(COLORS)
    meta = torch.load(root / f"metadata_{CZSL_COLOUR_SPLIT}.t7", weights_only=True)
    assert len(meta) == sum(summary["czsl_splits"][CZSL_COLOUR_SPLIT]["images"].values())
    for i, m in enumerate(meta[::7]):
        scene = czsl_scene_for(SEED, 7 * i, SIZE, m["attr"], m["obj"], family="color")
        pixels = np.asarray(Image.open(root / "images" / m["image"]).convert("RGB"))
        (obj,) = scene.objects
        assert (obj.color, obj.shape) == (m["attr"], m["obj"]) and obj.pattern in PATTERNS
        assert np.array_equal((pixels != render_background(scene)).any(-1), obj.mask)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    out, _ = world
    again = _make(tmp_path / "again")
    assert _hashes(out) == _hashes(Path(again["root"]))
    other = _hashes(Path(_make(tmp_path / "other", seed=1)["root"]))
    ref = _hashes(out)
    assert other.keys() & ref.keys()
    changed = [k for k in other.keys() & ref.keys() if other[k] != ref[k]]
    assert any(k.startswith("images/") for k in changed) and "annotations/captions_train.json" in changed


def test_worker_processes_give_the_same_bytes(tmp_path):
    kw = dict(n_train=6, n_val=2, n_test=2, image_size=32, n_czsl_per_pair=1, progress=False)
    one = generate_shapes(tmp_path / "one", workers=1, **kw)
    two = generate_shapes(tmp_path / "two", workers=2, **kw)
    assert _hashes(Path(one["root"])) == _hashes(Path(two["root"]))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    kw = dict(n_train=3, n_val=1, n_test=1, image_size=32, n_czsl_per_pair=1, progress=False)
    generate_shapes(tmp_path, **kw)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_shapes(tmp_path, **kw)
    summary = generate_shapes(tmp_path, overwrite=True, **{**kw, "n_train": 2})
    assert len(list((tmp_path / "images" / "train").iterdir())) == summary["images"]["train"] == 2


def test_true_captions_hold_every_written_caption_and_hard_negatives_are_false():
    from vlkit.data.shapes import SceneObject, captions_for, false_caption, scene_objects, true_captions

    for index in range(60):
        scene = scene_for(SEED, "train", index, 64)
        truths = true_captions(scene.objects, 64)
        written = captions_for(scene, np.random.default_rng([SEED, 0, index, 1]))
        assert set(written) <= truths
        rng = np.random.default_rng(index)
        for _ in range(5):
            neg = false_caption(scene.objects, 64, rng)
            assert neg is not None and neg not in truths
    # the instance records of a world carry what true_captions needs, and give the same truths
    a = SceneObject("circle", "red", 10.0, 10.0)
    b = SceneObject("star", "blue", 50.0, 12.0)
    assert "a red circle to the left of a blue star" in true_captions([a, b], 64)
    assert "a blue star to the right of a red circle" in true_captions([a, b], 64)
    assert "a red circle to the right of a blue star" not in true_captions([a, b], 64)
    records = [{"category_id": SHAPES.index("circle") + 1, "color": "red", "center": [10.0, 10.0]}]
    assert scene_objects(records) == [a]
    assert scene_objects([{"category_id": 1}]) is None  # COCO records: no scene


def test_instances_record_each_object_centre(world):
    from vlkit.data.shapes import scene_objects, true_captions

    root = world[0]
    caps = json.loads((root / "annotations" / "captions_train.json").read_text())["annotations"]
    insts = json.loads((root / "annotations" / "instances_train.json").read_text())["annotations"]
    for image_id in range(1, COUNTS["train"] + 1):
        objs = scene_objects([a for a in insts if a["image_id"] == image_id])
        truths = true_captions(objs, SIZE)
        assert all(c["caption"] in truths for c in caps if c["image_id"] == image_id)
