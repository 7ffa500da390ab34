"""Caption data for retrieval: one training item per image with a caption drawn at random each time,
and per-image evaluation sets that keep all captions grouped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from vlkit.backbone import Backbone
from vlkit.cache import ensure_shapes
from vlkit.data.coco import CocoCaptions
from vlkit.errors import VlkitError
from vlkit.plugins import DataBundle


class RandomCaption(Dataset):
    """One item per image; the caption is drawn with torch's RNG, so a resumed run replays it."""

    def __init__(self, source: CocoCaptions) -> None:
        self.source = source
        self.with_captions = [i for i, caps in enumerate(source.image_captions) if caps]

    def __len__(self) -> int:
        return len(self.with_captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.with_captions[index]
        caps = self.source.image_captions[k]
        pick = int(torch.randint(len(caps), ()))
        return {"image": self.source.load(k), "caption": caps[pick], "image_id": self.source.image_ids[k]}


class EvalImages(Dataset):
    """Images of an evaluation split by position; captions stay on ``source`` for compute_metrics."""

    def __init__(self, source: CocoCaptions, limit: int = 0) -> None:
        self.source = source
        self.n = min(len(source), limit) if limit else len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.source.load(index), "index": index}


def _split_files(cfg: DictConfig, root: Path, split: str) -> tuple[Path, Path]:
    name = getattr(cfg.data, f"{split}_split")
    images = root / cfg.data.images.format(split=name)
    captions = root / cfg.data.captions.format(split=name)
    if not captions.is_file():
        raise VlkitError(
            f"no caption file for the {split} split at {captions}; set data.root (now {str(root)!r}) and "
            f"data.captions (a pattern with {{split}}) to point at COCO-format captions"
        )
    return images, captions


def data_root(cfg: DictConfig) -> Path:
    if cfg.data.name == "shapes":
        return ensure_shapes(cfg.data)
    if cfg.data.name == "coco":
        if not cfg.data.root:
            raise VlkitError("data=coco needs data.root=/path/to/coco (the folder holding annotations/)")
        return Path(cfg.data.root)
    raise VlkitError(f"the retrieval plugin reads data.name=shapes or coco, not {cfg.data.name!r}")


def build_data(cfg: DictConfig, backbone: Backbone) -> DataBundle:
    root = data_root(cfg)
    sets: dict[str, CocoCaptions] = {}
    for split in ("train", "val", "test"):
        images, captions = _split_files(cfg, root, split)
        sets[split] = CocoCaptions(images, captions, transform=backbone.preprocess, on_error=cfg.data.on_error)
    train: Dataset = RandomCaption(sets["train"])
    if cfg.data.limit_train:
        train = Subset(train, range(min(cfg.data.limit_train, len(train))))

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        if "caption" in items[0]:
            captions = [it["caption"] for it in items]
            batch.update(tokens=backbone.tokenize(captions), captions=captions,
                         image_id=torch.tensor([it["image_id"] for it in items]))
        else:
            batch["index"] = torch.tensor([it["index"] for it in items])
        return batch

    evals = {s: EvalImages(sets[s], cfg.data.limit_eval) for s in ("val", "test")}
    return DataBundle(train=train, val=evals["val"], test=evals["test"], collate=collate,
                      info={"root": str(root)})
