"""The CZSL data the csp plugin trains and evaluates on: the shapes world's CZSL split, or any CSP-layout root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Dataset

from vlkit.backbone import Backbone
from vlkit.data.czsl import CZSLDataset
from vlkit.errors import VlkitError
from vlkit.plugins import DataBundle, settings
from vlkit_csp.config import CSPConfig, check_config, resolve_auto


def czsl_root(data: DictConfig) -> Path:
    """data=shapes: the generated world's ``czsl/`` folder; data=czsl: ``data.root`` itself."""
    if data.name == "shapes":
        from vlkit.cache import ensure_shapes

        return ensure_shapes(data) / "czsl"
    if data.name == "czsl":
        if not data.root:
            raise VlkitError("data=czsl needs data.root=/path/to/dataset (MIT-States, UT-Zappos or C-GQA in "
                             "the layout distributed for CSP: images/, compositional-split-natural/, metadata_*.t7)")
        return Path(data.root)
    raise VlkitError(f"plugin csp reads compositional (CZSL) data; data.name={data.name!r} is not one. Use "
                     f"data=shapes (the default: the synthetic world's CZSL split) or data=czsl data.root=PATH")


class IndexedSplit(Dataset):
    """A CZSL split (optionally an evenly spread subset) whose items also carry their index, so
    evaluation can name the image behind every prediction."""

    def __init__(self, base: CZSLDataset, limit: int = 0) -> None:
        self.base = base
        n = len(base)
        # evenly spread rather than the first `limit`: the metadata is grouped by pair, so a prefix
        # would hold only a few pairs (and maybe no unseen one)
        self.indices = list(range(n)) if not limit or limit >= n else [i * n // limit for i in range(limit)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[self.indices[i]], "index": i}

    def image_name(self, i: int) -> str:
        return self.base.data[self.indices[i]][0]


def build_data(cfg: DictConfig, backbone: Backbone) -> DataBundle:
    csp = settings(cfg, CSPConfig, "csp")
    check_config(csp)
    root = czsl_root(cfg.data)
    split_name, template = resolve_auto(csp, cfg.data.name)

    def split(name: str, transform: Any, limit: int) -> IndexedSplit:
        return IndexedSplit(CZSLDataset(root, name, transform, split_name=split_name), limit)

    train = split("train", backbone.preprocess_train, cfg.data.limit_train)
    val = split("val", backbone.preprocess, cfg.data.limit_eval)
    test = split("test", backbone.preprocess, cfg.data.limit_eval)
    base = train.base
    info = {"root": str(root), "attrs": base.attrs, "objs": base.objs, "pairs": base.pairs,
            "train_pairs": base.train_pairs, "val_pairs": base.val_pairs, "test_pairs": base.test_pairs,
            "split_name": split_name, "template": template}
    return DataBundle(train=train, val=val, test=test, info=info)
