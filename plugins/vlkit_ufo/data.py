"""COCO instances as ufo data: (image, query, that query's masks) training items and per-image eval items.

Geometry: images and masks are both resized to the model's square input with a plain resize (no crop,
the aspect ratio is not kept). A centre crop would cut instances off, and predictions must cover the
whole original image for COCO evaluation; a plain resize maps every pixel both ways, so masks predicted
at the input size resize back onto the original image exactly as the image was shrunk. The shapes
world's images are already square, so for them this is at most a uniform scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import Normalize

from vlkit.data.coco import CocoInstances
from vlkit.data.images import ImageLoadError, load_image
from vlkit.errors import VlkitError
from vlkit.plugins import DataBundle, settings


class UfoDataError(VlkitError, ValueError):
    """The data cannot serve the ufo plugin (no instance masks, an unknown split layout)."""


# ---- geometry ------------------------------------------------------------------------------------
class ImageTransform:
    """PIL image -> normalised [3, S, S] by a plain bicubic resize (see the module docstring)."""

    def __init__(self, size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD) -> None:
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    @classmethod
    def for_backbone(cls, backbone: Any) -> ImageTransform:
        """The backbone's input size and its own normalisation (read from its eval transform)."""
        norm = next((t for t in getattr(backbone.preprocess, "transforms", []) if isinstance(t, Normalize)), None)
        if norm is None:
            return cls(backbone.image_size)
        return cls(backbone.image_size, norm.mean, norm.std)

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (x - mean) / std


