"""Cross-modal retrieval Recall@K (text->image and image->text) over a similarity matrix, computed in chunks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

__all__ = ["Positives", "positives_from_index", "recall_at_k", "similarity_in_chunks"]


def _as_tensor(x: ArrayLike | Sequence[int], name: str) -> torch.Tensor:
    """A torch view of ``x``; numpy arrays are shared, not copied (the sim matrix can be large)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from e


class Positives:
    """The positive (text, image) pairs of a retrieval split, stored sparsely.

    A text may match several images and an image several texts. Dense boolean blocks are only built
    for one chunk of rows (``rows``) or columns (``cols``) at a time, so a 25k x 5k split never
    needs a full dense mask. Build with ``Positives.from_pairs``, ``Positives.from_dense`` or
    ``positives_from_index`` (one image per caption, the usual COCO / Flickr30k layout).
    """

    def __init__(self, text_idx: torch.Tensor, image_idx: torch.Tensor, n_texts: int, n_images: int) -> None:
        text_idx = text_idx.reshape(-1).long().cpu()
        image_idx = image_idx.reshape(-1).long().cpu()
        if text_idx.numel() != image_idx.numel():
            raise ValueError(
                f"text_idx and image_idx must pair up, got {text_idx.numel()} and {image_idx.numel()} entries"
            )
        _check_range(text_idx, n_texts, "text index")
        _check_range(image_idx, n_images, "image index")
        self.n_texts, self.n_images = int(n_texts), int(n_images)
        # Two sort orders so a chunk of rows or of columns is one contiguous slice (searchsorted).
        order = torch.argsort(text_idx, stable=True)
        self._t_by_text, self._i_by_text = text_idx[order], image_idx[order]
        order = torch.argsort(image_idx, stable=True)
        self._t_by_image, self._i_by_image = text_idx[order], image_idx[order]

    @classmethod
    def from_pairs(
        cls,
        text_idx: ArrayLike | Sequence[int],
        image_idx: ArrayLike | Sequence[int],
        n_texts: int,
        n_images: int,
    ) -> Positives:
        """Positives from parallel lists of (text index, image index) pairs."""
        return cls(_as_tensor(text_idx, "text_idx"), _as_tensor(image_idx, "image_idx"), n_texts, n_images)

    @classmethod
    def from_dense(cls, mask: ArrayLike) -> Positives:
        """Positives from a dense boolean matrix [n_texts, n_images]."""
        m = _as_tensor(mask, "positives")
        if m.ndim != 2:
            raise ValueError(
                f"a dense positives mask must be 2-D [n_texts, n_images], got shape {tuple(m.shape)}"
            )
        if m.dtype != torch.bool:
            raise TypeError(
                f"a dense positives mask must be boolean, got {m.dtype}: pass mask.bool() / mask != 0"
            )
        t, i = torch.nonzero(m.cpu(), as_tuple=True)
        return cls(t, i, m.shape[0], m.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_texts, self.n_images)

    def images_per_text(self) -> torch.Tensor:
        return torch.bincount(self._t_by_text, minlength=self.n_texts)

    def texts_per_image(self) -> torch.Tensor:
        return torch.bincount(self._i_by_image, minlength=self.n_images)

    def rows(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense bool block [end - start, n_images] for texts start..end-1."""
        lo, hi = torch.searchsorted(self._t_by_text, torch.tensor([start, end])).tolist()
        block = torch.zeros(end - start, self.n_images, dtype=torch.bool, device=device)
        block[(self._t_by_text[lo:hi] - start).to(device), self._i_by_text[lo:hi].to(device)] = True
        return block

    def cols(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense bool block [n_texts, end - start] for images start..end-1."""
        lo, hi = torch.searchsorted(self._i_by_image, torch.tensor([start, end])).tolist()
        block = torch.zeros(self.n_texts, end - start, dtype=torch.bool, device=device)
        block[self._t_by_image[lo:hi].to(device), (self._i_by_image[lo:hi] - start).to(device)] = True
        return block


def _check_range(idx: torch.Tensor, n: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(
            f"{what} out of range: got values in [{int(idx.min())}, {int(idx.max())}] for size {n}"
        )


def positives_from_index(
    caption_image_index: ArrayLike | Sequence[int], n_images: int | None = None
) -> Positives:
    """Positives where caption ``t`` matches exactly image ``caption_image_index[t]``.

    ``n_images`` defaults to ``max(index) + 1``; pass it when trailing images have no caption, so
    that the error about them names the right images.
    """
    idx = _as_tensor(caption_image_index, "caption_image_index").reshape(-1).long().cpu()
    if idx.numel() == 0:
        raise ValueError("caption_image_index is empty: there is nothing to evaluate")
    n_img = int(idx.max()) + 1 if n_images is None else int(n_images)
    return Positives(torch.arange(idx.numel()), idx, idx.numel(), n_img)


def _as_positives(positives: Positives | ArrayLike, shape: tuple[int, int]) -> Positives:
    if isinstance(positives, Positives):
        pos = positives
    else:
        p = _as_tensor(positives, "positives")
        if p.ndim == 1:  # index form: text t matches image p[t]
            if p.dtype.is_floating_point or p.dtype == torch.bool:
                raise TypeError(f"1-D positives must be integer image indices per text, got {p.dtype}")
            pos = positives_from_index(p, shape[1])
        else:
            pos = Positives.from_dense(p)
    if pos.shape != shape:
        raise ValueError(
            f"positives have shape {pos.shape} but sim has shape {shape} (both [n_texts, n_images])"
        )
    return pos


def _check_every_query_has_positive(pos: Positives) -> None:
    for counts, what, other in (
        (pos.images_per_text(), "text", "image"),
        (pos.texts_per_image(), "image", "text"),
    ):
        missing = torch.nonzero(counts == 0).reshape(-1)
        if missing.numel():
            shown = ", ".join(str(i) for i in missing[:10].tolist()) + (
                ", ..." if missing.numel() > 10 else ""
            )
            raise ValueError(
                f"{missing.numel()} {what}(s) have no positive {other} (indices {shown}): every {what} is a "
                f"query and needs at least one positive; drop those {what}s from sim or fix the positives"
            )


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return out


def _pessimistic_rank(scores: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """0-based rank of each query's best positive, counting every negative that scores >= it.

    Pessimistic on ties so that a degenerate model (e.g. constant scores) cannot look good; other
    positives tied with the best one are not counted against it.
    """
    if torch.isnan(scores).any():
        raise ValueError("sim contains NaN: check the embeddings (a zero vector normalised gives NaN)")
    neg = ~pos
    best = scores.masked_fill(neg, float("-inf")).amax(dim=dim, keepdim=True)
    beaten = scores >= best
    beaten &= neg  # in place: this block is the largest temporary of the metric
    return beaten.sum(dim=dim)


def recall_at_k(
    sim: ArrayLike,
    positives: Positives | ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K in percent (0-100) for text->image (``t2i_R@k``) and image->text (``i2t_R@k``), plus ``rsum``.

    ``sim`` is [n_texts, n_images] (torch or numpy, any float dtype, any device). ``positives`` is a
    ``Positives``, a dense bool matrix of the same shape, or a 1-D integer tensor giving each text's
    single image (see ``positives_from_index``). A text query is a hit at k when any positive image
    is in its top k; likewise an image query with its positive texts. Ties are broken
    pessimistically: the rank of a query is the number of negatives scoring >= its best positive.
    Work is done ``chunk_size`` rows (t2i) or columns (i2t) at a time, so the extra memory is about
    ``chunk_size * max(n_texts, n_images) * 8`` bytes on top of ``sim`` itself.
    """
    s = _as_tensor(sim, "sim")
    if s.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_texts, n_images], got shape {tuple(s.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_t, n_i = s.shape
    pos = _as_positives(positives, (n_t, n_i))
    _check_every_query_has_positive(pos)
    ks_sorted = _check_ks(ks)
    k_t = torch.tensor(ks_sorted, device=s.device)

    hits_t2i = torch.zeros(len(ks_sorted), dtype=torch.long, device=s.device)
    for start in range(0, n_t, chunk_size):
        end = min(start + chunk_size, n_t)
        rank = _pessimistic_rank(s[start:end].float(), pos.rows(start, end, s.device), dim=1)
        hits_t2i += (rank[:, None] < k_t).sum(dim=0)
    hits_i2t = torch.zeros_like(hits_t2i)
    for start in range(0, n_i, chunk_size):
        end = min(start + chunk_size, n_i)
        rank = _pessimistic_rank(s[:, start:end].float(), pos.cols(start, end, s.device), dim=0)
        hits_i2t += (rank[:, None] < k_t).sum(dim=0)

    out: dict[str, float] = {}
    for j, k in enumerate(ks_sorted):
        out[f"t2i_R@{k}"] = 100.0 * hits_t2i[j].item() / n_t
    for j, k in enumerate(ks_sorted):
        out[f"i2t_R@{k}"] = 100.0 * hits_i2t[j].item() / n_i
    out["rsum"] = sum(out.values())
    return out


def similarity_in_chunks(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    chunk_size: int = 4096,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``text_emb @ image_emb.T`` as float32 on ``out_device``, computed ``chunk_size`` texts at a time.

    Lets the embeddings live on a GPU while the full [n_texts, n_images] matrix is only ever
    materialised on ``out_device`` (usually host memory). Normalise the embeddings first for cosine.
    """
    if text_emb.ndim != 2 or image_emb.ndim != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(
            f"need text_emb [n_texts, D] and image_emb [n_images, D] with the same D, got "
            f"{tuple(text_emb.shape)} and {tuple(image_emb.shape)}"
        )
    out = torch.empty(text_emb.shape[0], image_emb.shape[0], dtype=torch.float32, device=out_device)
    img_t = image_emb.T
    for start in range(0, text_emb.shape[0], chunk_size):
        block = text_emb[start : start + chunk_size].to(img_t.device) @ img_t
        out[start : start + block.shape[0]] = block.float().to(out_device)
    return out
