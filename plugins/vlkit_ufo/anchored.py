"""The anchored UFO head: one candidate instance per patch-grid anchor, masks read from pixel-aware features.

UFO ("A Unified Approach to Fine-grained Visual Perception via Open-ended Language Interface") localises
several instances by anchoring its mask queries on grid points: each anchor answers "the instance of the
query nearest to me", ground truths are matched to anchors by point distance (each ground truth repeated
three times) and duplicates are removed by matrix NMS. This head does the same on a CLIP backbone:

* **anchors** = the backbone's patch grid (8 x 8 on the default backbone). Each anchor token is its patch
  feature plus a pooled pixel feature, modulated by the query text embedding (FiLM), then an MLP; it gives
  an objectness logit and K = r*r mask embeddings.
* **mask features** the embeddings are retrieved against (dot product / sqrt(C), pixel shuffle, as UFO):
  the backbone's patch features upsampled to stride 4, plus a light convolutional branch that sees the
  pixels at stride 4 (so a mask can follow an edge inside a patch), plus a fixed position code (random
  Fourier features: the dot product of two codes approximates a Gaussian of their distance). Each anchor's
  embeddings carry its own position code, so two look-alike instances get separate masks.
* anchor tokens see each other first (``context_layers`` self-attention layers over the grid, shared by all
  queries): an anchor on one patch of an object learns the object's whole shape.
* the **semantic** map of a query (for mIoU) is read from its instances: per pixel, the best
  score x mask probability over its candidates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import assemble_masks, upsample_factor

__all__ = ["AnchoredHead", "anchor_centres", "matrix_nms"]

PIXEL_STRIDE = 4


def anchor_centres(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Normalised (x, y) centres [h*w, 2] of an h x w grid's cells, row-major (pixel-centre convention)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(h * w, 2)


class _PixelBranch(nn.Module):
    """Image [B, 3, S, S] -> [B, width, S/4, S/4]: 3x3 convolutions, two of stride 2, ``depth`` more at
    stride 4 (each widens the receptive field by 8 pixels)."""

    def __init__(self, width: int, hidden: int = 32, depth: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, hidden, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.GELU()]
        for _ in range(depth):
            layers += [nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(2 * hidden, width, 3, padding=1))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class AnchoredHead(nn.Module):
    """Text query + dense backbone features + pixels -> per-anchor objectness and instance masks.

    Args:
        embed_dim: the backbone's joint embedding width (patch features and text embeddings).
        width: the head's token and mask-feature width.
        num_mask_embeds: K = r*r embeddings per mask (UFO: 16); masks come out at r x the mask-feature
            grid (stride 4), i.e. the input resolution for r = 4.
        pos_dim: channels of the position code (0 disables it); pos_sigma: its kernel width as a fraction
            of the image side.
        pixel_branch: false reads masks from the backbone's patch features only (an ablation);
            pixel_depth: extra stride-4 convolutions in it.
        context_layers: self-attention layers over the anchor tokens (per image, before the query).
    """

    def __init__(self, embed_dim: int, width: int = 128, num_mask_embeds: int = 16, pos_dim: int = 32,
                 pos_sigma: float = 0.08, pixel_branch: bool = True, pixel_depth: int = 4,
                 context_layers: int = 1, hidden: int = 256) -> None:
        super().__init__()
        self.r = upsample_factor(num_mask_embeds)
        self.embed_dim, self.width, self.num_mask_embeds, self.pos_dim = embed_dim, width, num_mask_embeds, pos_dim
        self.mask_dim = width + pos_dim
        self.feat_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.pixel = _PixelBranch(width, depth=pixel_depth) if pixel_branch else None
        self.mask_feat = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 1))
        self.anchor_pos = nn.Linear(max(pos_dim, 1), width)  # the anchor's own position code, projected
        self.context = nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(context_layers))
        self.query_proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * width))
        self.token_mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                       nn.Linear(hidden, width))
        self.obj_head = nn.Linear(width, 1)
        self.mask_head = nn.Linear(width, num_mask_embeds * self.mask_dim)
        # random Fourier features: z(a) . z(b) ~ exp(-|a - b|^2 / (2 sigma^2)); fixed, saved with the weights
        g = torch.Generator().manual_seed(0)
        self.register_buffer("pos_freq", torch.randn(2, max(pos_dim, 1), generator=g) / pos_sigma)
        self.register_buffer("pos_phase", torch.rand(max(pos_dim, 1), generator=g) * 2 * math.pi)
        # strength of the anchor's position bump in logits (learned); init: +4 at the anchor itself
        self.pos_gain = nn.Parameter(torch.tensor(4.0 * math.sqrt(self.mask_dim)))
        nn.init.constant_(self.obj_head.bias, -4.0)  # rare positives: start near "no instance" (RetinaNet)
        self.register_load_state_dict_post_hook(lambda module, _: module.__dict__.pop("_grid_codes", None))

    # ---- pieces -------------------------------------------------------------------------------------
    def position_code(self, xy: Tensor) -> Tensor:
        """[..., 2] normalised (x, y) -> [..., pos_dim] random Fourier features (unit-ish norm)."""
        return math.sqrt(2.0 / self.pos_dim) * torch.cos(xy @ self.pos_freq + self.pos_phase)

    def grid_code(self, h: int, w: int, like: Tensor) -> Tensor:
        """``position_code`` of an h x w grid's cell centres [h*w, pos_dim], computed once per grid (the
        code has no trainable part)."""
        # keyed by inference mode too: its tensors cannot enter autograd later. Loading weights clears it.
        key = (h, w, like.device, like.dtype, torch.is_inference_mode_enabled())
        cache = self.__dict__.setdefault("_grid_codes", {})
        if key not in cache:
            cache[key] = self.position_code(anchor_centres(h, w, like.device)).to(like.dtype)
        return cache[key]

    def image_features(self, feats: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mask features [B, H4, W4, mask_dim], anchor tokens [B, h*w, width]) shared by all queries."""
        if feats.dim() != 4 or feats.shape[-1] != self.embed_dim:
            raise ValueError(f"expected feats [B,h,w,{self.embed_dim}], got {tuple(feats.shape)}")
        dtype = self.mask_head.weight.dtype
        b, h, w, _ = feats.shape
        patches = self.feat_proj(feats.to(dtype)).permute(0, 3, 1, 2)  # [B, W, h, w]
        size = (images.shape[-2] // PIXEL_STRIDE, images.shape[-1] // PIXEL_STRIDE)
        dense = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
        if self.pixel is not None:
            pix = self.pixel(images.to(dtype))
            dense = dense + pix
            pooled = F.adaptive_avg_pool2d(pix, (h, w))
        else:
            pooled = torch.zeros_like(patches)
        content = self.mask_feat(dense).permute(0, 2, 3, 1)  # [B, H4, W4, width]
        if self.pos_dim:
            code = self.grid_code(*size, content).reshape(*size, self.pos_dim).expand(b, *size, self.pos_dim)
            content = torch.cat([content, code], dim=-1)
        tokens = (patches + pooled).flatten(2).transpose(1, 2)
        if self.pos_dim:
            tokens = tokens + self.anchor_pos(self.grid_code(h, w, tokens))
        for layer in self.context:
            tokens = layer(tokens)
        return content, tokens

    def query_tokens(self, tokens: Tensor, queries: Tensor) -> Tensor:
        """Anchor tokens [B, A, W] x queries [B, Q, D] -> [B, Q, A, W] (FiLM by the query, then an MLP)."""
        gamma, beta = self.query_proj(queries.to(tokens.dtype)).chunk(2, dim=-1)
        x = tokens[:, None] * (1 + gamma[:, :, None]) + beta[:, :, None]
        return x + self.token_mlp(x)

    def objectness(self, qtokens: Tensor) -> Tensor:
        return self.obj_head(qtokens).squeeze(-1)

    def mask_embeddings(self, qtokens: Tensor, anchor_code: Tensor) -> Tensor:
        """[..., W] tokens and their anchors' position codes [..., pos_dim] (rows of ``grid_code``) ->
        [..., K, mask_dim]; the position part of every embedding gets the anchor's code times ``pos_gain``."""
        emb = self.mask_head(qtokens).unflatten(-1, (self.num_mask_embeds, self.mask_dim))
        if self.pos_dim:
            code = anchor_code.to(emb.dtype) * self.pos_gain
            emb = emb + F.pad(code, (self.width, 0))[..., None, :]
        return emb

    def masks(self, content: Tensor, emb: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """Mask embeddings [B, N, K, C] against mask features [B, H4, W4, C] -> logits [B, N, H, W]."""
        return assemble_masks(emb, content, out_size)

    # ---- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def instances(self, queries: Tensor, feats: Tensor, images: Tensor, top_k: int = 10, nms_sigma: float = 2.0,
                  min_score: float = 0.0, semantic: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every query's candidate instances in every image.

        Args:
            queries: [Q, D] shared by the batch, or [B, Q, D].
            feats: [B, h, w, D] dense backbone features; images: [B, 3, S, S] the backbone's input.
            top_k: candidates kept per (image, query): the best anchors by objectness, decoded into masks.
            min_score: only anchors whose sigmoid(objectness) exceeds it are decoded (at least one): a
                candidate's score never exceeds its objectness and NMS only lowers scores, and a worse
                candidate never decays a better one, so every candidate scoring above ``min_score`` is
                exactly as without it. ``segment()`` passes its threshold.
            semantic: false skips the semantic map (third output None).

        Returns:
            (mask logits [B, Q, k, S, S], scores [B, Q, k] after matrix NMS, semantic probabilities
            [B, Q, S, S] = per pixel the best score x mask probability over the query's candidates).
            score = sigmoid(objectness) x mean foreground probability of the mask (UFO's re-scoring), then
            decayed by every better-scoring overlapping candidate of the same query (matrix NMS).
        """
        b, h, w, _ = feats.shape
        if queries.dim() == 2:
            queries = queries[None].expand(b, -1, -1)
        content, tokens = self.image_features(feats, images)
        qt = self.query_tokens(tokens, queries)  # [B, Q, A, W]
        obj = self.objectness(qt)
        k = min(top_k, obj.shape[-1])
        top_obj, top = obj.topk(k, dim=-1)  # [B, Q, k], best first
        if min_score > 0:
            k = max(1, int((top_obj.sigmoid() > min_score).sum(-1).max()))
            top_obj, top = top_obj[..., :k], top[..., :k]
        picked = torch.gather(qt, 2, top[..., None].expand(-1, -1, -1, qt.shape[-1]))
        codes = self.grid_code(h, w, picked)[top] if self.pos_dim else picked[..., :0]
        q = queries.shape[1]
        emb = self.mask_embeddings(picked, codes).flatten(1, 2)  # [B, Q*k, K, C]
        size = tuple(images.shape[-2:])
        logits = self.masks(content, emb, size).unflatten(1, (q, k))
        prob = logits.float().sigmoid()
        fg = prob > 0.5
        mask_score = (prob * fg).flatten(-2).sum(-1) / fg.flatten(-2).sum(-1).clamp(min=1)
        scores = top_obj.float().sigmoid() * mask_score
        scores = matrix_nms(fg.flatten(-2), scores, nms_sigma)
        return logits, scores, (scores[..., None, None] * prob).amax(dim=2) if semantic else None


def matrix_nms(masks: Tensor, scores: Tensor, sigma: float = 2.0) -> Tensor:
    """SOLOv2's matrix NMS with the Gaussian kernel, batched: masks [..., N, P] bool, scores [..., N].

    Each candidate's score is multiplied by min over better-scoring candidates j of
    exp(-sigma * (iou_ij^2 - c_j^2)), c_j = j's own largest IoU with a better candidate; a candidate with
    no overlapping better one keeps its score. Returns the decayed scores in the input order.
    """
    order = scores.argsort(dim=-1, descending=True)
    s = torch.gather(scores, -1, order)
    m = torch.gather(masks, -2, order[..., None].expand_as(masks)).float()
    inter = m @ m.transpose(-1, -2)
    area = m.sum(-1)
    union = area[..., :, None] + area[..., None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    iou = iou.triu(diagonal=1)  # iou[j, i] for better j < i
    comp = iou.max(dim=-2).values  # each j's largest IoU with a better candidate
    decay = torch.exp(-sigma * (iou**2 - comp[..., :, None] ** 2))
    # only pairs with j < i count; elsewhere the factor is 1
    n = s.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(diagonal=1)
    decay = torch.where(upper, decay, torch.ones_like(decay)).min(dim=-2).values
    out = torch.empty_like(scores)
    return out.scatter_(-1, order, s * decay.clamp(max=1.0))
