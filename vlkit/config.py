"""Typed configuration: Hydra composes configs/ with key=value overrides, dataclass schemas validate them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vlkit.errors import VlkitError
from vlkit.registry import did_you_mean


class ConfigError(VlkitError, ValueError):
    """A bad configuration key or value; raised before any work starts."""


def bounded(default: Any, low: float) -> Any:
    """A schema field with a lowest allowed value, checked by ``validate`` before any work starts."""
    return field(default=default, metadata={"low": low})


def one_of(default: str, *choices: str) -> Any:
    """A string schema field that must be one of ``choices`` (``default`` is one), checked before any work."""
    if default not in choices:
        raise ValueError(f"one_of: the default {default!r} is not among the choices {choices}")
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class ModelConfig:
    # An open_clip model name (ViT-B-32, vlkit-tiny), a saved vlkit backbone folder, or local-dir:PATH.
    name: str = "vlkit-tiny"
    # None = random init (or the folder's own weights); else an open_clip tag or a local weights file.
    pretrained: str | None = None


@dataclass
class DataConfig:
    # shapes = the synthetic world vlkit generates (cached); coco = COCO-format files; czsl = CSP layout.
    name: str = "shapes"
    # Dataset root. Empty for shapes means vlkit's cache (VLKIT_CACHE or ~/.cache/vlkit/shapes-<params>).
    root: str = ""
    # COCO: image folder and annotation file per split, '{split}' is replaced (train2017 style names work too).
    images: str = "images/{split}"
    captions: str = "annotations/captions_{split}.json"
    instances: str = "annotations/instances_{split}.json"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Shapes world generation parameters (only for name=shapes).
    n_train: int = bounded(20000, 0)
    n_val: int = bounded(1000, 0)
    n_test: int = bounded(1000, 0)
    image_size: int = bounded(64, 16)
    seed: int = 0
    # images per attribute-object pair in the world's CZSL split
    n_czsl_per_pair: int = bounded(100, 0)
    # Use at most this many training items (0 = all): quick experiments and tests.
    limit_train: int = bounded(0, 0)
    limit_eval: int = bounded(0, 0)
    # raise = stop at the first unreadable image; skip = leave it out and report it.
    on_error: str = one_of("raise", "raise", "skip")
    num_workers: int = bounded(0, 0)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = bounded(5e-4, 0.0)
    weight_decay: float = bounded(0.1, 0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # cosine | constant | linear, after a linear warmup
    scheduler: str = one_of("cosine", "cosine", "constant", "linear")
    warmup_steps: int = bounded(100, 0)
    # max gradient norm; 0 disables clipping
    grad_clip: float = bounded(1.0, 0.0)


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 0)
    # stop after this many optimizer steps (0 = run all epochs)
    max_steps: int = bounded(0, 0)
    batch_size: int = bounded(128, 1)
    eval_batch_size: int = bounded(256, 1)
    grad_accum: int = bounded(1, 1)
    # no | fp16 | bf16 (Accelerate's mixed precision)
    mixed_precision: str = one_of("no", "no", "fp16", "bf16")
    seed: int = 0
    log_every: int = bounded(20, 1)
    # evaluate on val every N steps (0 = at the end of each epoch)
    eval_every: int = bounded(0, 0)
    # write the 'last' checkpoint every N optimizer steps (0 = only at the end of epochs)
    checkpoint_every: int = bounded(200, 0)
    # metric that selects the 'best' checkpoint, and whether higher is better
    best_metric: str = ""
    best_mode: str = one_of("max", "max", "min")
    # optional Accelerate tracker: tensorboard | none
    tracker: str = one_of("none", "none", "tensorboard")
    progress: bool = True
    cpu: bool = False


@dataclass
class RunConfig:
    # run folder (empty = runs/<plugin>-<time>); receives config.yaml, checkpoints, metrics.json, plots
    dir: str = ""


@dataclass
class BaseConfig:
    plugin: str = "retrieval"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # resume=true continues the run in run.dir from its last checkpoint; resume=PATH from that checkpoint
    resume: str = ""
    # eval: the checkpoint (run folder or checkpoint folder) to evaluate, and on which split
    checkpoint: str = ""
    split: str = "test"


GROUPS = ("model", "data", "optim", "plugin", "experiment")


def config_dir() -> Path:
    return Path(str(resources.files("vlkit.configs")))


def schema_for(plugin_name: str, plugin_config: type | None) -> type:
    """The full schema: the base config plus the plugin's own section under its name."""
    if plugin_config is None:
        return BaseConfig
    return dataclasses.make_dataclass(
        f"Config_{plugin_name}",
        [(plugin_name, plugin_config, field(default_factory=plugin_config))],
        bases=(BaseConfig,),
    )


