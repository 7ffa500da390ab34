"""UFO training losses: dice, sigmoid focal, objectness BCE and their matched combination over a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .matching import MatchCosts, hungarian_match, point_sample, random_points

__all__ = ["LossWeights", "dice_loss", "sigmoid_focal_loss", "score_loss", "uncertain_points", "ufo_loss"]

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


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """RetinaNet focal loss, averaged over the pixels (points) of each mask.

    Per pixel: alpha_t * (1 - p_t) ** gamma * BCE(logit, t), with p_t = p if t else 1 - p and
    alpha_t = alpha if t else 1 - alpha (alpha < 0 disables it). ``reduction`` then acts over masks, so
    "mean" equals UFO's ``loss.mean(1).sum() / num_masks``.
    """
    logits = logits.flatten(1)
    t = targets.to(logits.dtype).flatten(1)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce(loss.mean(-1), reduction)


def score_loss(obj_logits: Tensor, matched: Tensor, neg_weight: float = 1.0) -> Tensor:
    """BCE on objectness: matched slots target 1, the rest 0; negatives weighted by ``neg_weight``, mean over slots."""
    if obj_logits.shape != matched.shape:
        raise ValueError(f"obj_logits {tuple(obj_logits.shape)} and matched {tuple(matched.shape)} differ")
    target = matched.to(obj_logits.dtype)
    weight = torch.where(matched.bool(), torch.ones_like(target), torch.full_like(target, neg_weight))
    return F.binary_cross_entropy_with_logits(obj_logits, target, weight=weight)


@torch.no_grad()
def uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former/UFO point selection [N, P, 2]: the most uncertain (|logit| smallest) of oversample_ratio*P
    random candidates make up importance_ratio of the points, the rest are uniform, so the loss focuses on
    boundaries without ignoring the interior.
    """
    n = logits.shape[0]
    n_cand = max(int(num_points * oversample_ratio), num_points)
    cand = random_points(n, n_cand, logits.device, generator)
    uncertainty = -point_sample(logits, cand).abs()
    n_imp = int(importance_ratio * num_points)
    idx = uncertainty.topk(n_imp, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rand = random_points(n, num_points - n_imp, logits.device, generator)
    return torch.cat([chosen, rand], dim=1)


@dataclass
class LossWeights:
    """Loss term weights (defaults follow MaskFormer: focal 20, dice 1, class 1)."""

    focal: float = 20.0
    dice: float = 1.0
    obj: float = 1.0
    sem: float = 1.0  # multiplies the semantic (focal-weighted + dice) term
    neg_obj: float = 1.0  # weight of unmatched slots in the objectness BCE
    alpha: float = 0.25
    gamma: float = 2.0


def _mask_terms(
    pred: Tensor, gt: Tensor, w: LossWeights, num_points: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Sum over K masks of (focal, dice); pred [K, h, w] logits, gt [K, H, W]."""
    gt = gt.to(pred.dtype)
    if num_points is not None:
        pts = uncertain_points(pred.detach(), num_points, generator=generator)
        pred, gt = point_sample(pred, pts), point_sample(gt, pts)
    elif pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    focal = sigmoid_focal_loss(pred, gt, w.alpha, w.gamma, reduction="sum")
    return focal, dice_loss(pred, gt, reduction="sum")


def _gt_masks(target: Mapping[str, Tensor], device: torch.device) -> Tensor:
    masks = target.get("masks")
    if masks is None or masks.dim() != 3:
        raise ValueError("each target needs 'masks' [M, H, W] (M may be 0)")
    return masks.to(device)


def _semantic_term(
    sem_logits: Tensor, targets: Sequence[Mapping[str, Tensor]], w: LossWeights, num_points: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Mean over images of focal*w.focal + dice*w.dice on the query-level mask (default target: union of instances)."""
    total = sem_logits.sum() * 0.0
    for i, tgt in enumerate(targets):
        sem = tgt.get("sem_mask")
        if sem is None:
            sem = _gt_masks(tgt, sem_logits.device).any(dim=0)
        focal, dice = _mask_terms(sem_logits[i : i + 1], sem.to(sem_logits.device)[None], w, num_points, generator)
        total = total + w.focal * focal + w.dice * dice
    return total / max(len(targets), 1)


def ufo_loss(
    outputs: Mapping[str, Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    weights: LossWeights | None = None,
    costs: MatchCosts | None = None,
    num_points: int | None = None,
    gt_repeats: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Match slots to gt masks per image, then combine focal + dice (matched masks) and objectness BCE.

    Args:
        outputs: ``QueryDecoder`` outputs; uses ``obj_logits`` [B, N], ``mask_logits`` [B, N, h, w] and, when
            present, ``sem_logits`` [B, h, w].
        targets: per image ``{"masks": [M, H, W] bool}`` (instances answering the query; M may be 0) and
            optionally ``"sem_mask": [H, W]`` (defaults to the union of ``masks``).
        weights: loss weights; costs: matching weights.
        num_points: None compares masks densely at gt resolution; else that many importance-sampled points
            per mask (UFO/Mask2Former use 12544), used both for matching (uniform points) and the loss.
        gt_repeats: each gt may be matched by this many slots (UFO repeats gts 3x and relies on NMS at test
            time; keep 1 for NMS-free inference).

    Returns:
        ``loss`` (weighted sum, the one to backprop) and unweighted parts ``loss_focal``, ``loss_dice``
        (sums over matched masks / number of matched masks in the batch), ``loss_obj``, ``loss_sem``
        (already weighted internally, only with ``sem_logits``) and ``num_matched``.
    """
    w = weights or LossWeights()
    obj, logits = outputs["obj_logits"], outputs["mask_logits"]
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
    matched = torch.zeros_like(obj, dtype=torch.bool)
    # multiplying by 0 keeps every output in the graph, so DDP sees gradients even when nothing matched.
    focal_sum, dice_sum, n_matched = logits.sum() * 0.0, logits.sum() * 0.0, 0
    for i, tgt in enumerate(targets):
        gt = _gt_masks(tgt, logits.device)
        gt = gt.repeat(gt_repeats, 1, 1) if gt_repeats > 1 else gt
        pi, gi = hungarian_match(logits[i].detach(), obj[i].detach(), gt, costs, num_points, generator)
        if pi.numel() == 0:
            continue
        matched[i, pi] = True
        focal, dice = _mask_terms(logits[i, pi], gt[gi], w, num_points, generator)
        focal_sum, dice_sum, n_matched = focal_sum + focal, dice_sum + dice, n_matched + pi.numel()
    denom = max(n_matched, 1)
    parts = {
        "loss_focal": focal_sum / denom,
        "loss_dice": dice_sum / denom,
        "loss_obj": score_loss(obj, matched, w.neg_obj),
    }
    loss = w.focal * parts["loss_focal"] + w.dice * parts["loss_dice"] + w.obj * parts["loss_obj"]
    if "sem_logits" in outputs:
        parts["loss_sem"] = _semantic_term(outputs["sem_logits"], targets, w, num_points, generator)
        loss = loss + w.sem * parts["loss_sem"]
    return {"loss": loss, **parts, "num_matched": torch.tensor(float(n_matched), device=logits.device)}
