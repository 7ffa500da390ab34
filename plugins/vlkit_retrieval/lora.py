"""LoRA for the retrieval plugin: the ``retrieval.lora_*`` keys as a LoraSpec for vlkit.backbone.lora."""

from __future__ import annotations

from vlkit.backbone import Backbone
from vlkit.backbone.lora import LoraSpec, has_lora, load_adapter, merge_lora, save_adapter
from vlkit_retrieval.config import RetrievalConfig

__all__ = ["add_lora", "has_lora", "load_adapter", "merge_lora", "save_adapter", "spec_of"]


def spec_of(cfg: RetrievalConfig) -> LoraSpec:
    return LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    targets=list(cfg.lora_targets), tower="both")


def add_lora(backbone: Backbone, cfg: RetrievalConfig) -> list[str]:
    """Freeze the backbone and put trainable adapters on the named linear layers of both towers."""
    from vlkit.backbone.lora import add_lora as _add

    return _add(backbone, spec_of(cfg))
