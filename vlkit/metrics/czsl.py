"""Compositional zero-shot evaluation as published (bias curve, AUC, best HM), streamed over image chunks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CZSLResult",
    "ThresholdChoice",
    "choose_threshold",
    "evaluate",
    "evaluate_dense",
    "feasibility_scores",
    "plot_curve",
]

ArrayLike = torch.Tensor | np.ndarray
ScoreSource = ArrayLike | Callable[[int, int], ArrayLike] | Iterable[ArrayLike]
PairsLike = Sequence[tuple[int, int]] | np.ndarray | torch.Tensor
IndexLike = Sequence[int] | np.ndarray | torch.Tensor

GAP_MARGIN = 1e-4  # subtracted from every score gap in the reference (evaluate_predictions)
DEFAULT_LARGE_BIAS = 1e3  # the reference's --bias default: the "all unseen" end of the curve
DEFAULT_BIAS_STEPS = 20  # the reference's magic_binsize
DEFAULT_CHUNK_ELEMENTS = 1 << 25  # scores per block: 128 MB of float32, whatever the pair count


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
class _Setup:
    """Validated pair space and ground truth shared by every evaluation path."""

    pairs: torch.Tensor  # [P, 2] (attr, obj)
    seen: torch.Tensor  # [P] bool: pair in train_pairs
    candidate: torch.Tensor  # [P] bool: pair may be predicted
    attr_gt: torch.Tensor  # [N]
    obj_gt: torch.Tensor  # [N]
    pair_gt: torch.Tensor  # [N] column of the gt pair
    seen_img: torch.Tensor  # [N] bool: gt pair is seen

    @property
    def n_images(self) -> int:
        return int(self.pair_gt.numel())

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])


@dataclass(frozen=True)
class _Summary:
    """Per-image sufficient statistics: prediction at any bias needs only best seen and best unseen."""

    seen_val: torch.Tensor  # [N] best seen score (scores' dtype)
    seen_idx: torch.Tensor  # [N] its column (first one on ties)
    gt_val: torch.Tensor  # [N] score of the gt pair (unbiased, unmasked)
    unseen_val: torch.Tensor  # [N, G] best unseen candidate score per column group (-inf if empty)
    unseen_idx: torch.Tensor  # [N, G] its column (n_pairs if empty)


@dataclass(frozen=True)
class ThresholdChoice:
    """The feasibility threshold picked on validation, with the sweep that chose it."""

    threshold: float
    criterion: str
    thresholds: list[float]
    values: list[float]
    result: CZSLResult


# ----------------------------------------------------------------------------- validation


def _as_pairs(x: PairsLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer (attr_idx, obj_idx) pairs of shape [K, 2], got {arr.shape}")
    if (arr < 0).any():
        raise ValueError(f"{name} has negative attribute/object indices")
    return arr.astype(np.int64)


def _as_index(x: IndexLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_subset(keys: np.ndarray, pool: np.ndarray, arr: np.ndarray, name: str) -> None:
    missing = ~np.isin(keys, pool)
    if missing.any():
        a, o = arr[int(np.argmax(missing))]
        raise ValueError(f"{name} contains ({a}, {o}), which is not in pairs ({int(missing.sum())} missing)")


def _pair_masks(
    pairs: PairsLike, train_pairs: PairsLike, eval_pairs: PairsLike, open_world: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs [P,2], seen mask, candidate mask before feasibility)."""
    p = _as_pairs(pairs, "pairs")
    t = _as_pairs(train_pairs, "train_pairs")
    e = _as_pairs(eval_pairs, "eval_pairs")
    if len(p) == 0:
        raise ValueError("pairs is empty")
    width = int(max(p[:, 1].max(), t[:, 1].max(initial=0), e[:, 1].max(initial=0))) + 1
    pk, tk, ek = (a[:, 0] * width + a[:, 1] for a in (p, t, e))
    if len(np.unique(pk)) != len(pk):
        raise ValueError("pairs contains duplicate (attr, obj) entries")
    _check_subset(tk, pk, t, "train_pairs")
    _check_subset(ek, pk, e, "eval_pairs")
    seen = np.isin(pk, tk)
    if not seen.any():
        raise ValueError("train_pairs is empty: no seen pair to calibrate against")
    # Closed world: only train + val/test pairs are candidates (reference closed_mask).
    candidate = np.ones(len(p), dtype=bool) if open_world else np.isin(pk, np.concatenate([tk, ek]))
    return p, seen, candidate


