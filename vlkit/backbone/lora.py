"""LoRA adapters (peft) on a backbone's linear layers: add, save alone, load, merge back into plain weights.

Every plugin that fine-tunes the backbone with adapters goes through here. Which layers get an adapter
is resolved once into a list of full module names (``lora_modules``), stored with the saved adapter, so
loading re-creates exactly the same layers whatever peft's name matching would do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from vlkit.backbone.core import Backbone
from vlkit.errors import VlkitError
from vlkit.io import atomic_directory

__all__ = ["LoraSpec", "add_lora", "has_lora", "load_adapter", "lora_modules", "merge_lora", "save_adapter"]

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"
TOWERS = ("both", "image", "text")


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # last component of the linear layers' names (open_clip: c_fc / c_proj are the MLPs; attention runs
    # its projections inside nn.MultiheadAttention's fused kernel, so adapters cannot go there)
    # empty: the backbone's defaults (default_targets)
    targets: list[str] = field(default_factory=list)
    tower: str = "both"  # both | image | text
    # module-name prefixes left without adapters (e.g. a block whose output is never used)
    exclude: list[str] = field(default_factory=list)


def _in_tower(name: str, tower: str, is_image: Callable[[str], bool]) -> bool:
    return tower == "both" or (tower == "image") == is_image(name)


def _clip_image(name: str) -> bool:
    return name.startswith("visual.")


def lora_modules(model: nn.Module, spec: LoraSpec, is_image: Callable[[str], bool] = _clip_image) -> list[str]:
    """Full names of the linear layers ``spec`` puts adapters on, in module order (``is_image`` tells the
    image tower's names: Backbone.is_image_parameter)."""
    if spec.tower not in TOWERS:
        raise VlkitError(f"LoRA tower {spec.tower!r} is not one of {', '.join(TOWERS)}")
    if spec.rank < 1:
        raise VlkitError(f"LoRA rank must be >= 1, got {spec.rank}")
    targets = list(spec.targets) or default_targets(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and _in_tower(n, spec.tower, is_image)
             and not any(n == p or n.startswith(p.rstrip(".") + ".") for p in spec.exclude)]
    if not names:
        raise VlkitError(f"LoRA targets {targets} match no linear layer of the {spec.tower} tower(s); "
                         f"name the last part of a linear layer's name (this backbone's defaults: {default_targets(model)})")
    return names


def default_targets(model: nn.Module) -> list[str]:
    """The linear layers adapters go on by default: open_clip's MLPs (its attention runs inside a fused
    kernel), or every projection of a transformers model's attention and MLP."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if {"c_fc", "c_proj"} <= names:
        return ["c_fc", "c_proj"]
    hf = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]
    return [n for n in hf if n in names]


def add_lora(backbone: Backbone, spec: LoraSpec, modules: Sequence[str] | None = None) -> list[str]:
    """Freeze the backbone and inject trainable LoRA adapters (peft) into ``modules`` (default: the layers
    ``spec`` selects). Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = list(modules) if modules is not None else lora_modules(backbone.model, spec, backbone.is_image_parameter)
    backbone.model.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        bias="none")
    inject_adapter_in_model(config, backbone.model)
    backbone.lora_config = spec
    backbone.lora_modules = names
    return names


def has_lora(backbone: Backbone) -> bool:
    return getattr(backbone, "lora_config", None) is not None


def save_adapter(backbone: Backbone, directory: str | Path) -> Path:
    """Write only the adapter weights (a few hundred KB), the layers they sit on and their settings."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(backbone):
        raise VlkitError("this backbone has no LoRA adapters to save (add them with add_lora first)")
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(backbone.model).items()}
        save_file(state, str(tmp / ADAPTER_FILE))
        meta = {"backbone": backbone.name, "spec": asdict(backbone.lora_config), "modules": backbone.lora_modules}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load_adapter(backbone: Backbone, directory: str | Path) -> None:
    """Inject adapters with the saved settings into a plain backbone and load their weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_META).is_file():
        raise VlkitError(f"{directory} holds no LoRA adapter ({ADAPTER_META} missing)")
    meta = json.loads((directory / ADAPTER_META).read_text())
    if meta.get("backbone") != backbone.name:
        raise VlkitError(f"the adapter in {directory} was trained on {meta.get('backbone')!r}, not on "
                         f"{backbone.name!r}: load it onto the backbone it was trained with")
    missing = [m for m in meta["modules"] if m not in dict(backbone.model.named_modules())]
    if missing:
        raise VlkitError(f"the adapter in {directory} sits on layers this backbone lacks: {missing[:3]}")
    add_lora(backbone, LoraSpec(**meta["spec"]), modules=meta["modules"])
    result = set_peft_model_state_dict(backbone.model, load_file(str(directory / ADAPTER_FILE)))
    if getattr(result, "unexpected_keys", None):
        raise VlkitError(f"the adapter in {directory} has tensors this backbone lacks: {result.unexpected_keys[:3]}")


def merge_lora(backbone: Backbone) -> Backbone:
    """Fold the adapters into the base weights and remove the LoRA layers: a plain backbone again, all of
    whose parameters are trainable (as after loading)."""
    from peft.tuners.lora import LoraLayer

    model = backbone.model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    model.requires_grad_(True)
    backbone.lora_config = None
    backbone.lora_modules = []
    return backbone
