"""The plugin contract (a validated bundle per task) and its discovery through entry points."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from vlkit.errors import VlkitError
from vlkit.registry import Registry, did_you_mean

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch.utils.data import Dataset

    from vlkit.backbone import Backbone

T = TypeVar("T")

ENTRY_POINT_GROUP = "vlkit.plugins"
BACKBONE_KINDS = ("clip", "mllm")
_KIND_NAMES = {"clip": "a CLIP backbone (open_clip: model=tiny-shapes, model.name=ViT-B-32, ...)",
               "mllm": "an MLLM backbone (model=tiny-llava, model.name=hf:FOLDER, ...)"}


class PluginError(VlkitError, RuntimeError):
    """A plugin could not be found, imported or validated."""


@runtime_checkable
class Task(Protocol):
    """What the engine trains and evaluates: an ``nn.Module`` whose ``forward(batch)`` is the
    training step (so DDP sees it) and returns a dict with a scalar ``loss`` plus anything to log.

    Optional attribute ``evaluation_only: str | None``: when set, the reason this task has nothing to learn
    (e.g. hand-written prompts); `vlkit train` then evaluates only (read with ``evaluation_only_reason``)."""

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


# ---- the hooks a plugin provides (typed; the engine, the CLI and the demo call them) ------------------
class BuildData(Protocol):
    """``build_data(cfg, backbone) -> DataBundle``: the plugin's datasets for the composed config."""

    def __call__(self, cfg: DictConfig, backbone: Backbone) -> DataBundle: ...


class BuildTask(Protocol):
    """``build_task(cfg, backbone, data) -> Task``: the module the engine trains and evaluates."""

    def __call__(self, cfg: DictConfig, backbone: Backbone, data: DataBundle) -> Task: ...


class AfterFit(Protocol):
    """``after_fit(cfg, task, run_dir, metrics, backbone) -> extra metrics``: artifacts of a finished training
    run (exported weights), on the main process only."""

    def __call__(self, cfg: DictConfig, task: Any, run_dir: Path, metrics: dict[str, Any],
                 backbone: Backbone) -> dict[str, Any] | None: ...


