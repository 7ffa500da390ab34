"""The plugin contract (a validated bundle per task) and its discovery through entry points."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vlkit.errors import VlkitError
from vlkit.registry import Registry, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

ENTRY_POINT_GROUP = "vlkit.plugins"
BACKBONE_KINDS = ("clip", "mllm")
_KIND_NAMES = {"clip": "a CLIP backbone (open_clip: model=tiny-shapes, model.name=ViT-B-32, ...)",
               "mllm": "an MLLM backbone (model=tiny-llava, model.name=hf:FOLDER, ...)"}


class PluginError(VlkitError, RuntimeError):
    """A plugin could not be found, imported or validated."""


@runtime_checkable
class Task(Protocol):
    """What the engine trains and evaluates: an ``nn.Module`` whose ``forward(batch)`` is the
    training step (so DDP sees it) and returns a dict with a scalar ``loss`` plus anything to log."""

    def forward(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-sample outputs (first dim = batch) that the engine gathers over processes."""
        ...

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Metrics from the concatenated, de-duplicated outputs of a whole split."""
        ...


@dataclass
class DataBundle:
    """The datasets a plugin trains and evaluates on. ``collate`` is shared by all splits."""

    train: Dataset | None
    val: Dataset | None = None
    test: Dataset | None = None
    collate: Callable[[list[Any]], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plugin:
    """One task plugin. ``config`` is the dataclass schema of the plugin's own config section
    (``cfg.<name>``); ``build_data(cfg, backbone)`` and ``build_task(cfg, backbone, data)`` make the
    data and the task the engine runs."""

    name: str
    config: type
    build_data: Callable[..., DataBundle]
    build_task: Callable[..., Any]
    description: str = ""
    # after_fit(cfg, task, run_dir, metrics, backbone) -> extra metrics: artifacts of a finished training
    # run (exported weights); called on the main process only
    after_fit: Callable[..., Any] | None = None
    # report(cfg, task, out_dir, metrics) -> extra metrics: plots and tables, after training and after eval
    report: Callable[..., Any] | None = None
    demo: Callable[..., Any] | None = None
    # the backbone kinds the plugin runs on: "clip" (open_clip models) and/or "mllm" (vlkit.backbone.mllm)
    backbones: tuple[str, ...] = ("clip",)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise PluginError(f"plugin name {self.name!r} must be a Python identifier (it is a config key)")
        if not dataclasses.is_dataclass(self.config):
            raise PluginError(
                f"plugin {self.name!r}: config must be a dataclass type (the schema of cfg.{self.name}), "
                f"got {self.config!r}"
            )
        unknown = [k for k in self.backbones if k not in BACKBONE_KINDS]
        if not self.backbones or unknown:
            raise PluginError(f"plugin {self.name!r}: backbones={self.backbones!r}; name one or more of "
                              f"{', '.join(BACKBONE_KINDS)}")
        for attr in ("build_data", "build_task"):
            if not callable(getattr(self, attr)):
                raise PluginError(f"plugin {self.name!r}: {attr} must be callable")


_REGISTERED: Registry[Plugin] = Registry("plugin")


def register_plugin(plugin: Plugin | None = None, /, **fields: Any) -> Plugin:
    """Register a plugin in-process (notebooks, tests): ``register_plugin(Plugin(...))`` or
    ``register_plugin(name=..., config=..., build_data=..., build_task=...)``."""
    if plugin is None:
        plugin = Plugin(**fields)
    elif fields:
        raise TypeError("pass either a Plugin or its fields, not both")
    if not isinstance(plugin, Plugin):
        raise PluginError(f"register_plugin expects a vlkit.Plugin, got {type(plugin).__name__}")
    if plugin.name in _entry_points():
        raise PluginError(
            f"plugin {plugin.name!r} is already installed through entry point "
            f"{_entry_points()[plugin.name].value!r}; choose another name"
        )
    _REGISTERED.register(plugin.name, plugin)
    return plugin


def unregister_plugin(name: str) -> None:
    _REGISTERED.unregister(name)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two installed packages register the plugin {ep.name!r}: "
                f"{found[ep.name].value!r} and {ep.value!r}; uninstall one"
            )
        found[ep.name] = ep
    return found


def list_plugins() -> list[str]:
    """Names of every available plugin (installed entry points and in-process registrations),
    without importing any of them."""
    return sorted(set(_entry_points()) | set(_REGISTERED.names()))


def plugin_entry_points() -> dict[str, str]:
    """name -> 'module:attr' for installed plugins; in-process ones show as '(in-process)'."""
    out = {name: ep.value for name, ep in _entry_points().items()}
    out.update({name: "(in-process)" for name in _REGISTERED.names()})
    return dict(sorted(out.items()))


_LOADED: dict[str, Plugin] = {}


def get_plugin(name: str) -> Plugin:
    """Load a plugin by name (lazily importing its entry point once)."""
    if name in _REGISTERED:
        return _REGISTERED.get(name)
    if name in _LOADED:
        return _LOADED[name]
    eps = _entry_points()
    if name not in eps:
        names = list_plugins()
        raise PluginError(
            f"unknown plugin {name!r}.{did_you_mean(name, names)} "
            f"Installed plugins: {', '.join(names) or '(none)'}. "
            f"A plugin is installed through the entry-point group {ENTRY_POINT_GROUP!r} "
            f"or registered with vlkit.register_plugin()."
        )
    ep = eps[name]
    try:
        obj = ep.load()
    except Exception as exc:  # the original error is chained and summarised
        raise PluginError(
            f"plugin {name!r} failed to import from entry point {ep.value!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if callable(obj) and not isinstance(obj, Plugin):
        obj = obj()
    if not isinstance(obj, Plugin):
        raise PluginError(
            f"entry point {ep.value!r} for plugin {name!r} must be a vlkit.Plugin (or a function "
            f"returning one), got {type(obj).__name__}"
        )
    if obj.name != name:
        raise PluginError(f"entry point {name!r} ({ep.value!r}) returned a plugin named {obj.name!r}")
    _LOADED[name] = obj
    return obj


def check_backbone(plugin: Plugin, backbone: Any) -> None:
    """A clear error when ``plugin`` does not run on ``backbone``'s kind (checked before any data is built)."""
    kind = getattr(backbone, "kind", "clip")
    if kind not in plugin.backbones:
        need = " or ".join(_KIND_NAMES[k] for k in plugin.backbones)
        raise PluginError(f"plugin {plugin.name!r} does not run on {kind} backbones ({backbone.name}): it needs {need}. "
                          f"README, 'Which plugin runs on which backbone', has the table.")
