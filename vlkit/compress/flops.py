"""Analytic per-head / per-neuron FLOP model of open_clip towers, and a FlopCounterMode-based counter.

Both count matmul FLOPs only (2 per multiply-add: linear layers, convolutions, q@k^T, attn@v), which is
what torch.utils.flop_counter counts. Excluded everywhere: softmax, LayerNorm, GELU, bias adds, residual
and positional-embedding adds, embedding lookups, pooling, normalisation of the output embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlkit.backbone.blocks import available_towers, text_root, transformer_blocks


@dataclass
class TowerFlops:
    """FLOPs of one tower for a single input (image or text), split into prunable units and a fixed part."""

    tower: str
    tokens: int
    width: int
    n_heads: list[int]
    mlp_hidden: list[int]
    head_cost: list[int]  # FLOPs of one head of block i
    neuron_cost: list[int]  # FLOPs of one MLP neuron of block i
    fixed: int  # patch embedding + output projection (not prunable here)
    fixed_parts: dict[str, int] = field(default_factory=dict)

    def total(self, heads: Sequence[int] | None = None, neurons: Sequence[int] | None = None) -> int:
        """FLOPs with ``heads[i]`` heads and ``neurons[i]`` neurons in block i (default: current sizes)."""
        heads = self.n_heads if heads is None else heads
        neurons = self.mlp_hidden if neurons is None else neurons
        units = sum(h * c for h, c in zip(heads, self.head_cost, strict=True))
        units += sum(n * c for n, c in zip(neurons, self.neuron_cost, strict=True))
        return int(self.fixed + units)

    @property
    def dense(self) -> int:
        return self.total()


def head_flops(tokens: int, width: int, head_dim: int) -> int:
    """q/k/v projections (3 * 2*T*d*hd) + scores (2*T*T*hd) + attn@v (2*T*T*hd) + out proj (2*T*hd*d)."""
    return 8 * tokens * width * head_dim + 4 * tokens * tokens * head_dim


def neuron_flops(tokens: int, width: int) -> int:
    """fc1 row (2*T*d) + fc2 column (2*T*d)."""
    return 4 * tokens * width


def _patch_embed_flops(embed: nn.Module, image_size: Any) -> int:
    """Multiply-adds x 2 of the patch embedding: one patch-sized convolution, or every convolution of a
    vlkit ConvStem (each at its own output resolution)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    convs = [embed] if isinstance(embed, nn.Conv2d) else [m for m in embed.modules() if isinstance(m, nn.Conv2d)]
    total = 0
    for conv in convs:
        h = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        w = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        total += 2 * h * w * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return total


def _image_fixed(visual: nn.Module) -> tuple[int, int, dict[str, int]]:
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("the analytic FLOP model does not cover attentional pooling towers")
    gh, gw = visual.grid_size
    tokens = gh * gw + 1
    patch = _patch_embed_flops(visual.conv1, visual.image_size)
    pooled = tokens if visual.pool_type == "none" else 1
    proj = 2 * pooled * visual.proj.shape[0] * visual.proj.shape[1] if visual.proj is not None else 0
    return tokens, patch + proj, {"patch_embed": patch, "proj": proj}


def _text_fixed(model: nn.Module) -> tuple[int, int, dict[str, int]]:
    root = text_root(model)
    tokens = int(root.positional_embedding.shape[0])
    pool = getattr(root, "text_pool_type", getattr(root, "pool_type", "argmax"))
    pooled = tokens if pool == "none" and getattr(root, "cls_emb", None) is None else 1
    proj = root.text_projection
    if proj is None:
        cost = 0
    else:
        w = proj.weight.t() if isinstance(proj, nn.Linear) else proj
        cost = 2 * pooled * w.shape[0] * w.shape[1]
    return tokens, cost, {"proj": cost}


def flop_model(model: nn.Module, towers: Sequence[str] | None = None) -> dict[str, TowerFlops]:
    """The analytic FLOP model of each viewable tower (default: all of them) at its native input size."""
    towers = available_towers(model) if towers is None else tuple(towers)
    out = {}
    for tower in towers:
        views = transformer_blocks(model, [tower])
        tokens, fixed, parts = _image_fixed(model.visual) if tower == "image" else _text_fixed(model)
        out[tower] = TowerFlops(
            tower, tokens, views[0].width if views else 0,
            [v.n_heads for v in views], [v.mlp_hidden for v in views],
            [head_flops(tokens, v.width, v.head_dim) for v in views],
            [neuron_flops(tokens, v.width) for v in views], fixed, parts,
        )
    return out


def _counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@torch.no_grad()
def count_flops(model: nn.Module, images: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> dict[str, int]:
    """Matmul FLOPs of encode_image(images) / encode_text(tokens) measured by FlopCounterMode.

    Transformer blocks run through vlkit's explicit attention path while counting: nn.MultiheadAttention's
    fused CPU kernels (and SDPA's CPU flash kernel) are invisible to FlopCounterMode, the explicit path
    does the same arithmetic with plain matmuls. Conv towers run as they are."""
    from vlkit.compress.masks import masked

    was_training = model.training
    model.eval()
    out: dict[str, int] = {}
    try:
        with masked(model, all_blocks=True):
            if images is not None:
                out["image"] = _counted(model.encode_image, images)
            if tokens is not None:
                out["text"] = _counted(model.encode_text, tokens)
    finally:
        model.train(was_training)
    return out


def dummy_inputs(model: nn.Module, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero images and a valid token batch (EOT = highest id, so argmax pooling finds it) at native sizes."""
    device = next(model.parameters()).device
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.zeros(batch, 3, h, w, device=device)
    root = text_root(model)
    length = int(getattr(model, "context_length", None) or root.context_length)
    vocab = int(getattr(model, "vocab_size", None) or root.vocab_size)
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    tokens[:, 0], tokens[:, 1] = vocab - 2, vocab - 1
    return images, tokens
