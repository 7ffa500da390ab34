"""Compositional zero-shot (CZSL) data in the layout distributed for CSP: MIT-States, UT-Zappos, C-GQA."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from vlkit.data.images import load_image
from vlkit.errors import DataFormatError, DataNotFoundError

Pair = tuple[str, str]
SPLITS = ("train", "val", "test")
LAYOUT = ("<root>/images/<attr>_<obj>/<file>, <root>/<split_name>/{train,val,test}_pairs.txt (lines "
          "'attr obj') and <root>/metadata_<split_name>.t7 (a torch-saved list of dicts with keys image, "
          "attr, obj, set), as distributed for CSP")


def _missing(path: Path, what: str) -> DataNotFoundError:
    return DataNotFoundError(f"CZSL {what} not found: {path}. Expected the layout {LAYOUT}; check `root` "
                             "(e.g. data/mit-states) and `split_name`")


def read_pairs(path: Path) -> list[Pair]:
    """The (attr, obj) pairs of a ``*_pairs.txt`` file, one 'attr obj' per line, in file order."""
    if not path.is_file():
        raise _missing(path, "pairs file")
    pairs = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path} is not UTF-8 text ({e}); expected lines 'attr obj'") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataFormatError(f"{path}:{n}: expected 'attr obj' (two words), got {line[:80]!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def read_metadata(path: Path) -> list[dict[str, str]]:
    """The ``metadata_<split_name>.t7`` list, loaded with ``weights_only=True`` (no code execution)."""
    if not path.is_file():
        raise _missing(path, "metadata file")
    try:
        meta = torch.load(path, weights_only=True)
    except Exception as e:  # a pickle that needs arbitrary code, or a damaged file
        raise DataFormatError(f"cannot read CZSL metadata {path} with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e)[:160]}): it is damaged or not a CZSL metadata file") from None
    if not isinstance(meta, list) or (meta and not {"image", "attr", "obj", "set"} <= set(meta[0])):
        raise DataFormatError(f"{path}: expected a list of dicts with keys image, attr, obj, set")
    return meta


class CZSLDataset(Dataset):
    """One split of a CZSL data set. ``attrs``/``objs`` are sorted over all pair files; ``pairs`` is the
    label space (closed world: the sorted union of the train/val/test pairs; open world: every attr x obj).
    Items are ``{"image", "attr", "obj", "pair"}`` with indices into ``attrs``, ``objs`` and ``pairs``.

    As in the reference loader, metadata entries with attr or set "NA" are dropped, and so are entries
    whose pair is not among this split's pairs."""

    def __init__(self, root: str | Path, split: Literal["train", "val", "test"] = "train",
                 transform: Callable[[Any], Any] | None = None,
                 split_name: str = "compositional-split-natural", open_world: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"CZSLDataset: split={split!r}; expected one of {SPLITS}")
        self.root, self.split, self.transform = Path(root), split, transform
        self.split_name, self.open_world = split_name, open_world
        if not self.root.is_dir():
            raise _missing(self.root, "root directory")
        self.image_dir = self.root / "images"
        if not self.image_dir.is_dir():
            raise _missing(self.image_dir, "images directory")
        self.train_pairs, self.val_pairs, self.test_pairs = (
            read_pairs(self.root / split_name / f"{s}_pairs.txt") for s in SPLITS)
        every = self.train_pairs + self.val_pairs + self.test_pairs
        self.attrs: list[str] = sorted({a for a, _ in every})
        self.objs: list[str] = sorted({o for _, o in every})
        self.pairs: list[Pair] = (list(itertools.product(self.attrs, self.objs)) if open_world
                                  else sorted(set(every)))
        self.attr2idx = {a: i for i, a in enumerate(self.attrs)}
        self.obj2idx = {o: i for i, o in enumerate(self.objs)}
        self.pair2idx = {p: i for i, p in enumerate(self.pairs)}
        self.train_pair2idx = {p: i for i, p in enumerate(self.train_pairs)}
        self.split_pairs = {"train": self.train_pairs, "val": self.val_pairs, "test": self.test_pairs}[split]
        allowed = set(self.split_pairs)
        meta = read_metadata(self.root / f"metadata_{split_name}.t7")
        try:
            self.data: list[tuple[str, str, str]] = [
                (str(m["image"]), m["attr"], m["obj"]) for m in meta
                if m["set"] == split and m["attr"] != "NA" and (m["attr"], m["obj"]) in allowed]
        except (KeyError, TypeError) as e:
            raise DataFormatError(f"{self.root / f'metadata_{split_name}.t7'}: an entry lacks image, attr, obj "
                                  f"or set ({type(e).__name__}: {e})") from None

    @property
    def seen_mask(self) -> torch.Tensor:
        """Bool [len(pairs)]: True for pairs seen in training (the seen/unseen split of CZSL metrics)."""
        seen = set(self.train_pairs)
        return torch.tensor([p in seen for p in self.pairs], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, attr, obj = self.data[index]
        img = load_image(self.image_dir / image)
        return {"image": self.transform(img) if self.transform is not None else img,
                "attr": self.attr2idx[attr], "obj": self.obj2idx[obj], "pair": self.pair2idx[(attr, obj)]}
