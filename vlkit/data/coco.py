"""COCO-format readers: captions grouped per image (with a flat pair view) and instance masks per image."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from vlkit.data.images import ImageLoadError, SkipReport, load_image
from vlkit.errors import DataFormatError, DataNotFoundError

OnError = Literal["raise", "skip"]
Transform = Callable[[Any], Any]


def _read_json(path: Path, required: tuple[str, ...], kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataNotFoundError(f"COCO annotation file not found: {path}; expected the official layout, "
                                "e.g. annotations/captions_train2017.json")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataFormatError(f"{path} is not valid JSON ({str(e)[:120]}); re-download or regenerate it") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path} is not a COCO {kind} file: the top level is not a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise DataFormatError(f"{path} is not a COCO {kind} file: missing top-level keys {missing}")
    return data


def caption_texts(path: str | Path) -> list[str]:
    """Every caption of a COCO captions file, stripped, in annotation-id order (the order of an index's texts)."""
    path = Path(path)
    data = _read_json(path, ("annotations",), "captions")
    with _records_of(path, "captions"):
        return [str(a["caption"]).strip() for a in sorted(data["annotations"], key=lambda a: a["id"])]


@contextlib.contextmanager
def _records_of(path: Path, kind: str):
    """Turn a malformed record (a missing key, a wrong type) into a DataFormatError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, (DataFormatError, ImageLoadError)):
            raise
        raise DataFormatError(f"{path} is not a valid COCO {kind} file ({type(e).__name__}: {str(e)[:120]}); "
                              f"re-download or regenerate it") from None


def _check_images(images_dir: Path, records: list[tuple[int, str]], on_error: str,
                  ann_file: Path) -> tuple[list[tuple[int, str]], SkipReport]:
    """Resolve (image_id, file_name) records against ``images_dir``. 'raise': every file must exist
    (checked now, so a run fails at start, not mid-epoch). 'skip': every file is decoded once now and
    the bad ones are dropped and reported, so ``len()`` is right from the start."""
    report = SkipReport("images")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    if not images_dir.is_dir():
        raise DataNotFoundError(f"images directory not found: {images_dir} (images of {ann_file.name}); "
                                "pass the folder holding the files named in the annotations")
    if on_error == "raise":
        missing = [f for _, f in records if not (images_dir / f).is_file()]
        if missing:
            listed = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ImageLoadError(images_dir / missing[0],
                                 f"no such file ({len(missing)} of {len(records)} images of {ann_file.name} "
                                 f"are missing: {listed}); fix images_dir or use on_error='skip'")
        return records, report
    kept = []
    for rec in records:
        try:
            load_image(images_dir / rec[1])
            kept.append(rec)
        except ImageLoadError as e:
            report.add(e.path, e.reason.split(";")[0])
    report.log()
    return kept, report


class CocoCaptions(Dataset):
    """Images with all their captions grouped (``item -> {"image", "captions", "image_id"}``). Retrieval
    evaluation uses ``captions`` / ``caption_image_index`` / ``positives()``; training uses ``pairs()``."""

    def __init__(self, images_dir: str | Path, ann_file: str | Path, transform: Transform | None = None,
                 on_error: OnError = "raise") -> None:
        self.images_dir, self.ann_file, self.transform = Path(images_dir), Path(ann_file), transform
        data = _read_json(self.ann_file, ("images", "annotations"), "captions")
        by_image: dict[int, list[str]] = {}
        with _records_of(self.ann_file, "captions"):
            for ann in sorted(data["annotations"], key=lambda a: a["id"]):  # stable caption order
                by_image.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
            records = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        records, self.skipped = _check_images(self.images_dir, records, on_error, self.ann_file)
        self.image_ids = [i for i, _ in records]
        self.files = [f for _, f in records]
        self.image_captions: list[list[str]] = [by_image.get(i, []) for i in self.image_ids]
        self.captions: list[str] = [c for caps in self.image_captions for c in caps]
        self.caption_image_index: list[int] = [k for k, caps in enumerate(self.image_captions) for _ in caps]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> Any:
        """The image at ``index``, transformed when a transform was given."""
        image = load_image(self.images_dir / self.files[index])
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.load(index), "captions": list(self.image_captions[index]),
                "image_id": self.image_ids[index]}

    def positives(self) -> torch.Tensor:
        """Bool [n_captions, n_images]: True where the caption describes the image."""
        pos = torch.zeros(len(self.captions), len(self.image_ids), dtype=torch.bool)
        pos[torch.arange(len(self.captions)), torch.tensor(self.caption_image_index, dtype=torch.long)] = True
        return pos

    def pairs(self) -> CaptionPairs:
        """The flat (image, caption) view for contrastive training: one item per caption."""
        return CaptionPairs(self)


class CaptionPairs(Dataset):
    """One item per caption: ``{"image", "caption", "image_index", "caption_index", "image_id"}``."""

    def __init__(self, captions: CocoCaptions) -> None:
        self.source = captions

    def __len__(self) -> int:
        return len(self.source.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.source.caption_image_index[index]
        return {"image": self.source.load(k), "caption": self.source.captions[index], "image_index": k,
                "caption_index": index, "image_id": self.source.image_ids[k]}


class CocoInstances(Dataset):
    """Images with their instance masks, decoded by pycocotools from polygons or RLE (crowd regions are
    kept and flagged by ``iscrowd``). Masks stay at the annotated resolution; ``transform`` only maps the
    image. ``coco`` is the loaded ``pycocotools.coco.COCO`` for evaluation."""

    def __init__(self, images_dir: str | Path, ann_file: str | Path, transform: Transform | None = None,
                 on_error: OnError = "raise") -> None:
        self.images_dir, self.ann_file, self.transform = Path(images_dir), Path(ann_file), transform
        data = _read_json(self.ann_file, ("images", "annotations", "categories"), "instances")
        self.coco = COCO()  # built from the parsed dict: the file is read once, with our clear errors
        self.coco.dataset = data
        with _records_of(self.ann_file, "instances"):
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                self.coco.createIndex()
            self.cat_ids: list[int] = sorted(self.coco.cats)
            self.cat_names: dict[int, str] = {c: str(self.coco.cats[c]["name"]) for c in self.cat_ids}
            records = [(int(i), str(im["file_name"])) for i, im in self.coco.imgs.items()]
        records, self.skipped = _check_images(self.images_dir, records, on_error, self.ann_file)
        self.image_ids = [i for i, _ in records]
        self.files = [f for _, f in records]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        with _records_of(self.ann_file, "instances"):
            h, w = int(info["height"]), int(info["width"])
        path = self.images_dir / self.files[index]
        image = load_image(path)
        if image.size != (w, h):  # masks are decoded at the annotated size: a mismatch would misalign them
            raise ImageLoadError(path, f"size {image.size[0]}x{image.size[1]} differs from {w}x{h} in "
                                       f"{self.ann_file.name}; the file does not belong to these annotations")
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        with _records_of(self.ann_file, "instances"):  # a damaged polygon, RLE, box or category
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            if masks.shape[1:] != (h, w):
                raise ValueError(f"a mask of image {image_id} is {masks.shape[1:]}, the image {h}x{w}")
            return {
                "image": self.transform(image) if self.transform is not None else image,
                "image_id": image_id,
                "masks": torch.from_numpy(masks.astype(bool)),
                "boxes": torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),  # COCO xywh
                "category_ids": torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
                "category_names": [self.cat_names[a["category_id"]] for a in anns],
                "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
                "ann_ids": torch.tensor([a["id"] for a in anns], dtype=torch.long),
            }
