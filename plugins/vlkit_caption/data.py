"""Caption data: one training item per image with one of its captions drawn afresh each epoch, evaluation
items that carry the scene's objects (colour, shape) to score generated captions against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from vlkit.cache import ensure_shapes
from vlkit.data.captions import DecodedImages, RandomCaption, Scenes
from vlkit.data.coco import CocoCaptions
from vlkit.errors import VlkitError
from vlkit.plugins import DataBundle, settings
from vlkit_caption.config import CaptionConfig


class EvalImages(Dataset):
    """The images of an evaluation split by position; the scene records stay on ``scenes``."""

    def __init__(self, source: CocoCaptions, scenes: Scenes, limit: int = 0) -> None:
        self.source, self.scenes = source, scenes
        self.n = min(limit, len(source)) if limit else len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.source.load(index), "index": index}

    def objects(self, index: int) -> list[tuple[str, str]]:
        return [(o.color, o.shape) for o in self.scenes.objects[self.source.image_ids[index]]]


def build_data(cfg: DictConfig, backbone) -> DataBundle:
    if cfg.data.name != "shapes":
        raise VlkitError(f"the caption plugin scores captions against the shapes world's scenes; data={cfg.data.name} "
                         "has none (use data=shapes)")
    root = ensure_shapes(cfg.data)
    sets, scenes = {}, {}
    for split in ("train", "val", "test"):
        name = getattr(cfg.data, f"{split}_split")
        images = root / cfg.data.images.format(split=name)
        sets[split] = CocoCaptions(images, root / cfg.data.captions.format(split=name), transform=backbone.preprocess,
                                   on_error=cfg.data.on_error)
        scenes[split] = Scenes.read(root / cfg.data.instances.format(split=name), sets[split].image_ids)
        if scenes[split] is None:
            raise VlkitError(f"{root}: the {split} instances file does not describe every scene; regenerate the world")
    cc = settings(cfg, CaptionConfig, "caption")
    side = backbone.image_size
    decoded = None
    if cc.preload_mb > 0 and len(sets["train"]) * side * side * 3 <= cc.preload_mb * 2**20:
        decoded = DecodedImages(sets["train"], backbone.preprocess, progress=cfg.train.progress)
    train: Dataset = RandomCaption(sets["train"], decoded=decoded, seed=cfg.train.seed)
    if cfg.data.limit_train:
        train = Subset(train, range(min(cfg.data.limit_train, len(train))))
    max_tokens = int(cc.max_caption_tokens)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        images = torch.stack([it["image"] for it in items])
        if "captions" not in items[0]:
            return {"image": images, "index": torch.tensor([it["index"] for it in items])}
        return backbone.caption_batch(images, [it["captions"][0] for it in items], max_length=max_tokens)

    evals = {s: EvalImages(sets[s], scenes[s], cfg.data.limit_eval) for s in ("val", "test")}
    return DataBundle(train=train, val=evals["val"], test=evals["test"], collate=collate,
                      info={"root": str(Path(root))})