class Report(Protocol):
    """``report(cfg, task, out_dir, metrics) -> extra metrics``: plots and tables after training and after eval."""

    def __call__(self, cfg: DictConfig, task: Any, out_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None: ...


class RecoveryRecipe(Protocol):
    """``recovery(teacher, task_weight, blocks) -> overrides``: the config keys (the plugin's own section) that
    make the plugin's training distil a pruned backbone from ``teacher`` (the task's own loss at ``task_weight``,
    layer-wise distillation of block outputs at ``blocks``); `vlkit prune ... recover_steps=N` trains with them,
    the CLI adds plugin, model, data, steps, batch and learning rate."""

    def __call__(self, teacher: str, task_weight: float, blocks: float = 0.0) -> list[str]: ...


class Segment(Protocol):
    """``segment(image, query, backbone=None, threshold=None, **options) -> instances`` (``vlkit.segment``):
    every instance of a free-text query in one image, each with ``mask``, ``box`` and ``score``; without a
    backbone the plugin's default model."""

    def __call__(self, image: Any, query: str, backbone: Any = None, threshold: float | None = None,
                 **options: Any) -> list[Any]: ...


class DemoTab(Protocol):
    """A tab of `vlkit demo` contributed by a plugin. ``title`` names it; ``key`` is the demo's command-line key
    that points the tab at a trained run (``vlkit demo <key>=RUN``); ``load(backbone, run)`` returns the tab's
    state (it may raise VlkitError, shown in the page); ``describe(state)`` one Markdown line for the setup
    panel; ``build(state, page)`` lays the tab out inside ``gr.Tab`` (``page`` is vlkit.demos.app.Page)."""

    title: str
    key: str

    def load(self, backbone: Backbone, run: str) -> Any: ...

    def describe(self, state: Any) -> str: ...

    def build(self, state: Any, page: Any) -> None: ...


@dataclass(frozen=True)
class Plugin:
    """One task plugin: its config schema, its hooks and its declared capabilities.

    Required: ``name`` (a Python identifier: it is the config key of the plugin's section), ``config`` (the
    dataclass schema of ``cfg.<name>``), ``build_data`` and ``build_task``.
    Capabilities: ``backbones`` (kinds it runs on: "clip" open_clip models, "mllm" vlkit.backbone.mllm),
    ``headline_metric`` (the val metric that picks the 'best' checkpoint unless ``train.best_metric`` is set, and
    that summaries lead with), ``evaluation_only`` (no training: `vlkit train` refuses, `vlkit eval` runs).
    Defaults: ``configs`` names a folder (or an importable package) of YAML files searched after vlkit's own:
    ``plugin/<name>.yaml`` holds the plugin's defaults, ``experiment/*.yaml`` its recipes.
    Optional hooks: ``after_fit``, ``report``, ``recovery``, ``segment``, ``demo_tab`` (see their Protocols).
    """

    name: str
    config: type
    build_data: BuildData
    build_task: BuildTask
    description: str = ""
    after_fit: AfterFit | None = None
    report: Report | None = None
    backbones: tuple[str, ...] = ("clip",)
    headline_metric: str = ""
    evaluation_only: bool = False
    configs: str = ""
    recovery: RecoveryRecipe | None = None
    segment: Segment | None = None
    demo_tab: DemoTab | None = None

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
        for attr in ("after_fit", "report", "recovery", "segment"):
            if getattr(self, attr) is not None and not callable(getattr(self, attr)):
                raise PluginError(f"plugin {self.name!r}: {attr} must be callable or None")
        if self.demo_tab is not None and not all(hasattr(self.demo_tab, a)
                                                 for a in ("title", "key", "load", "describe", "build")):
            raise PluginError(f"plugin {self.name!r}: demo_tab must have title, key, load, describe and build "
                              f"(vlkit.plugins.DemoTab)")

    def settings(self, cfg: DictConfig) -> Any:
        """The plugin's config section of a composed config as an instance of its schema (``self.config``)."""
        return settings(cfg, self.config, self.name)


def settings(cfg: Any, schema: type[T], section: str = "") -> T:
    """The one way plugins read their config section: ``cfg.<section>`` (default: the selected plugin's,
    ``cfg.plugin``) of a composed config, or the section itself, as an instance of ``schema``. An instance of
    ``schema`` passes through unchanged."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, schema):
        return cfg
    name = section or (str(cfg.get("plugin") or "") if isinstance(cfg, DictConfig) else "")
    node = cfg[name] if isinstance(cfg, DictConfig) and name and name in cfg else cfg
    value = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    if isinstance(value, dict):
        value = schema(**value)
    if not isinstance(value, schema):
        raise PluginError(f"config section {name or '?'!r} is a {type(value).__name__}, not {schema.__name__}")
    return value


def evaluation_only_reason(task: Any) -> str | None:
    """The reason a built task has nothing to train (its optional ``evaluation_only`` attribute), or None."""
    reason = getattr(task, "evaluation_only", None)
    return str(reason) if reason else None


def plugin_config_dirs(plugin: Plugin) -> tuple[Path, ...]:
    """The folders of YAML defaults ``plugin`` ships (``Plugin.configs``: a folder, or an importable package)."""
    if not plugin.configs:
        return ()
    path = Path(plugin.configs)
    if not path.is_dir():
        try:
            from importlib import resources

            path = Path(str(resources.files(plugin.configs)))
        except (ModuleNotFoundError, TypeError) as exc:
            raise PluginError(f"plugin {plugin.name!r}: configs={plugin.configs!r} is neither a folder nor an "
                              f"importable package ({exc})") from None
    if not path.is_dir():
        raise PluginError(f"plugin {plugin.name!r}: configs={plugin.configs!r} resolves to {path}, not a folder")
    return (path.resolve(),)


def plugins_with(hook: str) -> list[Plugin]:
    """Every available plugin that provides ``hook`` (``segment``, ``demo_tab``, ``recovery``); imports them."""
    found = []
    for name in list_plugins():
        try:
            plugin = get_plugin(name)
        except PluginError as exc:  # a broken third-party plugin must not take the others down: say so, go on
            warnings.warn(f"{exc} (left out of the plugins that provide {hook})", RuntimeWarning, stacklevel=2)
            continue
        if getattr(plugin, hook, None) is not None:
            found.append(plugin)
    return found


def plugin_with(hook: str, what: str) -> Plugin:
    """The one plugin providing ``hook`` (the first by name when several do); a clear error when none does."""
    found = plugins_with(hook)
    if not found:
        raise PluginError(f"no installed plugin provides {what} (a vlkit.Plugin with {hook}=...); installed: "
                          f"{', '.join(list_plugins()) or '(none)'}")
    return found[0]


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
