"""Text-aligned dense patch features from an open_clip ViT, projected into the joint image-text space.

Modes (all share the tower up to its last block):
- ``plain``: the last block as trained; tokens go through ``ln_post`` and ``proj`` like the pooled
  token, so the class token of this path equals ``encode_image`` exactly.
- ``maskclip`` (Zhou et al., MaskCLIP): in the last block keep only the value path
  (``out_proj(v)``), dropping query-key mixing, the residual and the MLP: each patch keeps its own
  content, which makes the features local while staying in the space the text tower aligns with.
- ``clearclip`` (Lan et al., ClearCLIP; the query-query attention of SCLIP): attention weights from
  query-query similarity, again without the residual and the MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("plain", "maskclip", "clearclip")


def _qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q, k, v as [B, heads, T, head_dim] from a block's attention and its pre-norm input."""
    attn = block.attn
    # nn.MultiheadAttention, open_clip's Attention and vlkit.compress's PrunedAttention share these names
    if getattr(attn, "in_proj_weight", None) is not None and getattr(attn, "ln_q", None) is None:
        weight, bias, heads = attn.in_proj_weight, attn.in_proj_bias, attn.num_heads
    else:
        raise NotImplementedError(
            f"dense features need an attention with packed q/k/v projections; got {type(attn).__name__}"
        )
    y = F.linear(x, weight, bias)
    b, t, _ = y.shape
    if heads == 0:
        zeros = y.new_zeros(b, 0, t, 0)
        return zeros, zeros, zeros, 0
    q, k, v = y.chunk(3, dim=-1)
    split = lambda z: z.reshape(b, t, heads, -1).transpose(1, 2)  # noqa: E731
    return split(q), split(k), split(v), heads


def _out_proj(block: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    b, h, t, d = heads_out.shape
    merged = heads_out.transpose(1, 2).reshape(b, t, h * d)
    attn = block.attn
    return attn.out_proj(merged)


def _last_block_dense(block: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    q, k, v, heads = _qkv(block, block.ln_1(x))
    if heads == 0:
        return block.attn.out_proj.bias.expand(x.shape[0], x.shape[1], -1)
    if mode == "maskclip":
        out = v
    else:
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1) @ v
    # ls_1 is the layer scale on the attention branch; identity for CLIP-style towers
    return block.ls_1(_out_proj(block, out))


def dense_features(visual: nn.Module, images: torch.Tensor, mode: str = "maskclip",
                   return_cls: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Patch features [B, h, w, D] of an open_clip VisionTransformer, in the joint space.

    With ``return_cls`` also returns the class-token feature [B, D] of the same path.
    """
    if mode not in MODES:
        raise ValueError(f"unknown dense feature mode {mode!r}; choose one of {', '.join(MODES)}")
    if not hasattr(visual, "_embeds") or getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError(
            "dense features need an open_clip VisionTransformer with token pooling (ViT-* models); "
            f"got {type(visual).__name__}"
        )
    if getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError("dense features are not defined for towers with final_ln_after_pool")
    x = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = blocks[-1](x) if mode == "plain" else _last_block_dense(blocks[-1], x, mode)
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    n_prefix = x.shape[1] - _num_patches(visual)
    grid = visual.grid_size
    patches = x[:, n_prefix:].reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    return (patches, x[:, 0]) if return_cls else patches


def _num_patches(visual: nn.Module) -> int:
    gh, gw = visual.grid_size
    return gh * gw
