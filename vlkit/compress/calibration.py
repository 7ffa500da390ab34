"""Calibration data for OPTIN pruning: a seeded sample of preprocessed images and tokenized captions."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.errors import CompressError

if TYPE_CHECKING:  # torch and the backbone are imported inside the functions: the CLI starts fast
    import torch

    from vlkit.backbone import Backbone


@dataclass
class Calibration:
    """Preprocessed images [n, 3, S, S] and token ids [n, L] for OPTIN, and where they came from."""

    images: torch.Tensor | None
    texts: torch.Tensor | None
    source: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str) -> Calibration:
        images = self.images.to(device) if self.images is not None else None
        texts = self.texts.to(device) if self.texts is not None else None
        return Calibration(images, texts, self.source)


def default_calibration_root(n: int) -> Path:
    """A shapes world to calibrate on: the cached training world if there is one, else a small one made now."""
    from omegaconf import OmegaConf

    from vlkit.cache import cache_root, shapes_dir
    from vlkit.config import DataConfig

    trained = shapes_dir(OmegaConf.structured(DataConfig))
    if (trained / "annotations" / "captions_train.json").is_file():
        return trained
    root = cache_root() / "data" / f"shapes-calib-{n}-px64-seed0"
    if not (root / "annotations" / "captions_train.json").is_file():
        from vlkit.data.shapes import generate_shapes
        from vlkit.io import atomic_directory

        print(f"calib is empty: generating a shapes world of {n} images into {root} (once)", flush=True)
        with atomic_directory(root) as tmp:
            generate_shapes(tmp, n_train=n, n_val=0, n_test=0, image_size=64, seed=0, n_czsl_per_pair=0,
                            progress=False, workers=1)
    return root


def _sample(total: int, n: int, seed: int, what: str) -> list[int]:
    if total == 0:
        raise CompressError(f"calibration source has no {what}")
    if total < n:
        print(f"calibration: only {total} {what} available (n_calib={n}); using all of them", flush=True)
    return sorted(random.Random(seed).sample(range(total), min(n, total)))


def _guess_images_dir(ann: Path) -> Path:
    """COCO / shapes layout: <root>/annotations/captions_<split>.json with images in <root>/images/<split>
    (shapes) or <root>/<split> (COCO's train2017/)."""
    split = ann.stem[len("captions_"):] if ann.stem.startswith("captions_") else ann.stem
    root = ann.parent.parent if ann.parent.name == "annotations" else ann.parent
    candidates = [root / "images" / split, root / split]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise CompressError(f"no images folder found for {ann} (looked at {', '.join(map(str, candidates))}); "
                        f"pass calib_images=DIR")


def _from_captions(bb: Backbone, ann: Path, images_dir: Path, n: int, seed: int) -> Calibration:
    import torch

    from vlkit.data.coco import CocoCaptions

    try:
        ds = CocoCaptions(images_dir, ann, transform=bb.preprocess)
        images = torch.stack([ds.load(i) for i in _sample(len(ds), n, seed, "images")])
    except (FileNotFoundError, ValueError) as exc:  # unreadable json or image: the reader's message says which
        raise CompressError(f"calibration data: {exc}") from None
    texts = [ds.captions[i] for i in _sample(len(ds.captions), n, seed + 1, "captions")]
    source = {"kind": "coco-captions", "captions": str(ann), "images_dir": str(images_dir),
              "n_images": len(images), "n_texts": len(texts), "texts": "captions"}
    return Calibration(images, bb.tokenize(texts), source)


def random_tokens(bb: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    """Random token ids with an end-of-text token (the highest id, found by argmax pooling) at a random place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab, length = int(bb.model.vocab_size), bb.context_length
    tokens = torch.randint(1, vocab - 1, (n, length), generator=gen)
    for i, eot in enumerate(torch.randint(2, length, (n,), generator=gen).tolist()):
        tokens[i, eot], tokens[i, eot + 1:] = vocab - 1, 0
    return tokens


def _from_folder(bb: Backbone, folder: Path, n: int, seed: int, need_texts: bool) -> Calibration:
    import torch

    from vlkit.data.images import ImageLoadError, find_images, load_image

    files = find_images(folder)
    try:
        images = torch.stack([bb.preprocess(load_image(files[i])) for i in _sample(len(files), n, seed, "images")])
    except ImageLoadError as exc:
        raise CompressError(f"calibration data: {exc}") from None
    source = {"kind": "image-folder", "images_dir": str(folder), "n_images": len(images), "n_texts": 0,
              "texts": "none"}
    texts = None
    if need_texts:
        print(f"warning: calib={folder} holds images only, so the text tower is calibrated on random token ids "
              f"(its OPTIN ranking is then close to arbitrary); pass a COCO captions .json or towers=image",
              flush=True)
        texts = random_tokens(bb, n, seed)
        source.update(n_texts=n, texts="random tokens")
    return Calibration(images, texts, source)


def calibration_batch(bb: Backbone, calib: str = "", n: int = 64, *, split: str = "train", images_dir: str = "",
                      seed: int = 0, need_texts: bool = True) -> Calibration:
    """``n`` preprocessed images and ``n`` tokenized captions (a seeded sample) from ``calib``.

    ``calib``: a COCO captions .json (images beside it or ``images_dir``), a data set root with
    annotations/captions_<split>.json, a plain folder of images (texts are then random tokens, with a
    warning), or empty for the shapes world (the cached training world, else a small generated one)."""
    if not calib:
        calib = str(default_calibration_root(n))
        print(f"calibrating on the shapes world at {calib} (pass calib=... for a model trained on other data)",
              flush=True)
    path = Path(calib)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise CompressError(f"calib={calib!r} is a file but not a COCO captions .json")
        return _from_captions(bb, path, Path(images_dir) if images_dir else _guess_images_dir(path), n, seed)
    ann = path / "annotations" / f"captions_{split}.json"
    if ann.is_file():
        return _from_captions(bb, ann, Path(images_dir) if images_dir else _guess_images_dir(ann), n, seed)
    if ann.parent.is_dir():  # a data set root without this split: a typo rather than a folder of images
        splits = sorted(p.stem[len("captions_"):] for p in ann.parent.glob("captions_*.json"))
        raise CompressError(f"calib={calib!r} has no {ann.name}; splits there: {', '.join(splits) or 'none'} "
                            f"(calib_split=...)")
    if not path.is_dir():
        raise CompressError(f"calib={calib!r} does not exist")
    return _from_folder(bb, path, n, seed, need_texts)
