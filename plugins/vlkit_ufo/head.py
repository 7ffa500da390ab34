"""UFO mask head: query decoder, pixel-shuffle mask assembly, training-free baseline and post-processing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Instances",
    "QueryDecoder",
    "assemble_masks",
    "masks_to_boxes",
    "predict",
    "semantic_labels",
    "training_free_logits",
]


def _upsample_factor(num_embeds: int) -> int:
    r = math.isqrt(num_embeds)
    if r * r != num_embeds:
        raise ValueError(f"the number of mask embeddings must be a square r*r, got {num_embeds}")
    return r


def assemble_masks(mask_emb: Tensor, feats: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
    """Turn per-instance mask embeddings into mask logits, UFO style.

    Args:
        mask_emb: [B, N, K, C] with K = r*r embeddings per instance (UFO: K=16, r=4).
        feats: [B, h, w, C] dense patch features.
        out_size: (H, W) for a final bilinear resize (align_corners=False, as UFO); None keeps [r*h, r*w].

    Returns:
        logits [B, N, H, W] (no sigmoid).

    Each embedding k gives one map ``emb_k . feat / sqrt(C)`` of size [h, w]; the K maps are interleaved
    with ``pixel_shuffle`` semantics: map k = r*dy + dx fills position (r*y + dy, r*x + dx). This is the
    same layout as UFO's ``view(N, 4, 4, h, w).permute(0, 3, 1, 4, 2)`` (its first 4 is dy, second dx).
    """
    if mask_emb.dim() != 4 or feats.dim() != 4:
        raise ValueError(f"expected mask_emb [B,N,K,C] and feats [B,h,w,C], got {tuple(mask_emb.shape)}, {tuple(feats.shape)}")
    b, n, k, c = mask_emb.shape
    if feats.shape[0] != b or feats.shape[-1] != c:
        raise ValueError(f"batch/channel mismatch: mask_emb {tuple(mask_emb.shape)} vs feats {tuple(feats.shape)}")
    r = _upsample_factor(k)
    h, w = feats.shape[1:3]
    maps = torch.einsum("bnkc,bhwc->bnkhw", mask_emb, feats.to(mask_emb.dtype)) / math.sqrt(c)
    logits = F.pixel_shuffle(maps.reshape(b * n, k, h, w), r)  # [B*N, 1, r*h, r*w]
    if out_size is not None and tuple(out_size) != (r * h, r * w):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.reshape(b, n, *logits.shape[-2:])


def training_free_logits(
    text_emb: Tensor, feats: Tensor, scale: float | Tensor = 1.0, out_size: tuple[int, int] | None = None
) -> Tensor:
    """Zero-training baseline: cosine similarity between each patch feature and each query text embedding.

    Args:
        text_emb: [Q, D] queries shared by every image, or [B, Q, D] per-image queries (a single query per
            image is [B, 1, D]; a 2-D input is always read as shared so [B, D] is never ambiguous with [Q, D]).
        feats: [B, h, w, D] dense features (e.g. ``bb.dense_features(..., mode="maskclip")``).
        scale: multiplies the cosine (in [-1, 1]). 1.0 returns the raw cosine; pass ``bb.logit_scale``
            (CLIP's 1/temperature, ~100) for logits on CLIP's classification scale, e.g. a softmax over Q.
            Argmax over Q (semantic segmentation) does not depend on it; a binary mask needs a threshold
            calibrated on the cosine, since CLIP cosines of matching pairs are small (~0.2-0.3).
        out_size: optional (H, W) bilinear resize.

    Returns:
        [B, Q, h, w] (or [B, Q, H, W]).
    """
    if feats.dim() != 4:
        raise ValueError(f"feats must be [B,h,w,D], got {tuple(feats.shape)}")
    if text_emb.dim() == 2:
        text_emb = text_emb.unsqueeze(0).expand(feats.shape[0], -1, -1)
    if text_emb.dim() != 3 or text_emb.shape[0] != feats.shape[0] or text_emb.shape[-1] != feats.shape[-1]:
        raise ValueError(f"text_emb {tuple(text_emb.shape)} does not fit feats {tuple(feats.shape)}")
    t = F.normalize(text_emb.float(), dim=-1)
    f = F.normalize(feats.float(), dim=-1)
    logits = torch.einsum("bqd,bhwd->bqhw", t, f) * scale
    if out_size is not None:
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


def _sine_pos_2d(h: int, w: int, dim: int, device: torch.device) -> Tensor:
    """Fixed 2-D sine/cosine position code [h*w, dim] (dim % 4 == 0): lets slots separate look-alike instances."""
    if dim % 4:
        raise ValueError(f"width must be divisible by 4 for the 2-D position code, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # [h, q]
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # [w, q]
    y_code = torch.cat([ys.sin(), ys.cos()], dim=-1)[:, None, :].expand(h, w, 2 * quarter)
    x_code = torch.cat([xs.sin(), xs.cos()], dim=-1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([y_code, x_code], dim=-1).reshape(h * w, dim)


def _attention(mha: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``mha(q, k, v)[0]`` (batch first, no mask) computed directly from its weights with one fused
    attention kernel: the same numbers without nn.MultiheadAttention's per-call checks, which cost more
    than the arithmetic at this head's size."""
    w, b = mha.in_proj_weight, mha.in_proj_bias
    d, heads = mha.embed_dim, mha.num_heads
    if q is k and k is v:
        qp, kp, vp = F.linear(q, w, b).chunk(3, dim=-1)
    else:
        qp = F.linear(q, w[:d], b[:d])
        kp = F.linear(k, w[d:2 * d], b[d:2 * d])
        vp = F.linear(v, w[2 * d:], b[2 * d:])

    def split(x: Tensor) -> Tensor:  # [B, L, d] -> [B, heads, L, d / heads]
        return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)

    drop = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(split(qp), split(kp), split(vp), dropout_p=drop)
    return mha.out_proj(out.transpose(1, 2).flatten(-2))


