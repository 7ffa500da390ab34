"""Image-text retrieval losses (VSE++ hinge ranking, multi-positive InfoNCE, their weighted sum) in a registry."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch

from vlkit.registry import Registry, did_you_mean

__all__ = ["LOSSES", "combined_loss", "contrastive_loss", "positive_mask", "ranking_loss"]

LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("loss")

_REDUCTIONS = ("mean", "sum")


def _check_inputs(img: torch.Tensor, txt: torch.Tensor, pos_mask: torch.Tensor) -> None:
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"need img [B_img, D] and txt [B_txt, D] with the same D, got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if pos_mask.dtype != torch.bool or tuple(pos_mask.shape) != (img.shape[0], txt.shape[0]):
        raise ValueError(
            f"pos_mask must be a bool tensor of shape [B_img, B_txt] = {(img.shape[0], txt.shape[0])}, got "
            f"{pos_mask.dtype} {tuple(pos_mask.shape)}: build it with positive_mask(image_ids, captions)"
        )
    if not bool(pos_mask.any()):
        raise ValueError(
            "pos_mask has no positive pair: every batch needs at least one matching (image, text)"
        )


@LOSSES.register("ranking")
def ranking_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    pos_mask: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """VSE++ bidirectional hinge loss on similarities ``s = img @ txt.T`` (pass L2-normalised embeddings).

    For every positive pair (i, t) of ``pos_mask`` [B_img, B_txt]:
    caption retrieval sums ``[margin - s(i,t) + s(i,t')]_+`` over texts t' that are not positives of i,
    image retrieval sums ``[margin - s(i,t) + s(i',t)]_+`` over images i' that are not positives of t.
    Other positives (a duplicate caption, another caption of the same image) are never negatives.
    With ``max_violation`` only the hardest negative per positive and direction counts (VSE++ "MH").
    ``reduction="sum"`` is VSE++'s exact scale (grows with the batch size); the default ``"mean"``
    averages the per-positive cost over positive pairs so the learning rate does not depend on batch size.
    """
    _check_inputs(img, txt, pos_mask)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    scores = img @ txt.T
    pi, pt = torch.nonzero(pos_mask, as_tuple=True)
    pos_scores = scores[pi, pt].unsqueeze(1)  # [P, 1]
    # [P, B_txt]: image pi as query against every text; positives of pi are zeroed, not negatives.
    cost_txt = (margin - pos_scores + scores[pi]).clamp(min=0).masked_fill(pos_mask[pi], 0.0)
    # [P, B_img]: text pt as query against every image.
    cost_img = (margin - pos_scores + scores[:, pt].T).clamp(min=0).masked_fill(pos_mask[:, pt].T, 0.0)
    if max_violation:
        # The hinge is >= 0, so a row with no negative at all (all zeros) contributes 0.
        per_pos = cost_txt.amax(dim=1) + cost_img.amax(dim=1)
    else:
        per_pos = cost_txt.sum(dim=1) + cost_img.sum(dim=1)
    return per_pos.sum() if reduction == "sum" else per_pos.mean()


@LOSSES.register("contrastive")
def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    pos_mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric InfoNCE on ``logit_scale * img @ txt.T`` with several positives per row allowed.

    ``logit_scale`` is the multiplier itself (already exponentiated, like ``backbone.logit_scale``).
    Each image row costs ``logsumexp(all logits) - logsumexp(logits of its positives)``, i.e. minus
    the log of the softmax mass on its positives, and each text column likewise; the result is the
    mean of the image-row mean and the text-column mean. With one positive per row this is CLIP's
    loss. Summing the mass (rather than averaging per-positive log-probabilities) means a duplicate
    caption is not pushed below its twin: the two share the mass without penalty.
    Every image row needs a positive. A text column without one (an extra hard-negative caption) only
    competes in the image rows; the text-column mean runs over the columns that have a positive.
    """
    _check_inputs(img, txt, pos_mask)
    empty = torch.nonzero(~pos_mask.any(dim=1)).reshape(-1)
    if empty.numel():
        raise ValueError(
            f"image row(s) {empty[:10].tolist()} of pos_mask have no positive: the contrastive loss needs "
            f"one per image (positive_mask(image_ids, captions) always marks a pair's own caption)"
        )
    logits = logit_scale * (img @ txt.T)
    pos_logits = logits.masked_fill(~pos_mask, float("-inf"))
    loss_i2t = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
    matched = pos_mask.any(dim=0)
    loss_t2i = torch.logsumexp(logits[:, matched], dim=0) - torch.logsumexp(pos_logits[:, matched], dim=0)
    return (loss_i2t.mean() + loss_t2i.mean()) / 2


_COMBINABLE = ("ranking", "contrastive")


@LOSSES.register("combined")
def combined_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    pos_mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weights: Mapping[str, float] | None = None,
    margin: float = 0.2,
    max_violation: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """``sum(weights[name] * loss_name)`` over ``"ranking"`` and ``"contrastive"`` (default weight 1 each).

    A zero weight skips that loss entirely; the other arguments go to the loss that uses them.
    """
    weights = dict(weights) if weights is not None else {"ranking": 1.0, "contrastive": 1.0}
    for name, w in weights.items():
        if name not in _COMBINABLE:
            raise KeyError(
                f"unknown loss {name!r} in combined_loss weights.{did_you_mean(name, _COMBINABLE)} "
                f"Valid names: {', '.join(_COMBINABLE)}"
            )
        if w < 0:
            raise ValueError(f"loss weights must be >= 0, got {name}={w}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"combined_loss needs at least one positive weight, got {weights}")
    total = img.new_zeros(())
    if weights.get("ranking", 0.0) > 0:
        rank = ranking_loss(
            img, txt, pos_mask, margin=margin, max_violation=max_violation, reduction=reduction
        )
        total = total + weights["ranking"] * rank
    if weights.get("contrastive", 0.0) > 0:
        total = total + weights["contrastive"] * contrastive_loss(img, txt, pos_mask, logit_scale)
    return total


def _normalize_caption(caption: str) -> str:
    # Case and whitespace differences are annotation noise, not different captions.
    return " ".join(caption.lower().split())


def _factorize(values: Sequence[Hashable]) -> torch.Tensor:
    codes: dict[Hashable, int] = {}
    return torch.tensor([codes.setdefault(v, len(codes)) for v in values], dtype=torch.long)


def positive_mask(
    image_ids: Sequence[Hashable] | torch.Tensor,
    captions: Sequence[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool [B, B] for a batch of (image, caption) pairs: [i, j] is True when pair i's image and pair
    j's caption match, i.e. the same image id OR the same caption after lowercasing and collapsing
    whitespace. The diagonal is always True."""
    ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
    if len(ids) != len(captions):
        raise ValueError(
            f"image_ids and captions must have one entry per pair, got {len(ids)} and {len(captions)}"
        )
    if any(not isinstance(c, str) for c in captions):
        raise TypeError("captions must be strings (the raw caption text, before tokenization)")
    img_codes = _factorize(ids)
    cap_codes = _factorize([_normalize_caption(c) for c in captions])
    mask = (img_codes[:, None] == img_codes[None, :]) | (cap_codes[:, None] == cap_codes[None, :])
    return mask if device is None else mask.to(device)
