"""Checked inputs of CZSL evaluation: the pair space with its ground truth, and scores as validated row blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
ScoreSource = ArrayLike | Callable[[int, int], ArrayLike] | Iterable[ArrayLike]
PairsLike = Sequence[tuple[int, int]] | np.ndarray | torch.Tensor
IndexLike = Sequence[int] | np.ndarray | torch.Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # scores per block: 128 MB of float32, whatever the pair count


@dataclass(frozen=True)
class Setup:
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


# ----------------------------------------------------------------------------- validation


def as_pairs(x: PairsLike, name: str) -> np.ndarray:
    """``x`` as an int64 [K, 2] array of non-negative (attr_idx, obj_idx) pairs; ValueError naming ``name``."""
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
    p = as_pairs(pairs, "pairs")
    t = as_pairs(train_pairs, "train_pairs")
    e = as_pairs(eval_pairs, "eval_pairs")
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


def prepare(
    pairs: PairsLike,
    train_pairs: PairsLike,
    eval_pairs: PairsLike,
    attr_gt: IndexLike,
    obj_gt: IndexLike,
    pair_gt: IndexLike,
    open_world: bool,
    feasible: ArrayLike | None,
) -> Setup:
    """Validate the pair space, the ground truth and the feasibility mask into the Setup every path shares."""
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
    return Setup(t(p), t(seen), t(candidate), t(a), t(o), t(g), t(seen_img))


# ----------------------------------------------------------------------------- score blocks


def to_tensor(raw: object, what: str) -> torch.Tensor:
    """A detached CPU tensor of a tensor or numpy array (float64 kept, anything else float32)."""
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


def iter_blocks(
    scores: ScoreSource, n: int, p: int, chunk_size: int | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) pairs of at most ``chunk_size`` rows, validated, covering all n rows once."""
    rows = chunk_size if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // p)
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rows}")
    start = 0
    for raw in _raw_blocks(scores, n, p, rows):
        block = to_tensor(raw, "a score chunk")
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