def valid_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key of a dataclass schema."""
    keys = []
    for f in dataclasses.fields(schema):
        ftype = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
            keys += valid_keys(ftype, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _key_error(key: str, schema: type) -> ConfigError:
    keys = valid_keys(schema)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in keys if k.startswith(parent) and "." not in k[len(parent):]]
    return ConfigError(
        f"unknown config key {key!r}.{did_you_mean(key, keys)} "
        f"Valid keys{' under ' + parent[:-1] if parent else ''}: {', '.join(siblings)}"
    )


def validate(raw: DictConfig | dict, schema: type) -> DictConfig:
    """Merge a composed config into the schema: unknown keys and wrong types fail, naming the key."""
    base = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(base, raw)
    except ConfigKeyError as exc:
        raise _key_error(str(exc.full_key), schema) from None
    except ValidationError as exc:
        raise ConfigError(
            f"bad value for config key {exc.full_key!r}: {exc.msg.splitlines()[0]}"
        ) from None
    OmegaConf.set_readonly(cfg, False)
    check_ranges(cfg, schema)
    return cfg


def check_ranges(cfg: Any, schema: type, prefix: str = "") -> None:
    """Every field declared with ``bounded`` holds a value at or above its lowest (else a ConfigError naming it)."""
    for f in dataclasses.fields(schema):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        value = cfg[f.name] if isinstance(cfg, DictConfig) else getattr(cfg, f.name)
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            check_ranges(value, factory, f"{prefix}{f.name}.")
            continue
        low = f.metadata.get("low")
        if low is not None and value is not None and value < low:
            raise ConfigError(f"bad value for config key {prefix + f.name!r}: {value} (it must be >= {low})")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"bad value for config key {prefix + f.name!r}: {value!r} (one of "
                              f"{', '.join(choices)}){did_you_mean(str(value), list(choices))}")


def _compose_raw(name: str, overrides: list[str], search_path: tuple[Path, ...] = ()) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if search_path:  # plugin-shipped config folders (their plugin/<name>.yaml, experiments, models ...)
        overrides = [*overrides, "hydra.searchpath=[" + ",".join(f"file://{p}" for p in search_path) + "]"]
    try:
        with initialize_config_dir(str(config_dir()), version_base=None, job_name="vlkit"):
            return compose(name, overrides=overrides)
    except MissingConfigException as exc:
        msg = str(exc).split("\nConfig search path")[0]
        where = ", ".join(str(p) for p in (config_dir(), *search_path))
        raise ConfigError(f"{msg}\n(config files live in {where})") from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            raise ConfigError(f"unknown config key {cause.full_key!r}") from None
        raise ConfigError(str(exc)) from None
    except OverrideParseException as exc:
        raise ConfigError(f"could not parse the overrides {overrides}: {exc}") from None


def _check_no_shadowing(search_path: tuple[Path, ...]) -> None:
    """A plugin's config file named like one of vlkit's would be silently ignored (vlkit's are searched first)."""
    for extra in search_path:
        for group in GROUPS:
            for path in sorted((Path(extra) / group).glob("*.yaml")):
                if (config_dir() / group / path.name).is_file():
                    raise ConfigError(f"{path} has the name of vlkit's own {group}/{path.name}, which Hydra finds "
                                      f"first, so the plugin's file would never be used; rename it (e.g. prefix "
                                      f"it with the plugin's name)")


def _ensure_group_entry(plugin_name: str, search_path: tuple[Path, ...]) -> None:
    """A plugin that ships no plugin/<name>.yaml still composes: it gets a minimal group entry."""
    from hydra.core.config_store import ConfigStore

    if plugin_name not in group_options(search_path).get("plugin", []):
        ConfigStore.instance().store(group="plugin", name=plugin_name, node={"plugin": plugin_name},
                                     package="_global_")


def compose_config(overrides: list[str] | tuple[str, ...] = (), name: str = "train",
                   plugin_config: type | None = None, search_path: tuple[Path, ...] = (),
                   plugin_name: str = "") -> DictConfig:
    """Compose configs/<name>.yaml with Hydra-style ``key=value`` overrides and validate it.

    ``plugin_config`` is the dataclass schema of the selected plugin's section; the caller (the CLI)
    resolves the plugin first so an unknown plugin fails with a did-you-mean before anything else.
    ``search_path``: config folders the plugin ships (searched after vlkit's own); ``plugin_name``: the selected
    plugin, given a minimal config entry when no folder holds its plugin/<name>.yaml.
    """
    if plugin_name:
        _ensure_group_entry(plugin_name, tuple(search_path))
    # keys were checked against the schema already; '++' lets Hydra set keys the yaml files leave to
    # the schema's defaults (group selections such as plugin=csp stay as they are)
    overrides = [o if o.split("=", 1)[0].lstrip("+~") in GROUPS or o.startswith(("+", "~"))
                 else "++" + o for o in overrides]
    _check_no_shadowing(tuple(search_path))
    raw = _compose_raw(name, overrides, tuple(search_path))
    if not isinstance(raw.get("plugin", ""), str):
        raise ConfigError(f"the key 'plugin' composed to a {type(raw.get('plugin')).__name__}, not a name: a "
                          f"plugin's plugin/<name>.yaml must begin with the line '# @package _global_' so its keys "
                          f"(plugin: <name>, <name>: ..., train: ...) land at the top level")
    plugin = plugin_name or str(raw.get("plugin", "retrieval"))
    if plugin_name:
        with open_dict(raw):  # the selected plugin, whether or not its YAML repeats `plugin: <name>`
            raw.plugin = plugin_name
    schema = schema_for(plugin, plugin_config)
    try:
        return validate(raw, schema)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:  # anything else OmegaConf raises, with its key
        raise ConfigError(f"invalid config: {exc}") from None


def _known_key(key: str, schema: type) -> bool:
    return key in valid_keys(schema) or any(k.startswith(key + ".") for k in valid_keys(schema))


def check_overrides(overrides: list[str], schema: type) -> None:
    """Fail early on override keys the schema does not know (Hydra reports them less helpfully)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key = item.split("=", 1)[0].lstrip("+~")
        if key in GROUPS or key.startswith("hydra."):
            continue
        if not _known_key(key, schema):
            raise _key_error(key, schema)


def _string_fields(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)
            if "str" in (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))}


def parse_kv(args: list[str], schema: type) -> Any:
    """Parse ``key=value`` arguments of a simple command into its dataclass schema (typed, validated).

    Values of string fields are taken verbatim (YAML would read ``2:4`` as the number 124)."""
    check_overrides(args, schema)
    strings = _string_fields(schema)
    verbatim = {k: v for k, v in (a.split("=", 1) for a in args) if k in strings}
    try:
        raw = OmegaConf.from_dotlist([a for a in args if a.split("=", 1)[0] not in verbatim])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse {args}: {exc}") from None
    for key, value in verbatim.items():
        raw[key] = None if value in ("null", "None") and key != "text" else value
    return OmegaConf.to_object(validate(raw, schema))


def describe(schema: type, prefix: str = "", values: Any = None) -> list[str]:
    """One line per key: name, type and default, for --help. ``values`` (a composed config) gives the
    defaults as the config files set them for this command line (a plugin's YAML overrides the schema)."""
    lines = []
    for f in dataclasses.fields(schema):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        given = values.get(f.name) if values is not None and hasattr(values, "get") else None
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            lines += describe(factory, f"{prefix}{f.name}.", given)
            continue
        default = factory() if factory else f.default
        if given is not None:
            default = OmegaConf.to_container(given) if OmegaConf.is_config(given) else given
        tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        choices = f.metadata.get("choices")
        lines.append(f"  {prefix}{f.name} ({tname}) = {default!r}" + (f" (one of {', '.join(choices)})" if choices else ""))
    return lines


def group_options(search_path: tuple[Path, ...] | list[Path] = ()) -> dict[str, list[str]]:
    """Options of each config group in vlkit's configs/ and in the given plugin config folders."""
    roots = [config_dir(), *search_path]
    found = {g: sorted({p.stem for root in roots for p in (Path(root) / g).glob("*.yaml")}) for g in GROUPS}
    return {g: options for g, options in found.items() if options}


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