def resize_masks(masks: np.ndarray | Tensor, size: int, any_cover: bool = False) -> Tensor:
    """Bool masks [M, H, W] -> [M, size, size]: antialiased bilinear on the 0/1 map with pixel centres
    aligned (the geometry of the image's resize and of ``task.resize_binary``, so a mask survives the
    trip to the model size and back), then >= 0.5; with ``any_cover``, > 0 (ignore regions should
    rather grow than shrink)."""
    m = torch.as_tensor(np.asarray(masks)).bool()
    if m.dim() != 3:
        raise ValueError(f"resize_masks expects [M, H, W], got {tuple(m.shape)}")
    if tuple(m.shape[-2:]) == (size, size):
        return m.clone()
    if m.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    cover = F.interpolate(m[:, None].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[:, 0]
    return cover > 1e-3 if any_cover else cover >= 0.5


# ---- queries --------------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Every query text the plugin knows: category names (sorted by category id), then colour phrases
    (``phrases`` maps each phrase to the category name it refines)."""

    categories: list[tuple[int, str]]
    phrases: dict[str, str] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [name for _, name in self.categories] + list(self.phrases)

    @property
    def cat_ids(self) -> list[int]:
        return [c for c, _ in self.categories]

    def category_index(self, cat_id: int) -> int:
        return self.cat_ids.index(int(cat_id))

    def index(self, text: str) -> int:
        return self.texts.index(text)

    def category_of(self, query: int) -> str:
        """The category name a query (a category name or a phrase) is about."""
        text = self.texts[query]
        return self.phrases.get(text, text)


def phrase(color: str, name: str) -> str:
    return f"{color} {name}"


def build_vocabulary(sources: Sequence[CocoInstances], color_queries: bool) -> Vocabulary:
    cats: dict[int, str] = {}
    phrases: dict[str, str] = {}
    for src in sources:
        cats.update(src.cat_names)
        if color_queries:
            for a in src.coco.anns.values():
                if a.get("color"):
                    name = src.cat_names[a["category_id"]]
                    phrases[phrase(a["color"], name)] = name
    return Vocabulary(sorted(cats.items()), dict(sorted(phrases.items())))


def _image_groups(source: CocoInstances, image_id: int, vocab: Vocabulary,
                  color_queries: bool) -> tuple[dict[int, list[int]], dict[str, list[int]]]:
    """(query index -> its instance ann ids, category name -> crowd ann ids) for one image. Crowd
    regions are never targets: they become ignore regions of every query about their category."""
    inst: dict[int, list[int]] = {}
    crowd: dict[str, list[int]] = {}
    for a in source.coco.loadAnns(source.coco.getAnnIds(imgIds=[image_id])):
        name = source.cat_names[a["category_id"]]
        if a.get("iscrowd", 0):
            crowd.setdefault(name, []).append(int(a["id"]))
            continue
        texts = [name] + ([phrase(a["color"], name)] if color_queries and a.get("color") else [])
        for text in texts:
            inst.setdefault(vocab.index(text), []).append(int(a["id"]))
    return inst, crowd


# ---- datasets -------------------------------------------------------------------------------------
def load_source_image(source: CocoInstances, index: int) -> tuple[Image.Image, int]:
    """The RGB image and id at ``index`` (CocoInstances' own check: the file must match the annotated size)."""
    image_id = source.image_ids[index]
    info = source.coco.imgs[image_id]
    path = source.images_dir / source.files[index]
    image = load_image(path)
    if image.size != (int(info["width"]), int(info["height"])):
        raise ImageLoadError(path, f"size {image.size[0]}x{image.size[1]} differs from "
                                   f"{info['width']}x{info['height']} in {source.ann_file.name}")
    return image, image_id


def decode_masks(source: CocoInstances, image_id: int, ann_ids: Sequence[int]) -> np.ndarray:
    """[M, H, W] bool masks of these annotations at the annotated image size (polygons or RLE)."""
    info = source.coco.imgs[image_id]
    if not ann_ids:
        return np.zeros((0, int(info["height"]), int(info["width"])), bool)
    return np.stack([source.coco.annToMask(source.coco.anns[a]) for a in ann_ids]).astype(bool)


class ImageDataset(Dataset):
    """Evaluation items, one per image: ``{"image", "image_id", "queried" [Q] bool (categories asked),
    "masks" [M,e,e] bool, "mask_cat" [M] (category index), "iscrowd" [M]}``; the masks let a test
    check the evaluation path with ground-truth predictions."""

    def __init__(self, source: CocoInstances, vocab: Vocabulary, transform: ImageTransform, mask_size: int,
                 all_queries: bool, limit: int = 0) -> None:
        self.source, self.vocab, self.transform = source, vocab, transform
        self.mask_size, self.all_queries = mask_size, all_queries
        self.indices = list(range(len(source)))[: limit or None]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, image_id = load_source_image(self.source, self.indices[index])
        anns = self.source.coco.loadAnns(self.source.coco.getAnnIds(imgIds=[image_id]))
        cats = torch.tensor([self.vocab.category_index(a["category_id"]) for a in anns], dtype=torch.long)
        queried = torch.full((len(self.vocab.categories),), self.all_queries, dtype=torch.bool)
        queried[cats] = True
        masks = decode_masks(self.source, image_id, [a["id"] for a in anns])
        return {
            "image": self.transform(image),
            "image_id": torch.tensor(image_id),
            "queried": queried,
            "masks": resize_masks(masks, self.mask_size),
            "mask_cat": cats,
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        }


class ImageQueriesDataset(Dataset):
    """Training items, one per image, with several queries at once (the anchored head shares the image's
    features among them): ``{"image", "image_id", "queries" [Q] (vocabulary indices), "masks" [M,S,S],
    "mask_query" [M,Q] bool (mask m answers query q), "ignore" [Q,S,S] (crowd regions of each query's
    category)}``.

    Queries: every category present in the image, ``negatives`` absent category names (all of them when
    fewer are absent), and with ``color_queries`` each present colour phrase plus one wrong-colour phrase
    of a present category (a hard negative). Draws are seeded per (seed, image), so items are stable.
    """

    def __init__(self, source: CocoInstances, vocab: Vocabulary, transform: ImageTransform, color_queries: bool,
                 negatives: int, seed: int = 0, limit: int = 0) -> None:
        self.source, self.vocab, self.transform = source, vocab, transform
        self.color_queries, self.negatives, self.seed = color_queries, negatives, seed
        self.indices = list(range(len(source)))[: limit or None]
        self._by_category: dict[str, list[int]] = {}
        for text, name in vocab.phrases.items():
            self._by_category.setdefault(name, []).append(vocab.index(text))

    def __len__(self) -> int:
        return len(self.indices)

    def _queries(self, k: int, inst: dict[int, list[int]], crowd: dict[str, list[int]]) -> list[int]:
        n_cat = len(self.vocab.categories)
        present = sorted(q for q in inst if q < n_cat)
        crowd_only = [self.vocab.index(name) for name in sorted(crowd) if self.vocab.index(name) not in inst]
        rng = np.random.default_rng([self.seed, k])
        absent = [q for q in range(n_cat) if q not in present and q not in crowd_only]
        take = min(self.negatives, len(absent))
        queries = present + crowd_only + sorted(int(q) for q in rng.choice(absent, size=take, replace=False))
        if self.color_queries:
            phrases = sorted(q for q in inst if q >= n_cat)
            queries += phrases
            wrong = [p for q in present for p in self._by_category.get(self.vocab.texts[q], []) if p not in inst]
            if wrong:
                queries.append(int(rng.choice(wrong)))
        return queries

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.indices[index]
        image, image_id = load_source_image(self.source, k)
        inst, crowd = _image_groups(self.source, image_id, self.vocab, self.color_queries)
        queries = self._queries(k, inst, crowd)
        ann_ids = sorted({a for q in queries for a in inst.get(q, ())})
        size = self.transform.size
        mask_query = torch.tensor([[a in inst.get(q, ()) for q in queries] for a in ann_ids],
                                  dtype=torch.bool).reshape(len(ann_ids), len(queries))
        ignore = torch.zeros(len(queries), size, size, dtype=torch.bool)
        for j, q in enumerate(queries):
            ids = crowd.get(self.vocab.category_of(q), [])
            if ids:
                ignore[j] = resize_masks(decode_masks(self.source, image_id, ids).any(0, keepdims=True), size,
                                         any_cover=True)[0]
        return {
            "image": self.transform(image),
            "image_id": torch.tensor(image_id),
            "queries": torch.tensor(queries, dtype=torch.long),
            "masks": resize_masks(decode_masks(self.source, image_id, ann_ids), size),
            "mask_query": mask_query,
            "ignore": ignore,
        }


def collate_queries(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack ``ImageQueriesDataset`` items, padding queries (index -1), masks and their query matrix."""
    n_q = max(len(item["queries"]) for item in batch)
    n_m = max(len(item["masks"]) for item in batch)
    size = batch[0]["image"].shape[-1]
    b = len(batch)
    out = {"image": torch.stack([item["image"] for item in batch]),
           "image_id": torch.stack([item["image_id"] for item in batch]),
           "queries": torch.full((b, n_q), -1, dtype=torch.long),
           "masks": torch.zeros(b, n_m, size, size, dtype=torch.bool),
           "mask_query": torch.zeros(b, n_m, n_q, dtype=torch.bool),
           "ignore": torch.zeros(b, n_q, size, size, dtype=torch.bool)}
    for i, item in enumerate(batch):
        q, m = len(item["queries"]), len(item["masks"])
        out["queries"][i, :q] = item["queries"]
        out["masks"][i, :m] = item["masks"]
        out["mask_query"][i, :m, :q] = item["mask_query"]
        out["ignore"][i, :q] = item["ignore"]
    return out


_PAD = {"masks": False, "mask_cat": -1, "iscrowd": False}


def collate(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack per-item tensors; pad the per-instance ones (``masks``, ``mask_cat``, ``iscrowd``) to the
    batch's largest instance count and add ``num_masks`` [B]. Training items (with ``queries``) go to
    ``collate_queries``."""
    if "queries" in batch[0]:
        return collate_queries(batch)
    out: dict[str, Tensor] = {}
    most = max(len(item["masks"]) for item in batch)
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in _PAD:
            padded = values[0].new_full((len(values), most, *values[0].shape[1:]), _PAD[key])
            for i, v in enumerate(values):
                padded[i, : len(v)] = v
            out[key] = padded
        else:
            out[key] = torch.stack(values)
    out["num_masks"] = torch.tensor([len(item["masks"]) for item in batch])
    return out


# ---- the bundle -----------------------------------------------------------------------------------
def data_root(data: DictConfig) -> Path:
    if data.name == "shapes":
        from vlkit.cache import ensure_shapes

        return ensure_shapes(data)
    if data.name != "coco":
        raise UfoDataError(f"the ufo plugin needs instance masks in COCO format; data={data.name!r} has none "
                           f"(use data=shapes, data=coco-mini or data=coco data.root=...)")
    if not data.root:
        raise UfoDataError("data=coco needs data.root=/path/to/coco (the folder holding annotations/)")
    return Path(data.root)


def open_split(data: DictConfig, split: str) -> CocoInstances:
    root, name = data_root(data), getattr(data, f"{split}_split")
    return CocoInstances(root / data.images.format(split=name), root / data.instances.format(split=name),
                         on_error=data.on_error)


def build_data(cfg: DictConfig, backbone: Any) -> DataBundle:
    """Training queries on the train split, per-image evaluation on val and test (shared if the same)."""
    from .config import UfoConfig, check_config

    u, d = settings(cfg, UfoConfig, "ufo"), cfg.data
    check_config(u)
    sources = {"train": open_split(d, "train")}
    for split in ("val", "test"):
        same = [s for s in sources if getattr(d, f"{s}_split") == getattr(d, f"{split}_split")]
        sources[split] = sources[same[0]] if same else open_split(d, split)
    # an MLLM lists category names in its prompt and answers with one of them: no colour phrases
    colours = u.color_queries and getattr(backbone, "kind", "clip") != "mllm"
    vocab = build_vocabulary(list({id(s): s for s in sources.values()}.values()), colours)
    transform = ImageTransform.for_backbone(backbone)
    train = ImageQueriesDataset(sources["train"], vocab, transform, colours, u.negatives_per_image,
                                cfg.train.seed, d.limit_train)
    # never finer than the model input: the head cannot resolve more, and the outputs stay small
    mask_size = min(u.eval_mask_size, transform.size) if u.eval_mask_size else transform.size
    evals = {s: ImageDataset(sources[s], vocab, transform, mask_size, u.eval_queries == "all", d.limit_eval)
             for s in ("val", "test")}
    info = {"vocab": vocab, "coco": {s: src.coco for s, src in sources.items()}, "image_size": transform.size,
            "eval_mask_size": mask_size, "transform": transform}
    return DataBundle(train=train, val=evals["val"], test=evals["test"], collate=collate, info=info)

