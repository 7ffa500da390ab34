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
from vlkit.data.captions import DecodedImages, RandomCaption, Scenes
from vlkit.data.coco import CocoCaptions
from vlkit.errors import VlkitError
from vlkit.plugins import DataBundle, settings
from vlkit_retrieval.config import RetrievalConfig
from vlkit_retrieval.losses import positive_mask

POSITIVES = ("auto", "scene", "caption")


class EvalImages(Dataset):
    """Images of an evaluation split by position; captions stay on ``source`` for compute_metrics, and
    ``zeroshot`` holds the "colour shape" label of each single-object image (shapes worlds only)."""

    def __init__(self, source: CocoCaptions, limit: int = 0, zeroshot: dict[int, str] | None = None) -> None:
        self.source = source
        self.n = min(len(source), limit) if limit else len(source)
        self.zeroshot = {k: v for k, v in (zeroshot or {}).items() if k < self.n}

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
    rc = settings(cfg, RetrievalConfig, "retrieval")
    if rc.positives not in POSITIVES:
        raise VlkitError(f"retrieval.positives={rc.positives!r} is not one of {', '.join(POSITIVES)}")
    root = data_root(cfg)
    sets: dict[str, CocoCaptions] = {}
    scenes: dict[str, Scenes | None] = {}
    for split in ("train", "val", "test"):
        images, captions = _split_files(cfg, root, split)
        sets[split] = CocoCaptions(images, captions, transform=backbone.preprocess, on_error=cfg.data.on_error)
        instances = root / cfg.data.instances.format(split=getattr(cfg.data, f"{split}_split"))
        scenes[split] = Scenes.read(instances, sets[split].image_ids)
    use_scenes = rc.positives != "caption" and scenes["train"] is not None
    if rc.positives == "scene" and not use_scenes:
        raise VlkitError("retrieval.positives=scene needs a shapes world whose instances file describes every "
                         "scene (colour, shape, centre); these data have none: set retrieval.positives=caption")
    if rc.hard_negatives and not use_scenes:
        raise VlkitError("retrieval.hard_negatives=true writes captions of changed scenes, which needs a shapes "
                         "world (scene records in its instances file) and positives=auto|scene")
    train_scenes = scenes["train"] if use_scenes else None
    decoded = None
    if rc.preload_mb > 0 and len(sets["train"]):
        side = backbone.image_size
        if len(sets["train"]) * side * side * 3 <= rc.preload_mb * 2**20:
            decoded = DecodedImages(sets["train"], backbone.preprocess, progress=cfg.train.progress)
    train: Dataset = RandomCaption(sets["train"], train_scenes, rc.hard_negatives, rc.captions_per_image, decoded,
                                   seed=cfg.train.seed)
    if cfg.data.limit_train:
        train = Subset(train, range(min(cfg.data.limit_train, len(train))))

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        if "captions" not in items[0]:
            batch["index"] = torch.tensor([it["index"] for it in items])
            return batch
        k = len(items[0]["captions"])
        captions = [c for it in items for c in it["captions"]]
        ids = [it["image_id"] for it in items]
        # [B images, B*k captions]: the same image, or the very same text as one of the image's captions
        pos = positive_mask([i for i in ids for _ in range(k)], captions).view(len(ids), k, -1).any(dim=1)
        if train_scenes is not None:
            # extra columns: the hard negatives (a positive only of an image they happen to be true of)
            captions = captions + [it["negative"] for it in items if it.get("negative")]
            truth = torch.tensor([[c in train_scenes.truths(i) for c in captions] for i in ids])
            # [B images, B*k (+ negatives) captions]: caption j is true of image i
            pos = truth | torch.nn.functional.pad(pos, (0, len(captions) - pos.shape[1]))
        batch.update(tokens=backbone.tokenize(captions), captions=captions, image_id=torch.tensor(ids), pos=pos)
        return batch

    evals = {}
    for s in ("val", "test"):
        labels = scenes[s].single_object_labels(sets[s].image_ids) if scenes[s] is not None else {}
        evals[s] = EvalImages(sets[s], cfg.data.limit_eval, labels)
    return DataBundle(train=train, val=evals["val"], test=evals["test"], collate=collate,
                      info={"root": str(root)})
