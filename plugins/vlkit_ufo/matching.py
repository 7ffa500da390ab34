"""One-to-one Hungarian matching of predicted instance slots to ground-truth masks (Mask2Former-style costs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["MatchCosts", "hungarian_match", "pairwise_dice_cost", "pairwise_focal_cost", "point_sample", "random_points"]


@dataclass
class MatchCosts:
    """Weights of the matching cost terms (defaults follow MaskFormer's focal 20 : dice 1 : class 1)."""

    obj: float = 1.0
    focal: float = 20.0
    dice: float = 1.0
    alpha: float = 0.25
    gamma: float = 2.0


def random_points(n_sets: int, num_points: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random points [n_sets, P, 2] as normalized (x, y) in [0, 1]."""
    return torch.rand(n_sets, num_points, 2, device=device, generator=generator)


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinearly read [N, H, W] maps at normalized (x, y) points [N, P, 2] or [P, 2] -> [N, P].

    Pixel centres sit at (i + 0.5) / size (``align_corners=False``), the convention of detectron2's
    ``point_sample`` used by Mask2Former/UFO, so masks of different resolutions are compared at the same
    physical locations.
    """
    if points.dim() == 2:
        points = points.unsqueeze(0).expand(maps.shape[0], -1, -1)
    grid = (2.0 * points - 1.0).unsqueeze(2).to(maps.dtype)  # [N, P, 1, 2]
    out = F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", align_corners=False)
    return out[:, 0, :, 0]


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """[N, P] logits x [M, P] binary targets -> [N, M] dice loss of every pair (smoothing +1, as dice_loss)."""
    p = logits.sigmoid()
    inter = p @ targets.T
    return 1.0 - (2.0 * inter + 1.0) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1.0)


def pairwise_focal_cost(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """[N, P] x [M, P] -> [N, M] sigmoid focal loss, mean over points, of every pair.

    The per-point loss is t * pos + (1 - t) * neg with pos/neg independent of the target, so all pairs
    are two matrix products instead of an [N, M, P] tensor.
    """
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = (1 - alpha) * p**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


def _flatten_pair(
    pred_logits: Tensor, gt_masks: Tensor, num_points: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    gt = gt_masks.to(device=pred_logits.device, dtype=pred_logits.dtype)
    if num_points is not None:
        pts = random_points(1, num_points, pred_logits.device, generator)[0]
        return point_sample(pred_logits, pts), point_sample(gt, pts)
    if gt.shape[-2:] != pred_logits.shape[-2:]:
        pred_logits = F.interpolate(pred_logits[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return pred_logits.flatten(1), gt.flatten(1)


@torch.no_grad()
def hungarian_match(
    pred_logits: Tensor,
    pred_obj: Tensor,
    gt_masks: Tensor,
    costs: MatchCosts | None = None,
    num_points: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Assign each gt mask to at most one slot by minimising focal + dice (mask) - sigmoid(objectness).

    Args:
        pred_logits: [N, h, w] mask logits of one image.
        pred_obj: [N] objectness logits.
        gt_masks: [M, H, W] binary masks (any resolution; predictions are resized or point-sampled).
        costs: term weights.
        num_points: if set, compare masks at this many uniform random points shared by all predictions
            and targets (Mask2Former's trick to keep the [N, M] cost cheap); None compares every pixel.
        generator: RNG for the points.

    Returns:
        (pred_idx, gt_idx), LongTensors of length min(N, M) on pred_logits' device, sorted by pred_idx.
    """
    if pred_logits.dim() != 3 or gt_masks.dim() != 3 or pred_obj.shape != pred_logits.shape[:1]:
        raise ValueError(
            f"expected pred_logits [N,h,w], pred_obj [N], gt_masks [M,H,W]; got {tuple(pred_logits.shape)}, "
            f"{tuple(pred_obj.shape)}, {tuple(gt_masks.shape)}"
        )
    device = pred_logits.device
    if gt_masks.shape[0] == 0 or pred_logits.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    c = costs or MatchCosts()
    pred, gt = _flatten_pair(pred_logits.float(), gt_masks, num_points, generator)
    cost = (
        c.focal * pairwise_focal_cost(pred, gt, c.alpha, c.gamma)
        + c.dice * pairwise_dice_cost(pred, gt)
        - c.obj * pred_obj.float().sigmoid()[:, None]
    )
    # a NaN/inf anywhere makes scipy raise; map them to large finite costs instead.
    cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return (
        torch.as_tensor(np.asarray(rows), dtype=torch.long, device=device),
        torch.as_tensor(np.asarray(cols), dtype=torch.long, device=device),
    )
