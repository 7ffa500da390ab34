"""vlkit: task plugins for vision-language work on one shared CLIP backbone.

``import vlkit`` stays cheap (no torch): ``load_backbone`` and ``Retriever`` are imported on first use.
"""

from typing import Any

from vlkit.plugins import DataBundle, Plugin, Task, get_plugin, list_plugins, register_plugin
from vlkit.registry import Registry

__version__ = "0.6.0"

load_plugin = get_plugin  # the name the docs use: vlkit.load_plugin("csp")

_LAZY = {"load_backbone": ("vlkit.backbone", "load_backbone"), "Retriever": ("vlkit.retriever", "Retriever")}

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
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
