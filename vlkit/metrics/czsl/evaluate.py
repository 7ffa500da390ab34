"""Compositional zero-shot evaluation as published (bias curve, AUC, best HM), streamed over image chunks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vlkit.metrics.czsl.inputs import (
    ArrayLike,
    IndexLike,
    PairsLike,
    ScoreSource,
    as_pairs,
    iter_blocks,
    prepare,
    to_tensor,
)
from vlkit.metrics.czsl.sweep import CZSLResult, Groups, bias_sweep, pick, summarize

DEFAULT_LARGE_BIAS = 1e3  # the reference's --bias default: the "all unseen" end of the curve
DEFAULT_BIAS_STEPS = 20  # the reference's magic_binsize


@dataclass(frozen=True)
class ThresholdChoice:
    """The feasibility threshold picked on validation, with the sweep that chose it."""

    threshold: float
    criterion: str
    thresholds: list[float]
    values: list[float]
    result: CZSLResult


# ----------------------------------------------------------------------------- public API


def evaluate(
    scores: ScoreSource,
    pairs: PairsLike,
    train_pairs: PairsLike,
    eval_pairs: PairsLike,
    attr_gt: IndexLike,
    obj_gt: IndexLike,
    pair_gt: IndexLike,
    open_world: bool = False,
    feasible: ArrayLike | None = None,
    bias_steps: int = DEFAULT_BIAS_STEPS,
    chunk_size: int | None = None,
    large_bias: float = DEFAULT_LARGE_BIAS,
) -> CZSLResult:
    """CZSL metrics (AUC, best HM, best seen/unseen, attr/obj accuracy) in one streaming pass.

    ``scores`` is [n_images, n_pairs] (tensor or array), a callable ``scores(start, stop)`` returning
    rows ``start:stop``, or an iterable of row chunks (consumed once). Column j scores ``pairs[j]``.
    Memory is one block of ``chunk_size`` rows (default: about 2**25 scores) plus O(n_images).

    Protocol: BatsResearch/csp ``evaluate.py`` (``Evaluator.generate_predictions`` /
    ``evaluate_predictions``, ``test``, ``threshold_with_feasibility``), itself from ExplainableML/czsl
    ``models/common.py`` (Mancini et al.), with ``--bias 1e3 --topk 1`` defaults (czsl ``flags.py``):

    - Candidates: closed world keeps only ``train_pairs + eval_pairs`` (reference ``closed_mask``);
      open world keeps all pairs, minus unseen pairs where ``feasible`` is False. Seen pairs are
      always kept. Excluded pairs are dropped from the argmax (reference: set to -1e10, CompCos:
      -1, CSP: logit * 0, which also doubles seen logits when the threshold <= 0; dropping is what
      they all intend and equals -1e10 unless real scores reach -1e10).
    - Bias b is added to every pair not in ``train_pairs``; prediction is the top-1 candidate
      (``topk=1``); a match is predicted (attr, obj) == gt. Seen accuracy averages images whose gt
      pair is in ``train_pairs``, unseen accuracy the others.
    - Bias list: unseen-gt images correctly classified at ``large_bias`` (the reference's
      ``closed_unseen_match``, computed with ``--bias 1e3``); their gaps (max seen score - gt
      score, on unbiased scores) minus 1e-4, sorted, every ``max(len // bias_steps, 1)``-th one.
    - The curve is accuracy at each listed bias, then at ``large_bias`` appended last (so
      ``biases[-1] == large_bias``); ``AUC = np.trapz(seen_curve, unseen_curve)``; ``best_hm`` is
      the max harmonic mean (0 if either is 0), first index on ties; ``best_bias`` its bias
      (the reference's ``biasterm``, 1e3 at the endpoint); best seen/unseen are curve maxima.
    - ``attr_acc``/``obj_acc`` (and ``unbiased_seen``/``unbiased_unseen``): unbiased top-1 over
      all images, with the same candidates (CSP ``test`` uses ``unbiased_closed``).

    Choices beyond the reference: ties go to the first column (torch.topk leaves them unspecified);
    biases are added in float64, so float32 scores plus a bias are exact and cannot tie; gaps stay
    in the scores' dtype, as in the reference; accuracies are exact float64 fractions (the
    reference averages in float32, <= 1e-7 apart); an error, not NaN, when no image is seen or
    unseen. ``evaluate_dense`` computes the same with the full matrix and a biased argmax.
    """
    setup = prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, open_world, feasible)
    unseen_cols = (setup.candidate & ~setup.seen).nonzero().squeeze(1)
    summ = summarize(scores, setup, Groups(unseen_cols, [0, unseen_cols.numel()]), chunk_size)

    def predict(bias: float) -> torch.Tensor:
        return pick(summ.seen_val, summ.seen_idx, summ.unseen_val[:, 0], summ.unseen_idx[:, 0], bias)

    return bias_sweep(predict, summ.seen_val, summ.gt_val, setup, bias_steps, large_bias)


def evaluate_dense(
    scores: ScoreSource,
    pairs: PairsLike,
    train_pairs: PairsLike,
    eval_pairs: PairsLike,
    attr_gt: IndexLike,
    obj_gt: IndexLike,
    pair_gt: IndexLike,
    open_world: bool = False,
    feasible: ArrayLike | None = None,
    bias_steps: int = DEFAULT_BIAS_STEPS,
    large_bias: float = DEFAULT_LARGE_BIAS,
) -> CZSLResult:
    """Reference path of ``evaluate``: the whole score matrix in memory, a biased copy per bias, argmax.

    Same protocol and result; meant for small cases and for checking the streaming path.
    """
    setup = prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, open_world, feasible)
    full = torch.cat([b for _, b in iter_blocks(scores, setup.n_images, setup.n_pairs, None)])
    full64 = full.double()

    def predict(bias: float) -> torch.Tensor:
        bias_row = torch.zeros(setup.n_pairs, dtype=torch.float64).masked_fill(~setup.seen, bias)
        biased = full64 + bias_row  # bias on unseen columns only; + 0.0 leaves seen scores unchanged
        biased = biased.masked_fill(~setup.candidate, float("-inf"))
        return biased.argmax(dim=1)  # first index among ties

    max_seen = full[:, setup.seen].max(dim=1).values
    gt_val = full[torch.arange(setup.n_images), setup.pair_gt]
    return bias_sweep(predict, max_seen, gt_val, setup, bias_steps, large_bias)


def feasibility_scores(
    attr_emb: torch.Tensor, obj_emb: torch.Tensor, pairs: PairsLike, train_pairs: PairsLike
) -> torch.Tensor:
    """Compositional cosine feasibility per pair (CompCos, Mancini et al. 2021); seen pairs get 1.

    For an unseen (a, o): the max cosine of o to the objects seen with a, and of a to the
    attributes seen with o (each -1 when there are none), averaged (ExplainableML/czsl
    ``CompCos.compute_feasibility``, CSP ``datasets/feasibility.py``). Embeddings are [n_attrs, D]
    and [n_objs, D] (backbone text embeddings or word vectors); returns float32 [n_pairs].
    """
    if attr_emb.ndim != 2 or obj_emb.ndim != 2 or attr_emb.shape[1] != obj_emb.shape[1]:
        raise ValueError(
            "need [n_attrs, D] and [n_objs, D] embeddings, "
            f"got {tuple(attr_emb.shape)}, {tuple(obj_emb.shape)}"
        )
    p, t = as_pairs(pairs, "pairs"), as_pairs(train_pairs, "train_pairs")
    n_a, n_o = attr_emb.shape[0], obj_emb.shape[0]
    for arr, name in ((p, "pairs"), (t, "train_pairs")):
        if len(arr) and (arr[:, 0].max() >= n_a or arr[:, 1].max() >= n_o):
            raise ValueError(f"{name} index an attribute/object beyond the {n_a} x {n_o} embeddings")
    a = F.normalize(attr_emb.detach().cpu().float(), dim=1)
    o = F.normalize(obj_emb.detach().cpu().float(), dim=1)
    sim_a, sim_o = a @ a.T, o @ o.T
    train = torch.zeros(n_a, n_o, dtype=torch.bool)
    train[torch.from_numpy(t[:, 0]), torch.from_numpy(t[:, 1])] = True
    # The reference skips o' == o (a' == a); for an unseen (a, o) that pair is not in train anyway.
    by_obj = torch.full((n_a, n_o), -1.0, dtype=torch.float64)
    for ai in range(n_a):
        cols = train[ai].nonzero().squeeze(1)
        if cols.numel():
            by_obj[ai] = sim_o[:, cols].max(dim=1).values.double().clamp(min=-1.0)
    by_attr = torch.full((n_a, n_o), -1.0, dtype=torch.float64)
    for oi in range(n_o):
        rows = train[:, oi].nonzero().squeeze(1)
        if rows.numel():
            by_attr[:, oi] = sim_a[:, rows].max(dim=1).values.double().clamp(min=-1.0)
    pa, po = torch.from_numpy(p[:, 0]), torch.from_numpy(p[:, 1])
    out = ((by_obj[pa, po] + by_attr[pa, po]) / 2).float()
    out[train[pa, po]] = 1.0
    return out


def _combine(
    val: torch.Tensor, idx: torch.Tensor, new_val: torch.Tensor, new_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max of two (value, column) candidates, first column on ties."""
    take = (new_val > val) | ((new_val == val) & (new_idx < idx))
    return torch.where(take, new_val, val), torch.where(take, new_idx, idx)


def choose_threshold(
    scores: ScoreSource,
    pairs: PairsLike,
    train_pairs: PairsLike,
    eval_pairs: PairsLike,
    attr_gt: IndexLike,
    obj_gt: IndexLike,
    pair_gt: IndexLike,
    feasibility: ArrayLike,
    n_thresholds: int = 50,
    criterion: Literal["AUC", "best_hm"] = "AUC",
    bias_steps: int = DEFAULT_BIAS_STEPS,
    chunk_size: int | None = None,
    large_bias: float = DEFAULT_LARGE_BIAS,
) -> ThresholdChoice:
    """Open-world feasibility threshold maximising validation AUC (default, as CSP / czsl ``test``).

    Thresholds: ``np.linspace(min, max, n_thresholds)`` of the unseen pairs' feasibility; an
    unseen pair is kept when ``feasibility >= threshold`` (compared in feasibility's dtype, as
    ``feasibility >= th`` in torch). The first best wins; if every value is 0 the reference keeps
    threshold -10 (all pairs), which is the mask of the first threshold, returned here. All
    thresholds come from one streaming pass (unseen pairs grouped by how many thresholds they
    pass). Apply to test with ``evaluate(..., open_world=True, feasible=feasibility >= threshold)``.
    """
    if criterion not in ("AUC", "best_hm"):
        raise ValueError(f"criterion must be 'AUC' or 'best_hm', got {criterion!r}")
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
    setup = prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, True, None)
    feas = to_tensor(feasibility, "feasibility")
    if feas.shape != (setup.n_pairs,) or not torch.isfinite(feas).all():
        raise ValueError(f"feasibility must be finite of shape ({setup.n_pairs},), got {tuple(feas.shape)}")
    unseen = ~setup.seen
    if not unseen.any():
        raise ValueError("every pair is seen: there is no unseen pair to threshold")
    f_unseen = feas[unseen].double()
    grid = np.linspace(float(f_unseen.min()), float(f_unseen.max()), n_thresholds)
    ths = torch.from_numpy(grid).to(feas.dtype)
    level = torch.searchsorted(ths, feas, right=True)  # pair is kept for thresholds k < level
    unseen_cols = unseen.nonzero().squeeze(1)  # all have level >= 1: the lowest threshold is the min
    groups = Groups.by_label(unseen_cols, level[unseen_cols] - 1, n_thresholds)  # group k: level k + 1
    summ = summarize(scores, setup, groups, chunk_size)
    val = torch.full_like(summ.seen_val, float("-inf"))
    idx = torch.full_like(summ.seen_idx, setup.n_pairs)
    results: list[CZSLResult] = []
    for k in range(n_thresholds - 1, -1, -1):  # threshold k keeps levels > k: groups k..n-1
        val, idx = _combine(val, idx, summ.unseen_val[:, k], summ.unseen_idx[:, k])

        def predict(bias: float, v: torch.Tensor = val, i: torch.Tensor = idx) -> torch.Tensor:
            return pick(summ.seen_val, summ.seen_idx, v, i, bias)

        kept = replace(setup, candidate=setup.seen | (level > k))
        results.append(bias_sweep(predict, summ.seen_val, summ.gt_val, kept, bias_steps, large_bias))
    results.reverse()
    values = [r[criterion] for r in results]
    best = int(np.argmax(values))
    return ThresholdChoice(float(ths[best]), criterion, [float(x) for x in ths], values, results[best])


def plot_curve(result: CZSLResult, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of seen vs unseen accuracy along the bias sweep, best-HM point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot state
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    u, s = result["unseen_curve"], result["seen_curve"]
    ax.plot(u, s, marker="o", markersize=3, label=f"AUC {result['AUC']:.2%}")
    ax.fill_between(u, s, alpha=0.15)
    ax.scatter(
        [result["hm_unseen"]],
        [result["hm_seen"]],
        marker="*",
        s=160,
        color="red",
        zorder=3,
        label=f"best HM {result['best_hm']:.2%} (bias {result['best_bias']:.3g})",
    )
    ax.set_xlabel("unseen accuracy")
    ax.set_ylabel("seen accuracy")
    ax.set_xlim(0, max(max(u), 0.01) * 1.05)
    ax.set_ylim(0, max(max(s), 0.01) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title if title is not None else "Seen / unseen accuracy over calibration bias")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
