"""Structured pruning of an MLLM backbone (vlkit.backbone.mllm): heads and MLP neurons of the vision tower
("image") and of the language model ("text") to a FLOP budget, with the same selection as the CLIP path
(vlkit.compress.prune.select_under_budget) and FLOPs counted by torch's FlopCounterMode.

What a tower costs is what embedding an image costs: "image" is the vision tower and the projector on one
image; "text" is the language model over the image-embedding prompt (bos, the image's tokens, the summary
prompt). Heads of layers with grouped-query attention cannot be removed one by one (see hf_blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlkit.backbone.hf_blocks import HFBlockView, hf_blocks, materialize_hf
from vlkit.compress.flops import TowerFlops, head_flops
from vlkit.compress.methods import HF_METHODS

Importances = dict[str, dict[tuple[str, int], torch.Tensor]]


def _head_rows(v: HFBlockView, h: int) -> slice:
    return slice(h * v.head_dim, (h + 1) * v.head_dim)


def hf_magnitude_importance(model: nn.Module, towers: Sequence[str]) -> Importances:
    """L1 norm of each unit's weights: a head's q/k/v rows and output columns; a neuron's up (and gate) row
    and down column."""
    out: Importances = {"heads": {}, "neurons": {}}
    for v in hf_blocks(model, towers):
        q, k, val = (p.weight.detach().abs() for p in v.qkv)
        o = v.out_proj.weight.detach().abs()
        out["heads"][v.key] = torch.tensor([float(q[_head_rows(v, h)].sum() + k[_head_rows(v, h)].sum()
                                                  + val[_head_rows(v, h)].sum() + o[:, _head_rows(v, h)].sum())
                                            for h in range(v.n_heads)])
        rows = sum(p.weight.detach().abs().sum(1) for p in v.up)
        out["neurons"][v.key] = (rows + v.down.weight.detach().abs().sum(0)).float().cpu()
    return out


def hf_random_importance(model: nn.Module, towers: Sequence[str], seed: int = 0) -> Importances:
    gen = torch.Generator().manual_seed(seed)
    out: Importances = {"heads": {}, "neurons": {}}
    for v in hf_blocks(model, towers):
        out["heads"][v.key] = torch.rand(v.n_heads, generator=gen)
        out["neurons"][v.key] = torch.rand(v.mlp_hidden, generator=gen)
    return out


def _tokens(backbone, tower: str) -> int:
    if tower == "image":
        return backbone.grid ** 2 + 1  # the patches and the class token
    return len(backbone.image_prompt_ids("image"))


def hf_flop_model(backbone, towers: Sequence[str]) -> dict[str, TowerFlops]:
    """Analytic FLOPs (2 x multiply-adds of the matmuls) per tower for one image: per head 8*T*d*hd + 4*T^2*hd,
    per neuron 2*T*d per matrix it owns a row or column of (3 for gated MLPs, 2 otherwise), plus the fixed part
    (the patch embedding and the projector for "image"; nothing for "text")."""
    cfg = backbone.model.config
    out = {}
    for tower in towers:
        views = hf_blocks(backbone.model, [tower])
        t = _tokens(backbone, tower)
        width = views[0].width if views else 0
        if tower == "image":
            vis, p, n = cfg.vision_config, int(cfg.vision_config.patch_size), backbone.grid ** 2
            patch = 2 * n * 3 * p * p * int(vis.hidden_size)
            proj = sum(2 * n * m.in_features * m.out_features
                       for m in backbone.model.model.multi_modal_projector.modules() if isinstance(m, nn.Linear))
            fixed, parts = patch + proj, {"patch_embed": patch, "projector": proj}
        else:
            fixed, parts = 0, {}
        out[tower] = TowerFlops(
            tower, t, width, [v.n_heads for v in views], [v.mlp_hidden for v in views],
            [head_flops(t, v.width, v.head_dim) for v in views],
            [2 * t * v.width * (len(v.up) + 1) for v in views], fixed, parts)
    return out


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Plain-matmul attention while inside (SDPA's CPU kernels are invisible to FlopCounterMode)."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


@torch.no_grad()
def count_hf_flops(backbone, towers: Sequence[str]) -> dict[str, int]:
    """FLOPs per tower for one (zero) image, counted by FlopCounterMode."""
    model = backbone.model
    device = backbone.device
    images = torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device)
    out = {}
    with eager_attention(model):
        if "image" in towers:
            with FlopCounterMode(display=False) as counter:
                model.model.get_image_features(pixel_values=images)
            out["image"] = int(counter.get_total_flops())
        if "text" in towers:
            embeds = torch.zeros(1, _tokens(backbone, "text"), backbone.embed_dim, device=device)
            with FlopCounterMode(display=False) as counter:
                model.model.language_model(inputs_embeds=embeds)
            out["text"] = int(counter.get_total_flops())
    return out


def prune_mllm(backbone, method: str = "magnitude", flops: float = 0.6, *, towers: Sequence[str] = ("image", "text"),
               seed: int = 0, min_heads: int = 0, min_neurons: int = 0) -> dict[str, Any]:
    """Prune ``backbone`` (an MLLMBackbone) in place to ``flops`` x each tower's dense FLOPs; returns the report
    (kept units per layer, FLOPs analytic and counted before/after, parameters, the pruned spec)."""
    from vlkit.compress.prune import model_flops, select_under_budget, tower_report

    if method not in HF_METHODS:
        raise ValueError(f"method={method!r} on an MLLM backbone: use one of {', '.join(HF_METHODS)} (OPTIN's "
                         "layer-wise scoring is implemented for CLIP towers)")
    towers = tuple(towers)
    model = backbone.model
    was_training = model.training
    model.eval()
    imp = hf_magnitude_importance(model, towers) if method == "magnitude" else hf_random_importance(model, towers, seed)
    fm_before = hf_flop_model(backbone, towers)
    heads, neurons, info = select_under_budget(imp, fm_before, flops, min_heads=min_heads, min_neurons=min_neurons,
                                               split="proportional" if method == "random" else "best")
    counted_before, params_before = count_hf_flops(backbone, towers), backbone.num_parameters()
    materialize_hf(model, heads, neurons)
    counted_after, fm_after = count_hf_flops(backbone, towers), hf_flop_model(backbone, towers)
    model.train(was_training)
    return {
        "method": method, "flops_target": flops, "seed": seed,
        "towers": {t: tower_report(t, fm_before[t], fm_after[t], counted_before[t], counted_after[t], flops)
                   for t in towers},
        "params_before": params_before, "params_after": backbone.num_parameters(),
        "selection": info, "spec": backbone.pruned_spec(),
        "model_flops": model_flops(counted_before, counted_after, towers),
    }
