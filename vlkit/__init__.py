"""vlkit: task plugins for vision-language work on one shared backbone (CLIP or a multimodal LLM).

The public API: ``load_backbone``, ``load_plugin``, ``list_plugins``, ``register_plugin``, ``Retriever`` and
``segment``. ``import vlkit`` stays cheap (no torch): ``load_backbone`` and ``Retriever`` are imported on first use.
"""

from typing import Any

from vlkit.plugins import DataBundle, Plugin, Task, get_plugin, list_plugins, register_plugin
from vlkit.registry import Registry

__version__ = "0.10.0"

load_plugin = get_plugin  # the name the docs use: vlkit.load_plugin("csp")

_LAZY = {"load_backbone": ("vlkit.backbone", "load_backbone"), "Retriever": ("vlkit.index.retriever", "Retriever")}

__all__ = [
    "DataBundle",
    "Plugin",
    "Registry",
    "Retriever",
    "Task",
    "get_plugin",
    "list_plugins",
    "load_backbone",
    "load_plugin",
    "register_plugin",
    "segment",
]


def segment(image: Any, query: str, backbone: Any = None, threshold: float | None = None, **options: Any) -> list:
    """Every instance of ``query`` in ``image`` (a path or a PIL image), best first, each with ``mask``, ``box``
    and ``score``, by the installed plugin that provides segmentation (``Plugin.segment``); without a
    ``backbone`` that plugin's default model. ``options`` go to the plugin (e.g. ``head=``)."""
    from vlkit.plugins import plugin_with

    provider = plugin_with("segment", "segmentation (vlkit.segment)")
    return provider.segment(image, query, backbone=backbone, threshold=threshold, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
