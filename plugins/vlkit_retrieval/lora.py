"""LoRA adapters (peft) on the backbone: add, save alone, load, and merge back into plain weights."""

from __future__ import annotations

from pathlib import Path

from vlkit.backbone import Backbone
from vlkit.errors import VlkitError
from vlkit.io import atomic_directory
from vlkit_retrieval.config import RetrievalConfig

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def _lora_config(cfg: RetrievalConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")


def add_lora(backbone: Backbone, cfg: RetrievalConfig) -> None:
    """Freeze the backbone and inject trainable LoRA adapters into the named linear layers."""
    from peft import inject_adapter_in_model

    backbone.model.requires_grad_(False)
    try:
        inject_adapter_in_model(_lora_config(cfg), backbone.model)
    except ValueError as exc:
        raise VlkitError(f"retrieval.lora_targets={list(cfg.lora_targets)} matched no layer: {exc}") from exc
    backbone.lora_config = cfg


def save_adapter(backbone: Backbone, directory: str | Path) -> Path:
    """Write only the adapter weights (a few hundred KB) and what they were trained on."""
    import json

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(backbone.model).items()}
        save_file(state, str(tmp / ADAPTER_FILE))
        cfg = backbone.lora_config
        meta = {"backbone": backbone.name, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                "targets": list(cfg.lora_targets), "dropout": cfg.lora_dropout}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load_adapter(backbone: Backbone, directory: str | Path) -> None:
    """Inject adapters with the saved settings into a plain backbone and load their weights."""
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_META).is_file():
        raise VlkitError(f"{directory} holds no LoRA adapter ({ADAPTER_META} missing)")
    meta = json.loads((directory / ADAPTER_META).read_text())
    if meta["backbone"] != backbone.name:
        raise VlkitError(f"adapter in {directory} was trained on {meta['backbone']!r}, not {backbone.name!r}")
    cfg = RetrievalConfig(lora_rank=meta["rank"], lora_alpha=meta["alpha"], lora_targets=meta["targets"],
                          lora_dropout=meta["dropout"])
    add_lora(backbone, cfg)
    result = set_peft_model_state_dict(backbone.model, load_file(str(directory / ADAPTER_FILE)))
    if getattr(result, "unexpected_keys", None):
        raise VlkitError(f"adapter in {directory} has tensors this backbone lacks: {result.unexpected_keys[:3]}")


def merge_lora(backbone: Backbone) -> Backbone:
    """Fold adapters into the base weights and remove the LoRA layers: a plain backbone again."""
    from peft.tuners.lora import LoraLayer

    model = backbone.model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    backbone.lora_config = None
    return backbone


def has_lora(backbone: Backbone) -> bool:
    return getattr(backbone, "lora_config", None) is not None
