"""Unstructured (layer-wise / global magnitude) and N:M weight sparsity through torch.nn.utils.prune."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

# weight matrices that carry a model's compute; embeddings, norms, biases and positional tables are left dense
_WEIGHT_NAMES = ("weight", "in_proj_weight")


def sparsifiable(model: nn.Module, towers: Sequence[str] | None = None) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, parameter name) of every Linear/Conv weight and attention in_proj_weight.

    ``towers`` ("image", "text") restricts to open_clip's ``visual`` / text modules; works on any model."""
    out = []
    for name, module in model.named_modules():
        if (towers is not None and _tower_of(name) not in towers) or name in _TIED_HEADS:
            continue
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            pname = "weight"
        elif _has_weight(module, "in_proj_weight"):
            pname = "in_proj_weight"
        else:
            continue
        if _has_weight(module, pname):
            out.append((f"{name}.{pname}" if name else pname, module, pname))
    return out


def _tower_of(name: str) -> str:
    """open_clip keeps the image tower under ``visual``; a transformers MLLM under ``model.vision_tower``
    (its projector counts with it)."""
    image = name == "visual" or name.startswith(("visual.", "model.vision_tower", "model.multi_modal_projector"))
    return "image" if image else "text"


# output heads tied to the input embedding: zeroing them would zero the embedding table too
_TIED_HEADS = ("lm_head",)


def _has_weight(module: nn.Module, pname: str) -> bool:
    t = getattr(module, pname + "_orig", None)
    t = getattr(module, pname, None) if t is None else t
    return isinstance(t, torch.Tensor) and t.ndim >= 2 and t.numel() > 0


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every group of ``m`` consecutive input weights."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    if flat.shape[1] % m:
        raise ValueError(f"input size {flat.shape[1]} is not a multiple of m={m}")
    groups = flat.abs().reshape(flat.shape[0], -1, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(weight.shape)


def apply_sparsity(model: nn.Module, amount: float = 0.5, *, scope: str = "layer",
                   pattern: str | None = None, towers: Sequence[str] | None = None) -> dict[str, Any]:
    """Zero weights by magnitude and return ``sparsity_report``.

    ``scope="layer"``: each weight loses round(amount * numel) entries; ``"global"``: the smallest
    round(amount * total) magnitudes across all targets. ``pattern="2:4"`` (any "N:M") ignores amount and
    zeroes M-N of every M consecutive input weights (layers whose input size is not a multiple of M are
    skipped and listed in the report). Masks are re-applied on every forward until make_permanent."""
    targets = sparsifiable(model, towers)
    if not targets:
        raise ValueError("no Linear/Conv/attention weights to sparsify")
    skipped: list[str] = []
    if pattern is not None:
        n, m = _parse_pattern(pattern)
        for name, module, pname in targets:
            weight = getattr(module, pname)
            if weight.reshape(weight.shape[0], -1).shape[1] % m:
                skipped.append(name)
                continue
            prune.custom_from_mask(module, pname, nm_mask(weight, n, m))
    elif scope == "layer":
        for _, module, pname in targets:
            prune.l1_unstructured(module, pname, amount=amount)
    elif scope == "global":
        prune.global_unstructured([(m_, p) for _, m_, p in targets], prune.L1Unstructured, amount=amount)
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    report = sparsity_report(model, towers)
    report["skipped"] = skipped
    return report


def _parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError as exc:
        raise ValueError(f"pattern must look like '2:4', got {pattern!r}") from exc
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def sparsity_report(model: nn.Module, towers: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-weight and overall fraction of exact zeros over the sparsifiable weights."""
    layers, zeros, total = {}, 0, 0
    for name, module, pname in sparsifiable(model, towers):
        w = getattr(module, pname)
        z, n = int((w == 0).sum()), w.numel()
        layers[name] = {"zeros": z, "numel": n, "sparsity": z / n}
        zeros, total = zeros + z, total + n
    return {"layers": layers, "zeros": zeros, "numel": total, "sparsity": zeros / max(total, 1)}


def make_permanent(model: nn.Module) -> int:
    """Fold every pruning mask into its weight (prune.remove) so weights save as plain tensors; returns count."""
    count = 0
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
                count += 1
    return count
