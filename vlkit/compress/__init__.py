"""Compression of open_clip backbones: head/neuron masks, structured pruning, sparsity, FLOPs, ONNX export."""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; imported on first use (PEP 562) so `import vlkit.compress.commands`, which the CLI
# does at start-up, does not pay for torch
_EXPORTS = {
    "prune_conv_channels": "conv", "TowerFlops": "flops", "count_flops": "flops", "flop_model": "flops",
    "magnitude_importance": "importance", "optin_importance": "importance", "random_importance": "importance",
    "apply_masks": "masks", "full_masks": "masks", "masked": "masks", "remove_masks": "masks",
    "PrunedAttention": "materialize", "materialize": "materialize", "pruned_spec": "materialize",
    "rebuild_pruned": "materialize", "refresh_spec": "materialize", "plot_kept_units": "prune",
    "prune_backbone": "prune", "select_under_budget": "prune", "apply_sparsity": "sparsity",
    "make_permanent": "sparsity", "sparsity_report": "sparsity", "export_onnx": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlkit.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlkit.compress.{_EXPORTS[name]}"), name)
