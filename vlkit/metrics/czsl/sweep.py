"""The CZSL bias sweep: per-image best seen / unseen scores, then the accuracy curve, AUC and best HM from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from vlkit.metrics.czsl.inputs import ScoreSource, Setup, iter_blocks

GAP_MARGIN = 1e-4  # subtracted from every score gap in the reference (evaluate_predictions)


class CZSLResult(TypedDict):
    """What ``evaluate`` returns; accuracies are fractions in [0, 1]."""

    AUC: float
    best_hm: float
    best_seen: float
    best_unseen: float
    hm_seen: float
    hm_unseen: float
    best_bias: float
    attr_acc: float
    obj_acc: float
    unbiased_seen: float
    unbiased_unseen: float
    seen_curve: list[float]
    unseen_curve: list[float]
    biases: list[float]
    n_seen_images: int
    n_unseen_images: int


@dataclass(frozen=True)
class _Summary:
    """Per-image sufficient statistics: prediction at any bias needs only best seen and best unseen."""

    seen_val: torch.Tensor  # [N] best seen score (scores' dtype)
    seen_idx: torch.Tensor  # [N] its column (first one on ties)
    gt_val: torch.Tensor  # [N] score of the gt pair (unbiased, unmasked)
    unseen_val: torch.Tensor  # [N, G] best unseen candidate score per column group (-inf if empty)
    unseen_idx: torch.Tensor  # [N, G] its column (n_pairs if empty)


class _Scratch:
    """One reused buffer for column gathers: fresh 100+ MB allocations per block cost more than the gather."""

    def __init__(self) -> None:
        self.flat = torch.empty(0)

    def gather_cols(self, block: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        n = block.shape[0] * cols.numel()
        if self.flat.numel() < n or self.flat.dtype != block.dtype:
            self.flat = torch.empty(n, dtype=block.dtype)
        out = self.flat[:n].view(block.shape[0], cols.numel())
        return torch.index_select(block, 1, cols, out=out)


@dataclass(frozen=True)
class Groups:
    """Unseen candidate columns split into groups: group g is ``cols[bounds[g]:bounds[g + 1]]``, ascending."""

    cols: torch.Tensor
    bounds: list[int]

    @classmethod
    def by_label(cls, cols: torch.Tensor, label: torch.Tensor, n_groups: int) -> Groups:
        order = torch.argsort(label, stable=True)  # stable: columns stay ascending inside a group
        counts = torch.bincount(label, minlength=n_groups).tolist()
        return cls(cols[order], [0, *np.cumsum(counts).tolist()])


def _block_summary(
    block: torch.Tensor,
    seen_cols: torch.Tensor,
    groups: Groups,
    gt_cols: torch.Tensor,
    p: int,
    scratch: _Scratch,
) -> tuple[torch.Tensor, ...]:
    # torch.max(dim) returns the first index among ties; columns are ascending, so that is
    # the first column overall, the same tie rule as argmax over the full row.
    seen_val, arg = scratch.gather_cols(block, seen_cols).max(dim=1)
    seen_idx = seen_cols[arg]
    gt_val = block.gather(1, gt_cols[:, None]).squeeze(1)
    # One gather puts every group in contiguous columns: one pass over the block, not one per group.
    gathered = scratch.gather_cols(block, groups.cols)
    vals, idxs = [], []
    for lo, hi in zip(groups.bounds[:-1], groups.bounds[1:], strict=True):
        if hi == lo:
            vals.append(torch.full_like(seen_val, float("-inf")))
            idxs.append(torch.full_like(arg, p))
            continue
        v, a = gathered[:, lo:hi].max(dim=1)
        vals.append(v)
        idxs.append(groups.cols[lo + a])
    return seen_val, seen_idx, gt_val, torch.stack(vals, 1), torch.stack(idxs, 1)


def summarize(scores: ScoreSource, setup: Setup, groups: Groups, chunk_size: int | None) -> _Summary:
    """One streaming pass: per image, best seen and best unseen candidate (per column group)."""
    seen_cols = setup.seen.nonzero().squeeze(1)
    scratch = _Scratch()
    parts = []
    for start, block in iter_blocks(scores, setup.n_images, setup.n_pairs, chunk_size):
        gt_cols = setup.pair_gt[start : start + block.shape[0]]
        parts.append(_block_summary(block, seen_cols, groups, gt_cols, setup.n_pairs, scratch))
    return _Summary(*(torch.cat(x) for x in zip(*parts, strict=True)))


# ----------------------------------------------------------------------------- protocol


def pick(
    seen_val: torch.Tensor,
    seen_idx: torch.Tensor,
    unseen_val: torch.Tensor,
    unseen_idx: torch.Tensor,
    bias: float,
) -> torch.Tensor:
    """Predicted column at ``bias``: argmax over (seen scores, unseen scores + bias), first column on ties."""
    # float64 keeps "float32 score + bias" exact, so the bias never reorders unseen pairs.
    s, u = seen_val.double(), unseen_val.double() + bias
    take_unseen = (u > s) | ((u == s) & (unseen_idx < seen_idx))
    return torch.where(take_unseen, unseen_idx, seen_idx)


def _accuracies(pred: torch.Tensor, setup: Setup) -> tuple[float, float]:
    correct = pred == setup.pair_gt  # pairs are unique, so column equality == (attr, obj) equality
    seen = int(correct[setup.seen_img].sum()) / int(setup.seen_img.sum())
    unseen = int(correct[~setup.seen_img].sum()) / int((~setup.seen_img).sum())
    return seen, unseen


def _bias_list(max_seen: torch.Tensor, gt_val: torch.Tensor, use: torch.Tensor, steps: int) -> list[float]:
    """Sorted (max seen - gt) - 1e-4 gaps of the selected images, every ``len // steps``-th one."""
    gaps = (max_seen - gt_val)[use] - GAP_MARGIN  # in the scores' dtype, as the reference
    gaps = torch.sort(gaps).values
    skip = max(len(gaps) // steps, 1)
    return [float(g) for g in gaps[::skip]]


def _hmean(s: np.ndarray, u: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        hm = 2.0 * s * u / (s + u)
    return np.where((s > 0) & (u > 0), hm, 0.0)  # scipy.stats.hmean gives 0 when a value is 0


def bias_sweep(
    predict: Callable[[float], torch.Tensor],
    max_seen: torch.Tensor,
    gt_val: torch.Tensor,
    setup: Setup,
    bias_steps: int,
    large_bias: float,
) -> CZSLResult:
    """The protocol given a bias -> prediction function; shared by the dense and streaming paths."""
    if bias_steps < 1:
        raise ValueError(f"bias_steps must be >= 1, got {bias_steps}")
    pred_large = predict(large_bias)
    correct_unseen = (pred_large == setup.pair_gt) & ~setup.seen_img
    biases = _bias_list(max_seen, gt_val, correct_unseen, bias_steps)
    curve = [_accuracies(predict(b), setup) for b in biases] + [_accuracies(pred_large, setup)]
    seen = np.array([c[0] for c in curve])
    unseen = np.array([c[1] for c in curve])
    auc = float(np.sum(np.diff(unseen) * (seen[1:] + seen[:-1]) / 2.0))  # np.trapz(seen, unseen)
    hm = _hmean(seen, unseen)
    best = int(np.argmax(hm))
    all_biases = biases + [float(large_bias)]
    pred0 = predict(0.0)
    pred_pairs = setup.pairs[pred0]
    ub_seen, ub_unseen = _accuracies(pred0, setup)
    return CZSLResult(
        AUC=auc,
        best_hm=float(hm[best]),
        best_seen=float(seen.max()),
        best_unseen=float(unseen.max()),
        hm_seen=float(seen[best]),
        hm_unseen=float(unseen[best]),
        best_bias=all_biases[best],
        attr_acc=float((pred_pairs[:, 0] == setup.attr_gt).double().mean()),
        obj_acc=float((pred_pairs[:, 1] == setup.obj_gt).double().mean()),
        unbiased_seen=ub_seen,
        unbiased_unseen=ub_unseen,
        seen_curve=seen.tolist(),
        unseen_curve=unseen.tolist(),
        biases=all_biases,
        n_seen_images=int(setup.seen_img.sum()),
        n_unseen_images=int((~setup.seen_img).sum()),
    )
