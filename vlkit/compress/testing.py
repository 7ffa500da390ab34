"""Tiny random-init open_clip models and inputs for fast compression tests and smoke runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import open_clip
import torch
from torch import nn


def tiny_clip(seed: int = 0, *, layers: int = 3, heads: int = 4, width: int = 64, custom: bool = False,
              mlp_ratio: float = 4.0, vocab: int = 500, context: int = 16, image_size: int = 32,
              patch: int = 16, **text_extra: Any) -> nn.Module:
    """An eval-mode open_clip CLIP (ViT 32 px / patch 16 -> 5 tokens; causal text, context 16).

    ``custom`` builds CustomResidualAttentionBlocks (qk-norm) in both towers."""
    torch.manual_seed(seed)
    extra = {"qk_norm": True} if custom else {}
    vision = dict(image_size=image_size, layers=layers, width=width, head_width=width // heads,
                  patch_size=patch, mlp_ratio=mlp_ratio, **extra)
    text = dict(context_length=context, vocab_size=vocab, width=width, heads=heads, layers=layers,
                mlp_ratio=mlp_ratio, **extra, **text_extra)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def tiny_resnet_clip(seed: int = 0) -> nn.Module:
    """An open_clip CLIP with a small ModifiedResNet image tower (layers [1,1,1,1], width 16, 64 px)."""
    torch.manual_seed(seed)
    vision = dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=16)
    text = dict(context_length=16, vocab_size=500, width=64, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def tiny_inputs(model: nn.Module, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids with a random EOT (the highest id) position per sequence."""
    gen = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, generator=gen)
    vocab, length = int(model.vocab_size), int(model.context_length)
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=gen)
    eot = torch.randint(2, length, (batch,), generator=gen)
    for i, e in enumerate(eot.tolist()):
        tokens[i, e] = vocab - 1
        tokens[i, e + 1:] = 0
    return images, tokens


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: tiny models on a shared, loaded machine are much faster this way."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
