"""Segmentation metrics: confusion-matrix mean IoU over a dataset and per-query binary IoU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["MeanIoU", "binary_iou", "confusion_matrix", "intersection_union", "miou"]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(pred: Any, gt: Any, n_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel counts [n_classes, n_classes + 1]: row = gt class, column = predicted class.

    Pixels whose gt is ``ignore_index`` are skipped. A prediction equal to ``ignore_index`` ("no label",
    e.g. below a background threshold) lands in the extra last column: a miss for the gt class, a false
    positive for none. Any other label outside [0, n_classes) is an error.
    """
    p, g = _to_numpy(pred).astype(np.int64).ravel(), _to_numpy(gt).astype(np.int64).ravel()
    if p.shape != g.shape:
        raise ValueError(f"pred and gt have different sizes: {p.size} vs {g.size}")
    valid = g != ignore_index
    p, g = p[valid], g[valid]
    if g.size and (g.min() < 0 or g.max() >= n_classes):
        raise ValueError(f"gt labels must be in [0, {n_classes}) or {ignore_index}, got [{g.min()}, {g.max()}]")
    p = np.where(p == ignore_index, n_classes, p)
    if p.size and (p.min() < 0 or p.max() > n_classes):
        raise ValueError(f"pred labels must be in [0, {n_classes}) or {ignore_index}, got [{p.min()}, {p.max()}]")
    counts = np.bincount(g * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1))
    return counts.reshape(n_classes, n_classes + 1)


class MeanIoU:
    """Accumulates a confusion matrix over images; IoU_c = TP / (TP + FP + FN) from the summed counts.

    Classes with an empty union (absent from both gt and prediction over everything seen) get IoU NaN and
    are excluded from the mean: they carry no evidence either way. A class present only in predictions
    scores 0. ``confusion`` is public so per-process matrices can be summed before ``compute``.
    """

    def __init__(self, n_classes: int, ignore_index: int = 255) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if 0 <= ignore_index < n_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (n_classes={n_classes})")
        self.n_classes, self.ignore_index = n_classes, ignore_index
        self.confusion = np.zeros((n_classes, n_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image (or a batch: any shape, as long as pred and gt match)."""
        self.confusion += confusion_matrix(pred, gt, self.n_classes, self.ignore_index)

    def per_class_iou(self) -> np.ndarray:
        """[n_classes] IoU, NaN where the class is in neither gt nor prediction."""
        c = self.confusion
        tp = np.diag(c[:, : self.n_classes]).astype(float)
        union = c.sum(1) + c[:, : self.n_classes].sum(0) - tp  # gt pixels + predicted pixels - overlap
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def compute(self) -> dict[str, float]:
        """``mIoU`` (NaN if no class was seen), ``aAcc`` (pixel accuracy over non-ignored gt) and ``mAcc``."""
        c = self.confusion
        iou = self.per_class_iou()
        tp = np.diag(c[:, : self.n_classes]).astype(float)
        gt_total = c.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(gt_total > 0, tp / gt_total, np.nan)
        seen = ~np.isnan(iou)
        seen_acc = ~np.isnan(acc)
        return {
            "mIoU": float(iou[seen].mean()) if seen.any() else float("nan"),
            "aAcc": float(tp.sum() / gt_total.sum()) if gt_total.sum() else float("nan"),
            "mAcc": float(acc[seen_acc].mean()) if seen_acc.any() else float("nan"),
        }


def miou(pred_labels: Any, gt_labels: Any, n_classes: int, ignore_index: int = 255) -> float:
    """Dataset mIoU; pass one label map each, or equal-length sequences of per-image maps (sizes may differ)."""
    metric = MeanIoU(n_classes, ignore_index)
    if isinstance(pred_labels, Sequence) and not isinstance(pred_labels, str | bytes):
        if not isinstance(gt_labels, Sequence) or len(pred_labels) != len(gt_labels):
            raise ValueError("pred_labels and gt_labels must be sequences of the same length")
        for p, g in zip(pred_labels, gt_labels, strict=True):
            metric.update(p, g)
    else:
        metric.update(pred_labels, gt_labels)
    return metric.compute()["mIoU"]


def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask intersection and union pixel counts of binary masks [..., H, W] -> two [...] tensors.

    Summing these over a dataset gives the cumulative IoU (cIoU) of referring segmentation.
    """
    p = torch.as_tensor(pred).bool()
    g = torch.as_tensor(gt).bool().to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ")
    inter = (p & g).flatten(-2).sum(-1)
    union = (p | g).flatten(-2).sum(-1)
    return inter, union


def binary_iou(pred: torch.Tensor, gt: torch.Tensor, empty_value: float = 1.0) -> torch.Tensor:
    """Per-query IoU of binary masks [..., H, W] -> float [...].

    An empty prediction on an empty target scores ``empty_value`` (1.0, as UFO's gIoU metric: correctly
    predicting "nothing" is a hit). The mean over queries is the gIoU of referring segmentation.
    """
    inter, union = intersection_union(pred, gt)
    iou = inter.double() / union.clamp(min=1).double()
    return torch.where(union == 0, torch.full_like(iou, empty_value), iou).float()
