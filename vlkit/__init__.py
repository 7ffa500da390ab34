"""vlkit: task plugins for vision-language work on one shared CLIP backbone."""

from vlkit.plugins import DataBundle, Plugin, Task, get_plugin, list_plugins, register_plugin
from vlkit.registry import Registry

__version__ = "0.1.0"

__all__ = [
    "DataBundle",
    "Plugin",
    "Registry",
    "Task",
    "get_plugin",
    "list_plugins",
    "register_plugin",
]
