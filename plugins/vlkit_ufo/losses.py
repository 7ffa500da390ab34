"""UFO training losses: sigmoid focal and dice on masks, and the RetinaNet-normalised focal loss on anchors."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossWeights", "dice_loss", "mask_terms", "objectness_focal_loss", "sigmoid_focal_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_mask: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_mask.mean() if per_mask.numel() else per_mask.sum()
    if reduction == "sum":
        return per_mask.sum()
    if reduction == "none":
        return per_mask
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def dice_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Soft dice loss per mask: 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(logits).

    Args:
        logits, targets: [N, ...] (everything after dim 0 is one mask); targets binary or soft in [0, 1].
        reduction: "mean" / "sum" over the N masks, or "none" -> [N].

    The +1 in numerator and denominator (Mask2Former's smoothing) makes an empty target with an empty
    prediction cost 0 instead of 0/0, and keeps the gradient finite for tiny masks.
    """
    p = logits.sigmoid().flatten(1)
    t = targets.to(p.dtype).flatten(1)
    per_mask = 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
    return _reduce(per_mask, reduction)


def _focal_terms(logits: Tensor, t: Tensor, alpha: float, gamma: float) -> Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * t + (1 - alpha) * (1 - t)) * loss if alpha >= 0 else loss


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """RetinaNet focal loss, averaged over the pixels of each mask.

    Per pixel: alpha_t * (1 - p_t) ** gamma * BCE(logit, t), with p_t = p if t else 1 - p and
    alpha_t = alpha if t else 1 - alpha (alpha < 0 disables it). ``reduction`` then acts over masks, so
    "mean" equals UFO's ``loss.mean(1).sum() / num_masks``.
    """
    logits = logits.flatten(1)
    loss = _focal_terms(logits, targets.to(logits.dtype).flatten(1), alpha, gamma)
    return _reduce(loss.mean(-1), reduction)


def objectness_focal_loss(logits: Tensor, targets: Tensor, valid: Tensor, alpha: float = 0.25,
                          gamma: float = 2.0) -> Tensor:
    """RetinaNet's classification loss over anchors: sigmoid focal loss summed over the ``valid`` entries
    and divided by the number of valid positives (at least 1), so the many empty anchors do not swamp the
    few that hold an instance."""
    t = targets.to(logits.dtype)
    v = valid.to(logits.dtype)
    return (_focal_terms(logits, t, alpha, gamma) * v).sum() / (t * v).sum().clamp(min=1.0)


@dataclass
class LossWeights:
    """Loss term weights (MaskFormer's focal 20 : dice 1 : class 1)."""

    focal: float = 20.0
    dice: float = 1.0
    obj: float = 1.0
    alpha: float = 0.25
    gamma: float = 2.0


def mask_terms(pred: Tensor, gt: Tensor, w: LossWeights) -> tuple[Tensor, Tensor]:
    """(focal, dice) summed over N masks: pred [N, h, w] logits, gt [N, H, W] (pred resized to gt's size)."""
    gt = gt.to(pred.dtype)
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    focal = sigmoid_focal_loss(pred, gt, w.alpha, w.gamma, reduction="sum")
    return focal, dice_loss(pred, gt, reduction="sum")
