"""UFO-style assignment of ground-truth instances to grid anchors (point distance, repeated ground truths)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["anchor_match", "mask_centres"]


def mask_centres(masks: Tensor) -> Tensor:
    """Centres of mass [M, 2] of binary masks [M, H, W] as normalised (x, y) (pixel-centre convention);
    an empty mask gets the image centre."""
    m = masks.float()
    h, w = m.shape[-2:]
    ys = (torch.arange(h, device=m.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=m.device, dtype=torch.float32) + 0.5) / w
    area = m.sum((-2, -1))
    cx = (m.sum(-2) * xs).sum(-1) / area.clamp(min=1)
    cy = (m.sum(-1) * ys).sum(-1) / area.clamp(min=1)
    centre = torch.stack([cx, cy], dim=-1)
    return torch.where(area[:, None] > 0, centre, torch.full_like(centre, 0.5))


@torch.no_grad()
def anchor_match(anchor_xy: Tensor, gt_masks: Tensor, repeats: int = 3, point_cost: float = 1.0,
                 inside_cost: float = 0.0) -> tuple[Tensor, Tensor]:
    """Each gt mask, repeated ``repeats`` times, takes the anchors nearest (L1) to its centre of mass, one
    anchor per repeat, no anchor shared: a Hungarian assignment on the point distance, so two nearby
    instances split their neighbourhood instead of one taking it all. UFO's cost adds whether the anchor
    lies inside the mask (``inside_cost``); the CLIP head's fixed anchors match on the point term alone.

    Args:
        anchor_xy: [A, 2] normalised anchor centres; gt_masks: [M, H, W].
        point_cost, inside_cost: the cost is ``point_cost`` x L1 distance + ``inside_cost`` x (the anchor's
            pixel lies outside the mask); UFO's MLLM matching uses 5 and 100.

    Returns:
        (anchor_idx, gt_idx) LongTensors of length min(A, M * repeats), sorted by anchor index.
    """
    device = anchor_xy.device
    if gt_masks.shape[0] == 0 or repeats < 1:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    centres = mask_centres(gt_masks).to(anchor_xy).repeat(repeats, 1)  # [M*R, 2]
    cost = point_cost * torch.cdist(anchor_xy.float(), centres.float(), p=1)
    if inside_cost:
        h, w = gt_masks.shape[-2:]
        ax = (anchor_xy[:, 0] * w).long().clamp(0, w - 1)
        ay = (anchor_xy[:, 1] * h).long().clamp(0, h - 1)
        outside = ~gt_masks[:, ay, ax].T.bool()  # [A, M]
        cost = cost + inside_cost * outside.repeat(1, repeats).to(cost.dtype)
    cost = cost.cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    gt_idx = torch.as_tensor(np.asarray(cols), dtype=torch.long) % gt_masks.shape[0]
    return torch.as_tensor(np.asarray(rows), dtype=torch.long, device=device), gt_idx.to(device)