class _DecoderLayer(nn.Module):
    """Pre-norm cross-attention (slots -> patches), self-attention (slots <-> slots), MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_s = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_m = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, mem: Tensor, mem_pos: Tensor) -> Tensor:
        """``mem_pos`` = ``mem`` plus the position code (the keys; ``mem`` alone gives the values)."""
        x = x + _attention(self.cross, self.norm_q(x), mem_pos, mem)
        s = self.norm_s(x)
        x = x + _attention(self.self_attn, s, s, s)
        return x + self.mlp(self.norm_m(x))


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class QueryDecoder(nn.Module):
    """Small decoder from (query text embedding, patch features) to N instance slots plus a semantic mask.

    Token layout per image: [semantic token, slot_1 .. slot_N], each = learned embedding + projected query.
    The tokens run through ``num_layers`` cross/self-attention layers over the projected patch features
    (plus a fixed 2-D sine position code). Each slot yields an objectness logit and K mask embeddings in the
    backbone's joint space (so they dot with the raw patch features, as in UFO); the semantic token yields
    one query-level set of K embeddings. With ``query_skip`` the query embedding itself is added to every
    mask embedding, so before training the masks start from the training-free similarity map instead of noise.

    ``forward`` returns a dict:
        ``obj_logits`` [B, N], ``mask_emb`` [B, N, K, D], ``mask_logits`` [B, N, H, W],
        ``sem_emb`` [B, K, D], ``sem_logits`` [B, H, W]; (H, W) = out_size or (r*h, r*w).
    """

    def __init__(
        self,
        embed_dim: int,
        num_slots: int = 10,
        width: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        num_mask_embeds: int = 16,
        dropout: float = 0.0,
        query_skip: bool = True,
    ) -> None:
        super().__init__()
        _upsample_factor(num_mask_embeds)
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_slots, self.width = embed_dim, num_slots, width
        self.num_mask_embeds, self.query_skip = num_mask_embeds, query_skip
        self.feat_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.query_proj = nn.Linear(embed_dim, width)
        self.tokens = nn.Parameter(torch.randn(num_slots + 1, width) * 0.02)  # [semantic, slots...]
        self.layers = nn.ModuleList(_DecoderLayer(width, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.obj_head = nn.Linear(width, 1)
        self.mask_head = _mlp(width, width, num_mask_embeds * embed_dim)
        self.sem_head = _mlp(width, width, num_mask_embeds * embed_dim)
        self._pos, self._pos_key = None, None

    def _position(self, h: int, w: int, like: Tensor) -> Tensor:
        key = (h, w, like.device, like.dtype)
        if self._pos_key != key:  # the same grid every call: computed once
            self._pos, self._pos_key = _sine_pos_2d(h, w, self.width, like.device).to(like.dtype)[None], key
        return self._pos

    def _tokens(self, query: Tensor, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised tokens [B, 1+N, W], query [B, D], feats [B, h, w, D]) in the head's dtype."""
        if query.dim() != 2 or feats.dim() != 4 or query.shape[0] != feats.shape[0]:
            raise ValueError(f"expected query [B,D] and feats [B,h,w,D], got {tuple(query.shape)}, {tuple(feats.shape)}")
        if query.shape[-1] != self.embed_dim or feats.shape[-1] != self.embed_dim:
            raise ValueError(f"embed dim mismatch: decoder {self.embed_dim}, query {query.shape[-1]}, feats {feats.shape[-1]}")
        b, h, w, d = feats.shape
        feats = feats.to(self.tokens.dtype)
        query = query.to(self.tokens.dtype)
        mem = self.feat_proj(feats.reshape(b, h * w, d))
        mem_pos = mem + self._position(h, w, mem)
        x = self.tokens.unsqueeze(0) + self.query_proj(query).unsqueeze(1)  # [B, 1+N, W]
        for layer in self.layers:
            x = layer(x, mem, mem_pos)
        return self.norm(x), query, feats

    def _embeds(self, head: nn.Module, tokens: Tensor, query: Tensor) -> Tensor:
        """[..., W] tokens -> [..., K, D] mask embeddings (plus the query itself with query_skip)."""
        emb = head(tokens).unflatten(-1, (self.num_mask_embeds, self.embed_dim))
        if self.query_skip:
            emb = emb + query.reshape(query.shape[0], *([1] * (emb.dim() - 2)), self.embed_dim)
        return emb

    def forward(self, query: Tensor, feats: Tensor, out_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        x, query, feats = self._tokens(query, feats)
        sem_tok, slots = x[:, 0], x[:, 1:]
        mask_emb = self._embeds(self.mask_head, slots, query)
        sem_emb = self._embeds(self.sem_head, sem_tok, query)
        return {
            "obj_logits": self.obj_head(slots).squeeze(-1),
            "mask_emb": mask_emb,
            "mask_logits": assemble_masks(mask_emb, feats, out_size),
            "sem_emb": sem_emb,
            "sem_logits": assemble_masks(sem_emb.unsqueeze(1), feats, out_size).squeeze(1),
        }

    def candidates(self, query: Tensor, feats: Tensor, min_objectness: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Inference for one image: (slot indices [n], objectness logits [n], mask logits [n, r*h, r*w]) of
        the slots whose sigmoid(objectness) exceeds ``min_objectness``, without the semantic branch.

        A slot's score (``predict``) is sigmoid(objectness) times a mean probability <= 1, so a slot at or
        below a score threshold t never has objectness above t: pass t here and only slots that can
        pass are decoded into masks, which is most of the head's work."""
        if query.shape[0] != 1:
            raise ValueError(f"candidates() takes one image and one query, got a batch of {query.shape[0]}")
        x, query, feats = self._tokens(query, feats)
        slots = x[0, 1:]
        obj = self.obj_head(slots).squeeze(-1)
        keep = (obj.sigmoid() > min_objectness).nonzero().squeeze(1)
        emb = self._embeds(self.mask_head, slots[keep], query)  # [n, K, D]
        return keep, obj[keep], assemble_masks(emb[None], feats)[0]


def masks_to_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes of binary masks, in pixel-edge xyxy coordinates.

    Args:
        masks: [N, H, W] bool (any dtype; nonzero = foreground).

    Returns:
        (boxes [N, 4] float xyxy, valid [N] bool). A mask covering columns 2..4 gets x1=2, x2=5, so
        x2 - x1 is the pixel width, matching pycocotools' ``toBbox`` ([x, y, w, h]). Empty masks get an
        all-zero box and ``valid=False``.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N,H,W], got {tuple(masks.shape)}")
    m = masks.bool()
    n, h, w = m.shape
    cols, rows = m.any(dim=1), m.any(dim=2)  # [N, W], [N, H]
    valid = cols.any(dim=1)
    # argmax on a 0/1 tensor returns the first maximum, i.e. the first foreground index.
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * valid[:, None], valid


@dataclass
class Instances:
    """Post-processed instances of one image (K kept, sorted by descending score)."""

    masks: Tensor  # [K, H, W] bool
    scores: Tensor  # [K] float
    boxes: Tensor  # [K, 4] xyxy, pixel edges
    slots: Tensor  # [K] long: index of the decoder slot each instance came from

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def predict(
    mask_logits: Tensor,
    obj_logits: Tensor,
    mask_threshold: float = 0.5,
    score_threshold: float = 0.0,
    top_k: int | None = None,
) -> Instances:
    """Turn one image's slot outputs into instances (NMS-free).

    Args:
        mask_logits: [N, H, W] (already at the output resolution).
        obj_logits: [N] objectness logits.
        mask_threshold: a pixel is foreground when sigmoid(logit) > this (UFO: 0.5).
        score_threshold: drop instances scoring at or below it.
        top_k: keep at most this many, by score.

    Score = sigmoid(objectness) * mean foreground probability inside the mask (UFO's re-scoring, so a
    confident slot with a hesitant mask ranks lower). Empty masks are dropped, as in UFO. UFO then runs
    matrix NMS; here the one-to-one matching training is relied on to suppress duplicates.
    """
    if mask_logits.dim() != 3 or obj_logits.shape != mask_logits.shape[:1]:
        raise ValueError(f"expected mask_logits [N,H,W] and obj_logits [N], got {tuple(mask_logits.shape)}, {tuple(obj_logits.shape)}")
    prob = mask_logits.float().sigmoid()
    masks = prob > mask_threshold
    area = masks.flatten(1).sum(1)
    mask_score = (prob * masks).flatten(1).sum(1) / area.clamp(min=1)
    scores = obj_logits.float().sigmoid() * mask_score
    keep = (area > 0) & (scores > score_threshold)
    idx = keep.nonzero().squeeze(1)
    idx = idx[scores[idx].argsort(descending=True)]
    if top_k is not None:
        idx = idx[:top_k]
    boxes, _ = masks_to_boxes(masks[idx])
    return Instances(masks=masks[idx], scores=scores[idx], boxes=boxes, slots=idx)


def semantic_labels(
    mask_logits: Tensor, scores: Tensor | None = None, bg_threshold: float | None = None, bg_label: int = 255
) -> Tensor:
    """Per-pixel label map from one mask per class, as UFO's semantic head: argmax_q score_q * sigmoid(logit_q).

    Args:
        mask_logits: [Q, H, W], one query (class) per row.
        scores: optional [Q] class confidences (default 1).
        bg_threshold: if set, pixels whose best score * probability is below it get ``bg_label``
            (UFO itself labels every pixel with some class).
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q,H,W], got {tuple(mask_logits.shape)}")
    weighted = mask_logits.float().sigmoid()
    if scores is not None:
        weighted = weighted * scores.float()[:, None, None]
    best, labels = weighted.max(dim=0)
    if bg_threshold is not None:
        labels = torch.where(best < bg_threshold, torch.full_like(labels, bg_label), labels)
    return labels
