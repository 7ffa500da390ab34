"""Channel pruning of convolutional image towers (open_clip ModifiedResNet, timm ConvNeXt) via Torch-Pruning."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlkit.compress.materialize import RESIZED_ATTR, refresh_spec

_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
)


def _module_attrs(module: nn.Module) -> dict[str, Any]:
    for kind, names in _ATTRS:
        if isinstance(module, kind):
            return {n: list(v) if isinstance(v := getattr(module, n), tuple) else v for n in names}
    return {}


def _snapshot(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]]]:
    shapes = {n: list(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return shapes, {n: _module_attrs(m) for n, m in model.named_modules()}


def _diff(before, after) -> dict[str, Any]:
    (s0, a0), (s1, a1) = before, after
    params = {n: s for n, s in s1.items() if s0.get(n) != s}
    modules = {n: {k: v for k, v in a.items() if a0.get(n, {}).get(k) != v} for n, a in a1.items()}
    return {"params": params, "modules": {n: a for n, a in modules.items() if a}}


def _default_ignored(visual: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must stay: the attention pool of ModifiedResNet (its heads split the
    channel dim) and every layer writing the last stage's residual stream into it; timm towers' projection."""
    ignored: list[nn.Module] = []
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        ignored.append(visual.attnpool)
        for block in visual.layer4:
            ignored.append(block.conv3)
            if block.downsample is not None:
                ignored.append(block.downsample)
    for name in ("head", "proj"):
        if isinstance(getattr(visual, name, None), nn.Module):
            ignored.append(getattr(visual, name))
    return ignored


def prune_conv_channels(model: nn.Module, ratio: float, example_input: torch.Tensor, *,
                        importance: str = "magnitude", ignored_layers: Sequence[nn.Module] | None = None,
                        round_to: int | None = None) -> dict[str, Any]:
    """Remove ``ratio`` of the prunable channels of a conv image tower with a Torch-Pruning dependency graph.

    ``model`` is the CLIP model (its ``.visual`` is pruned and its pruned spec refreshed) or the visual tower
    itself. The tower's output shape is unchanged. Returns params before/after and the resized layers."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise ImportError("channel pruning needs Torch-Pruning: pip install vlkit[prune]") from exc
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    root = model if hasattr(model, "visual") and isinstance(model.visual, nn.Module) else None
    visual = root.visual if root is not None else model
    if hasattr(visual, "transformer"):
        raise ValueError("transformer towers are pruned by head/neuron (prune_backbone), not by channels")
    imp = {"magnitude": tp.importance.MagnitudeImportance(p=1), "random": tp.importance.RandomImportance()}
    if importance not in imp:
        raise ValueError(f"importance must be one of {sorted(imp)}")
    was_training = visual.training
    visual.eval()
    before, n0 = _snapshot(visual), sum(p.numel() for p in visual.parameters())
    with torch.no_grad():
        out_shape = tuple(visual(example_input).shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # tp's default dim is right
        pruner = tp.pruner.MetaPruner(
            visual, example_input, importance=imp[importance], pruning_ratio=ratio,
            ignored_layers=list(ignored_layers) if ignored_layers is not None else _default_ignored(visual),
            round_to=round_to,
        )
        pruner.step()
    with torch.no_grad():
        new_shape = tuple(visual(example_input).shape)
    visual.train(was_training)
    if new_shape != out_shape:
        raise RuntimeError(f"channel pruning changed the tower output {out_shape} -> {new_shape}")
    resized = _diff(before, _snapshot(visual))
    setattr(visual, RESIZED_ATTR, resized)
    if root is not None:
        refresh_spec(root)
    return {"params_before": n0, "params_after": sum(p.numel() for p in visual.parameters()),
            "output_shape": list(new_shape), "resized": resized}