def _prepare(
    pairs: PairsLike,
    train_pairs: PairsLike,
    eval_pairs: PairsLike,
    attr_gt: IndexLike,
    obj_gt: IndexLike,
    pair_gt: IndexLike,
    open_world: bool,
    feasible: ArrayLike | None,
) -> _Setup:
    p, seen, candidate = _pair_masks(pairs, train_pairs, eval_pairs, open_world)
    if feasible is not None:
        if not open_world:
            raise ValueError("feasible only applies to open-world evaluation (pass open_world=True)")
        f = np.asarray(feasible.detach().cpu() if isinstance(feasible, torch.Tensor) else feasible)
        if f.shape != (len(p),) or f.dtype != np.bool_:
            raise ValueError(f"feasible must be a boolean mask of shape ({len(p)},), got {f.dtype} {f.shape}")
        candidate = seen | f  # seen pairs are never filtered (reference: mask + seen_mask)
    a, o, g = _as_index(attr_gt, "attr_gt"), _as_index(obj_gt, "obj_gt"), _as_index(pair_gt, "pair_gt")
    if not len(a) == len(o) == len(g) > 0:
        raise ValueError(
            f"attr_gt, obj_gt, pair_gt must be non-empty and equally long, got {len(a)}, {len(o)}, {len(g)}"
        )
    bad = (g < 0) | (g >= len(p))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"pair_gt out of range: pair_gt[{i}] = {g[i]} but there are {len(p)} pairs")
    wrong = (p[g, 0] != a) | (p[g, 1] != o)
    if wrong.any():
        i = int(np.argmax(wrong))
        raise ValueError(
            f"image {i}: pair_gt points to pair ({p[g[i], 0]}, {p[g[i], 1]}) "
            f"but attr_gt/obj_gt say ({a[i]}, {o[i]})"
        )
    seen_img = seen[g]
    if seen_img.all() or not seen_img.any():
        kind = "unseen" if seen_img.all() else "seen"
        raise ValueError(f"no image has a {kind} gt pair: seen and unseen accuracy both need images")
    t = torch.from_numpy
    return _Setup(t(p), t(seen), t(candidate), t(a), t(o), t(g), t(seen_img))


# ----------------------------------------------------------------------------- score blocks


def _to_tensor(raw: object, what: str) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw if raw.flags.writeable else raw.copy())  # torch warns on read-only
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or numpy array, got {type(raw).__name__}")
    t = raw.detach().cpu()
    # float64 is kept (exact gaps); anything else is evaluated in float32 like the reference.
    return t if t.dtype == torch.float64 else t.float()


def _raw_blocks(scores: ScoreSource, n: int, p: int, rows: int) -> Iterator[object]:
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        if tuple(scores.shape) != (n, p):
            raise ValueError(
                f"scores has shape {tuple(scores.shape)}; expected (n_images, n_pairs) = ({n}, {p}) "
                "from the gt arrays and pairs"
            )
        return (scores[i : i + rows] for i in range(0, n, rows))
    if callable(scores):
        return (scores(i, min(i + rows, n)) for i in range(0, n, rows))
    if isinstance(scores, Iterable):
        return iter(scores)
    raise TypeError(
        f"scores must be a tensor, an array, a callable(start, stop) or an iterable, got {type(scores)}"
    )


