"""vlkit's cache: generated data sets and named trained backbones that defaults start from."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from vlkit.errors import VlkitError
from vlkit.io import atomic_directory

# == vlkit.data.shapes.GENERATOR_VERSION (a test holds it so), written here to keep numpy/scipy out of
# this import; a new generator version gets a new cache folder instead of reusing an older world.
WORLD_VERSION = "shapes-v3"


def cache_root() -> Path:
    """VLKIT_CACHE, else ~/.cache/vlkit."""
    return Path(os.environ.get("VLKIT_CACHE", Path.home() / ".cache" / "vlkit")).expanduser()


def shapes_dir(data: DictConfig) -> Path:
    """Where the shapes world of these parameters lives (data.root, or a cache folder named by them)."""
    if data.root:
        return Path(data.root)
    tag = f"{WORLD_VERSION}-{data.n_train}-{data.n_val}-{data.n_test}-px{data.image_size}-seed{data.seed}"
    if data.n_czsl_per_pair != 100:
        tag += f"-czsl{data.n_czsl_per_pair}"
    return cache_root() / "data" / tag


def ensure_shapes(data: DictConfig) -> Path:
    """Generate the shapes world once (atomically: a crash leaves no half data set behind)."""
    root = shapes_dir(data)
    if (root / "annotations").is_dir():
        return root
    if data.root:
        raise VlkitError(
            f"data.root={data.root!r} has no shapes world (no annotations/); generate one with "
            f"`vlkit data shapes out={data.root}` or leave data.root empty to use the cache"
        )
    from vlkit.data.shapes import generate_shapes

    print(f"generating the shapes world into {root} (once) ...", flush=True)
    with atomic_directory(root) as tmp:
        generate_shapes(tmp, n_train=data.n_train, n_val=data.n_val, n_test=data.n_test,
                        image_size=data.image_size, seed=data.seed, n_czsl_per_pair=data.n_czsl_per_pair,
                        overwrite=True)
    return root


def backbone_dir(name: str) -> Path:
    return cache_root() / "backbones" / name


def cached_backbone(name: str) -> Path | None:
    path = backbone_dir(name)
    return path if (path / "vlkit_backbone.json").is_file() else None


def provide_backbone(name: str) -> Path:
    """The folder of backbone ``name``: a backbone shipped inside vlkit (checked against its sha256), else
    one exported into vlkit's cache (``retrieval.export_as=NAME``). Nothing is trained here."""
    from vlkit.backbone.shipped import shipped_backbone, shipped_names

    shipped = shipped_names()
    if name in shipped:
        return shipped_backbone(name)
    found = cached_backbone(name)
    if found is not None:
        return found
    raise VlkitError(
        f"no backbone named {name!r}: vlkit ships {', '.join(shipped) or 'none'}, and {backbone_dir(name)} holds "
        f"none. Train one and export it under that name: vlkit train plugin=retrieval retrieval.export_as={name}"
    )


def backbone_kind(name: str) -> str:
    """"mllm" or "clip" for a model name, without loading it (cached:NAME resolved to its folder)."""
    from vlkit.backbone.core import is_mllm_source

    if name.startswith("cached:"):
        from vlkit.backbone.shipped import WEIGHTS_DIR

        short = name[len("cached:"):]
        folder = WEIGHTS_DIR / short if (WEIGHTS_DIR / short).is_dir() else cached_backbone(short)
        name = str(folder) if folder is not None else name
    return "mllm" if is_mllm_source(name) else "clip"
