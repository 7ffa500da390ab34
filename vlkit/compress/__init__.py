"""Compression of open_clip backbones: head/neuron masks, structured pruning, sparsity, FLOPs, ONNX export."""

from vlkit.compress.conv import prune_conv_channels
from vlkit.compress.flops import TowerFlops, count_flops, flop_model
from vlkit.compress.importance import magnitude_importance, optin_importance, random_importance
from vlkit.compress.masks import apply_masks, full_masks, masked, remove_masks
from vlkit.compress.materialize import PrunedAttention, materialize, pruned_spec, rebuild_pruned, refresh_spec
from vlkit.compress.prune import plot_kept_units, prune_backbone, select_under_budget
from vlkit.compress.sparsity import apply_sparsity, make_permanent, sparsity_report


def export_onnx(*args, **kwargs):
    """See vlkit.compress.export.export_onnx (imported lazily: onnx is an optional dependency)."""
    from vlkit.compress.export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


__all__ = [
    "PrunedAttention", "TowerFlops", "apply_masks", "apply_sparsity", "count_flops", "export_onnx",
    "flop_model", "full_masks", "magnitude_importance", "make_permanent", "masked", "materialize",
    "optin_importance", "plot_kept_units", "prune_backbone", "prune_conv_channels", "pruned_spec",
    "random_importance", "rebuild_pruned", "refresh_spec", "remove_masks", "select_under_budget",
    "sparsity_report",
]
