"""Compression of open_clip backbones: head/neuron masks, structured pruning, sparsity, FLOPs, ONNX export.

The names below are imported on first use, so ``vlkit.compress.methods`` (the method names the CLI checks)
loads without torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "prune_conv_channels": "conv",
    "TowerFlops": "flops", "count_flops": "flops", "flop_model": "flops",
    "magnitude_importance": "importance", "optin_importance": "importance", "random_importance": "importance",
    "apply_masks": "masks", "full_masks": "masks", "masked": "masks", "remove_masks": "masks",
    # not the function materialize: importing its submodule vlkit.compress.materialize (as vlkit.compress.prune
    # does) sets that name on this package to the module; import it from vlkit.compress.materialize
    "PrunedAttention": "materialize", "pruned_spec": "materialize",
    "rebuild_pruned": "materialize", "refresh_spec": "materialize",
    "plot_kept_units": "prune", "prune_backbone": "prune", "select_under_budget": "prune",
    "choose_split": "prune", "relation_damage": "prune", "tower_splits": "prune",
    "apply_sparsity": "sparsity", "make_permanent": "sparsity", "sparsity_report": "sparsity",
    "export_onnx": "export",  # onnx is an optional dependency: imported only when exporting
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"vlkit.compress.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlkit.compress' has no attribute {name!r}")
