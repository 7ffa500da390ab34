"""Caption datasets shared by plugins: what a shapes world's instances file says of each scene, a split's
images decoded once into memory, and one training item per image with a caption drawn afresh each epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkit.data.coco import CocoCaptions
from vlkit.errors import VlkitError


class Scenes:
    """What a shapes world's instances file says of each scene (colour, shape and centre of every object):
    the captions true of an image (cached), a hard-negative caption of a changed scene, and the labels of
    single-object images. ``Scenes.read`` gives None for data without such records (COCO)."""

    def __init__(self, objects: dict[int, list[Any]], sizes: dict[int, int]) -> None:
        self.objects, self.sizes = objects, sizes
        self._truths: dict[int, frozenset[str]] = {}

    @classmethod
    def read(cls, instances_file: Path, image_ids: list[int]) -> Scenes | None:
        import json

        from vlkit.data.shapes import scene_objects

        if not instances_file.is_file():
            return None
        try:
            data = json.loads(instances_file.read_text(encoding="utf-8"))
            sizes = {int(im["id"]): int(im["width"]) for im in data["images"]}
            records: dict[int, list[dict[str, Any]]] = {}
            for ann in data["annotations"]:
                records.setdefault(int(ann["image_id"]), []).append(ann)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise VlkitError(f"{instances_file} is not a readable COCO instances file ({e}); regenerate the "
                             "world or set retrieval.positives=caption") from e
        objects = {}
        for image_id in image_ids:
            objs = scene_objects(records.get(image_id, []))
            if objs is None:
                return None
            objects[image_id] = objs
        return cls(objects, sizes)

    def truths(self, image_id: int) -> frozenset[str]:
        from vlkit.data.shapes import true_captions

        if image_id not in self._truths:
            self._truths[image_id] = true_captions(self.objects[image_id], self.sizes[image_id])
        return self._truths[image_id]

    def negative(self, image_id: int, seed: int) -> str | None:
        from vlkit.data.shapes import false_caption

        return false_caption(self.objects[image_id], self.sizes[image_id], np.random.default_rng(seed))

    def single_object_labels(self, image_ids: list[int]) -> dict[int, str]:
        """Position -> "colour shape" of every image with exactly one object (the 48-way zero-shot test)."""
        return {k: f"{self.objects[i][0].color} {self.objects[i][0].shape}"
                for k, i in enumerate(image_ids) if len(self.objects[i]) == 1}


class DecodedImages:
    """A split's images decoded once into one uint8 array [N, H, W, 3] (the preprocessing up to the tensor
    conversion applied), so an epoch costs no PNG decoding; ``tensor(k)`` finishes the preprocessing with
    the same operations the transform would run (checked on the first image: otherwise ``ok`` is False and
    the caller decodes as usual)."""

    def __init__(self, source: CocoCaptions, transform: Any, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        from vlkit.data.images import load_image

        steps = list(getattr(transform, "transforms", []))
        tail = [type(t).__name__ for t in steps[-2:]]
        self.ok = len(steps) >= 2 and tail[0] in ("ToTensor", "MaybeToTensor") and tail[1] == "Normalize"
        if not self.ok:
            return
        head = steps[:-2]
        self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(3, 1, 1)
        first = np.asarray(self._head(head, load_image(source.images_dir / source.files[0])))
        self.array = np.empty((len(source), *first.shape), np.uint8)
        for k in tqdm(range(len(source)), desc="decoding training images", disable=not progress, leave=False):
            self.array[k] = np.asarray(self._head(head, load_image(source.images_dir / source.files[k])))
        self.ok = torch.equal(self.tensor(0), transform(load_image(source.images_dir / source.files[0])))

    @staticmethod
    def _head(steps: list[Any], image: Any) -> Any:
        for t in steps:
            image = t(image)
        return image

    def tensor(self, k: int) -> torch.Tensor:
        x = torch.from_numpy(self.array[k]).permute(2, 0, 1).float().div(255)
        return x.sub_(self.mean).div_(self.std)


class RandomCaption(Dataset):
    """One item per image with ``per_image`` of its captions (distinct while it has enough), drawn from a
    generator keyed by (seed, epoch, index): not from the global RNG, which the loader's look-ahead would
    advance before a checkpoint, so a resumed run replays every draw. With ``scenes`` and ``negatives``, each
    item also carries a caption false of its image (a hard negative). The engine calls ``set_epoch``."""

    def __init__(self, source: CocoCaptions, scenes: Scenes | None = None, negatives: bool = False,
                 per_image: int = 1, decoded: DecodedImages | None = None, seed: int = 0) -> None:
        if per_image < 1:
            raise VlkitError(f"retrieval.captions_per_image={per_image}: use 1 or more")
        self.source, self.scenes, self.negatives = source, scenes, negatives and scenes is not None
        self.per_image = per_image
        self.decoded = decoded if decoded is not None and decoded.ok else None
        self.seed, self.epoch = seed, 0
        self.with_captions = [i for i, caps in enumerate(source.image_captions) if caps]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator:
        key = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))

    def __len__(self) -> int:
        return len(self.with_captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.with_captions[index]
        caps = self.source.image_captions[k]
        g = self._generator(index)
        if self.per_image == 1:
            picks = [int(torch.randint(len(caps), (), generator=g))]
        else:
            order = torch.randperm(max(len(caps), self.per_image), generator=g)
            picks = [int(j) % len(caps) for j in order[:self.per_image]]
        image = self.decoded.tensor(k) if self.decoded is not None else self.source.load(k)
        item = {"image": image, "captions": [caps[j] for j in picks], "image_id": self.source.image_ids[k]}
        if self.negatives:
            item["negative"] = self.scenes.negative(item["image_id"], int(torch.randint(2**31 - 1, (), generator=g)))
        return item
