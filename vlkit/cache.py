"""vlkit's cache: generated data sets and named trained backbones that defaults start from."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from vlkit.errors import VlkitError
from vlkit.io import atomic_directory


def cache_root() -> Path:
    """VLKIT_CACHE, else ~/.cache/vlkit."""
    return Path(os.environ.get("VLKIT_CACHE", Path.home() / ".cache" / "vlkit")).expanduser()


def shapes_dir(data: DictConfig) -> Path:
    """Where the shapes world of these parameters lives (data.root, or a cache folder named by them)."""
    if data.root:
        return Path(data.root)
    tag = f"shapes-{data.n_train}-{data.n_val}-{data.n_test}-px{data.image_size}-seed{data.seed}"
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
    """A named trained backbone from the cache, or built by the plugin that provides it."""
    found = cached_backbone(name)
    if found is not None:
        return found
    from vlkit.plugins import get_plugin, list_plugins

    for plugin_name in list_plugins():
        plugin = get_plugin(plugin_name)
        if name in plugin.provides:
            print(f"no cached backbone {name!r} in {backbone_dir(name)}: training it first with plugin "
                  f"{plugin_name!r} (a one-time job; `vlkit train plugin={plugin_name}` does the same)", flush=True)
            plugin.provides[name](backbone_dir(name))
            found = cached_backbone(name)
            if found is None:
                raise VlkitError(f"plugin {plugin_name!r} did not produce backbone {name!r}")
            return found
    raise VlkitError(f"no plugin provides the backbone {name!r} and none is cached in {backbone_dir(name)}")
