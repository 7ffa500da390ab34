"""vlkit's convolutional patch embedding for open_clip ViTs (``vision_cfg.stem``): ConvStem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlkit.backbone.base import BackboneError


class _ChannelsLastConv(nn.Conv2d):
    """A Conv2d that runs in channels-last layout (oneDNN's fast path on CPU: about 1.7x at the stem's sizes)
    while its parameters stay in the default layout, so pruning masks and state dicts see plain tensors."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, weight.contiguous(memory_format=torch.channels_last), bias)


class ConvStem(nn.Sequential):
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see
    better"): stride-2 3x3 convolutions with GELU between them, ending at the tower's width, in place of
    the single patch-sized convolution. Its output grid equals the patch grid, so the tower is otherwise
    unchanged. ``channels`` are the hidden widths; ``len(channels) + 1`` convolutions give a patch of
    ``2 ** (len(channels) + 1)`` pixels."""

    def __init__(self, channels: Sequence[int], width: int, patch_size: int) -> None:
        widths = [3, *channels, width]
        if 2 ** (len(widths) - 1) != patch_size:
            raise BackboneError(f"vision_cfg.stem {list(channels)}: {len(widths) - 1} stride-2 convolutions make "
                                f"{2 ** (len(widths) - 1)} px patches, but patch_size is {patch_size}; give "
                                f"log2(patch_size) - 1 = {max(0, patch_size.bit_length() - 2)} hidden widths")
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(_ChannelsLastConv(c_in, c_out, 3, stride=2, padding=1, bias=i < len(widths) - 2))
            if i < len(widths) - 2:
                layers.append(nn.GELU())
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self if isinstance(m, nn.Conv2d)]