def _iter_blocks(
    scores: ScoreSource, n: int, p: int, chunk_size: int | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) pairs of at most ``chunk_size`` rows, validated, covering all n rows once."""
    rows = chunk_size if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // p)
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rows}")
    start = 0
    for raw in _raw_blocks(scores, n, p, rows):
        block = _to_tensor(raw, "a score chunk")
        if block.ndim != 2 or block.shape[1] != p:
            raise ValueError(
                f"score chunk at row {start} has shape {tuple(block.shape)}; expected (rows, {p})"
            )
        if callable(scores) and block.shape[0] != min(rows, n - start):
            raise ValueError(f"scores({start}, {min(start + rows, n)}) returned {block.shape[0]} rows")
        if start + block.shape[0] > n:
            raise ValueError(f"score chunks have more rows than the {n} images")
        for sub in block.split(rows):
            if sub.shape[0] == 0:  # an empty chunk from an iterator: nothing to check (aminmax needs data)
                continue
            lo, hi = torch.aminmax(sub)  # one pass, no mask allocation; NaN propagates
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"scores contain NaN or inf in rows {start}..{start + len(sub) - 1}")
            yield start, sub
            start += sub.shape[0]
    if start != n:
        raise ValueError(f"score chunks cover {start} rows but there are {n} images")


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
class _Groups:
    """Unseen candidate columns split into groups: group g is ``cols[bounds[g]:bounds[g + 1]]``, ascending."""

    cols: torch.Tensor
    bounds: list[int]

    @classmethod
    def by_label(cls, cols: torch.Tensor, label: torch.Tensor, n_groups: int) -> _Groups:
        order = torch.argsort(label, stable=True)  # stable: columns stay ascending inside a group
        counts = torch.bincount(label, minlength=n_groups).tolist()
        return cls(cols[order], [0, *np.cumsum(counts).tolist()])


def _block_summary(
    block: torch.Tensor,
    seen_cols: torch.Tensor,
    groups: _Groups,
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


def _summarize(scores: ScoreSource, setup: _Setup, groups: _Groups, chunk_size: int | None) -> _Summary:
    """One streaming pass: per image, best seen and best unseen candidate (per column group)."""
    seen_cols = setup.seen.nonzero().squeeze(1)
    scratch = _Scratch()
    parts = []
    for start, block in _iter_blocks(scores, setup.n_images, setup.n_pairs, chunk_size):
        gt_cols = setup.pair_gt[start : start + block.shape[0]]
        parts.append(_block_summary(block, seen_cols, groups, gt_cols, setup.n_pairs, scratch))
    return _Summary(*(torch.cat(x) for x in zip(*parts, strict=True)))


# ----------------------------------------------------------------------------- protocol


def _pick(
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


def _accuracies(pred: torch.Tensor, setup: _Setup) -> tuple[float, float]:
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


def _sweep(
    predict: Callable[[float], torch.Tensor],
    max_seen: torch.Tensor,
    gt_val: torch.Tensor,
    setup: _Setup,
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
    setup = _prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, open_world, feasible)
    unseen_cols = (setup.candidate & ~setup.seen).nonzero().squeeze(1)
    summ = _summarize(scores, setup, _Groups(unseen_cols, [0, unseen_cols.numel()]), chunk_size)

    def predict(bias: float) -> torch.Tensor:
        return _pick(summ.seen_val, summ.seen_idx, summ.unseen_val[:, 0], summ.unseen_idx[:, 0], bias)

    return _sweep(predict, summ.seen_val, summ.gt_val, setup, bias_steps, large_bias)


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
    setup = _prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, open_world, feasible)
    full = torch.cat([b for _, b in _iter_blocks(scores, setup.n_images, setup.n_pairs, None)])
    full64 = full.double()

    def predict(bias: float) -> torch.Tensor:
        bias_row = torch.zeros(setup.n_pairs, dtype=torch.float64).masked_fill(~setup.seen, bias)
        biased = full64 + bias_row  # bias on unseen columns only; + 0.0 leaves seen scores unchanged
        biased = biased.masked_fill(~setup.candidate, float("-inf"))
        return biased.argmax(dim=1)  # first index among ties

    max_seen = full[:, setup.seen].max(dim=1).values
    gt_val = full[torch.arange(setup.n_images), setup.pair_gt]
    return _sweep(predict, max_seen, gt_val, setup, bias_steps, large_bias)


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
    p, t = _as_pairs(pairs, "pairs"), _as_pairs(train_pairs, "train_pairs")
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
    setup = _prepare(pairs, train_pairs, eval_pairs, attr_gt, obj_gt, pair_gt, True, None)
    feas = _to_tensor(feasibility, "feasibility")
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
    groups = _Groups.by_label(unseen_cols, level[unseen_cols] - 1, n_thresholds)  # group k: level k + 1
    summ = _summarize(scores, setup, groups, chunk_size)
    val = torch.full_like(summ.seen_val, float("-inf"))
    idx = torch.full_like(summ.seen_idx, setup.n_pairs)
    results: list[CZSLResult] = []
    for k in range(n_thresholds - 1, -1, -1):  # threshold k keeps levels > k: groups k..n-1
        val, idx = _combine(val, idx, summ.unseen_val[:, k], summ.unseen_idx[:, k])

        def predict(bias: float, v: torch.Tensor = val, i: torch.Tensor = idx) -> torch.Tensor:
            return _pick(summ.seen_val, summ.seen_idx, v, i, bias)

        kept = replace(setup, candidate=setup.seen | (level > k))
        results.append(_sweep(predict, summ.seen_val, summ.gt_val, kept, bias_steps, large_bias))
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
