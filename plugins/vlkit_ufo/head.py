"""UFO mask readout: pixel-shuffle mask assembly, the training-free baseline and mask boxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["assemble_masks", "masks_to_boxes", "training_free_logits"]


def upsample_factor(num_embeds: int) -> int:
    """r for ``num_embeds`` = r*r mask embeddings per instance (masks come out at r x the feature grid)."""
    r = math.isqrt(num_embeds)
    if r * r != num_embeds:
        raise ValueError(f"the number of mask embeddings must be a square r*r, got {num_embeds}")
    return r


def assemble_masks(mask_emb: Tensor, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
    """Turn per-instance mask embeddings into mask logits, UFO style.

    Args:
        mask_emb: [B, N, K, C] with K = r*r embeddings per instance (UFO: K=16, r=4).
        feats: [B, h, w, C] dense patch features.
        out_size: (H, W) for a final bilinear resize (align_corners=False, as UFO); None keeps [r*h, r*w].

    Returns:
        logits [B, N, H, W] (no sigmoid).

    Each embedding k gives one map ``emb_k . feat / sqrt(C)`` of size [h, w]; the K maps are interleaved
    with ``pixel_shuffle`` semantics: map k = r*dy + dx fills position (r*y + dy, r*x + dx). This is the
    same layout as UFO's ``view(N, 4, 4, h, w).permute(0, 3, 1, 4, 2)`` (its first 4 is dy, second dx).
    """
    if mask_emb.dim() != 4 or feats.dim() != 4:
        raise ValueError(f"expected mask_emb [B,N,K,C] and feats [B,h,w,C], got {tuple(mask_emb.shape)}, {tuple(feats.shape)}")
    b, n, k, c = mask_emb.shape
    if feats.shape[0] != b or feats.shape[-1] != c:
        raise ValueError(f"batch/channel mismatch: mask_emb {tuple(mask_emb.shape)} vs feats {tuple(feats.shape)}")
    r = upsample_factor(k)
    h, w = feats.shape[1:3]
    maps = torch.einsum("bnkc,bhwc->bnkhw", mask_emb, feats.to(mask_emb.dtype)) / math.sqrt(c)
    logits = F.pixel_shuffle(maps.reshape(b * n, k, h, w), r)  # [B*N, 1, r*h, r*w]
    if out_size is not None and tuple(out_size) != (r * h, r * w):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.reshape(b, n, *logits.shape[-2:])


def training_free_logits(
    text_emb: Tensor, feats: Tensor, scale: float | Tensor = 1.0, out_size: tuple[int, int] | None = None
) -> Tensor:
    """Zero-training baseline: cosine similarity between each patch feature and each query text embedding.

    Args:
        text_emb: [Q, D] queries shared by every image, or [B, Q, D] per-image queries (a single query per
            image is [B, 1, D]; a 2-D input is always read as shared so [B, D] is never ambiguous with [Q, D]).
        feats: [B, h, w, D] dense features (e.g. ``bb.dense_features(..., mode="maskclip")``).
        scale: multiplies the cosine (in [-1, 1]). 1.0 returns the raw cosine; pass ``bb.logit_scale``
            (CLIP's 1/temperature, ~100) for logits on CLIP's classification scale, e.g. a softmax over Q.
            Argmax over Q (semantic segmentation) does not depend on it; a binary mask needs a threshold
            calibrated on the cosine, since CLIP cosines of matching pairs are small (~0.2-0.3).
        out_size: optional (H, W) bilinear resize.

    Returns:
        [B, Q, h, w] (or [B, Q, H, W]).
    """
    if feats.dim() != 4:
        raise ValueError(f"feats must be [B,h,w,D], got {tuple(feats.shape)}")
    if text_emb.dim() == 2:
        text_emb = text_emb.unsqueeze(0).expand(feats.shape[0], -1, -1)
    if text_emb.dim() != 3 or text_emb.shape[0] != feats.shape[0] or text_emb.shape[-1] != feats.shape[-1]:
        raise ValueError(f"text_emb {tuple(text_emb.shape)} does not fit feats {tuple(feats.shape)}")
    t = F.normalize(text_emb.float(), dim=-1)
    f = F.normalize(feats.float(), dim=-1)
    logits = torch.einsum("bqd,bhwd->bqhw", t, f) * scale
    if out_size is not None:
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


def masks_to_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes of binary masks, in pixel-edge xyxy coordinates.

    Args:
        masks: [N, H, W] bool (any dtype; nonzero = foreground).

    Returns:
        (boxes [N, 4] float xyxy, valid [N] bool). A mask covering columns 2..4 gets x1=2, x2=5, so
        x2 - x1 is the pixel width, matching pycocotools' ``toBbox`` ([x, y, w, h]). Empty masks get an
        all-zero box and ``valid=False``.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N,H,W], got {tuple(masks.shape)}")
    m = masks.bool()
    n, h, w = m.shape
    cols, rows = m.any(dim=1), m.any(dim=2)  # [N, W], [N, H]
    valid = cols.any(dim=1)
    # argmax on a 0/1 tensor returns the first maximum, i.e. the first foreground index.
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * valid[:, None], valid
