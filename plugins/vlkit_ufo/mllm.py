"""UFO on a multimodal LLM, as the paper does it: the language model itself emits the mask embeddings.

UFO ("A Unified Approach to Fine-grained Visual Perception via Open-ended Language Interface") needs no
task decoder. Facts of its LLaVA instance-segmentation path that this module follows:

* one new token, ``<MASK>``, added to the tokenizer and the embedding table; an instance is answered as
  ``"<class> ," + "<MASK>" x 16``, no instance as ``"background"``, each ended by the end token;
* the prompt lists the categories to look for (shuffled in training, every category in evaluation);
* several instances come from **grid points**: each point opens its own short answer after the prompt.
  The point's token embedding is the image feature sampled at that point, and in every later layer the
  image's hidden state at that point is added again. Answers see the prompt and themselves, never each
  other, and all start at the same position; the image tokens see each other both ways;
* the **mask embeddings** are the final (normed) hidden states whose next token is ``<MASK>`` (16 of
  them), dot-producted with the final hidden states at the image tokens, / sqrt(C), arranged by pixel
  shuffle (4x the patch grid), resized, sigmoid;
* training: LoRA on the language model plus its embedding table and final norm (the vision tower
  optional here: ``ufo.freeze_backbone=false``), cross-entropy on the answer tokens + focal + dice on the
  masks; ground truths repeated 3 times, matched to grid points by Hungarian assignment on point L1
  (x5) + "point outside the mask" (x100); the matched points and random others form the answers;
* inference: a point's class is its first answer token (its softmax probability is the score; here the
  choice is limited to the listed classes and ``background``), the 16 ``<MASK>`` tokens follow (forced
  here; UFO generates them and drops a point without exactly 16), the score is multiplied by the mean
  mask probability above 0.5, and matrix NMS removes duplicates.

Deviation: the instance centre in the matching cost is the mask's centre of mass (UFO: its box centre).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.backbone.lora import LoraSpec, add_lora
from vlkit.errors import VlkitError

from .anchored import anchor_centres, matrix_nms
from .head import assemble_masks

__all__ = ["MASK_TOKEN", "MASK_EMBEDS", "Answers", "MllmSegmenter", "SegmentTokens", "grid_points", "lm_hidden",
           "load_mllm_run", "prepare_backbone"]

MASK_TOKEN = "<MASK>"
BACKGROUND = "background"
MASK_EMBEDS = 16  # UFO: 16 <MASK> tokens per instance, a 4x pixel shuffle
PROMPT = "\nsegment {} :"  # after the image; {} = the class list, comma-separated


@dataclass(frozen=True)
class SegmentTokens:
    """The token ids the segmentation answers are written in; ``masks`` are the 16 mask tokens of an
    answer, in order (one id 16 times: UFO's ``<MASK>``; or ``<MASK_0>`` .. ``<MASK_15>``)."""

    masks: tuple[int, ...]
    background: int
    comma: int
    eos: int


def mask_token_names(distinct: int) -> list[str]:
    """1: UFO's one ``<MASK>`` token; 16: ``<MASK_0>`` .. ``<MASK_15>``, one per mask embedding."""
    if distinct not in (1, MASK_EMBEDS):
        raise VlkitError(f"ufo.mllm_mask_tokens={distinct}: use 1 (UFO's one <MASK> token repeated) or "
                         f"{MASK_EMBEDS} (a token per mask embedding)")
    return [MASK_TOKEN] if distinct == 1 else [f"<MASK_{k}>" for k in range(MASK_EMBEDS)]


def prepare_backbone(backbone: Any, distinct: int = 1) -> SegmentTokens:
    """Add the mask token(s) (and any prompt word the tokenizer cannot spell) to an MLLM backbone, once."""
    names = mask_token_names(distinct)
    *masks, background, comma, _ = backbone.add_tokens(names, [BACKGROUND, ",", "segment"])
    return SegmentTokens(masks=tuple(masks * (MASK_EMBEDS // len(masks))), background=background, comma=comma,
                         eos=int(backbone.tokenizer.eos_token_id))


def lora_spec(rank: int, alpha: int) -> LoraSpec:
    """UFO's adapters: every attention and MLP projection of the language model."""
    return LoraSpec(rank=rank, alpha=alpha, targets=[], tower="text")


def make_trainable(backbone: Any, lora_rank: int, lora_alpha: int, tune_vision: bool) -> None:
    """What UFO trains: LoRA on the language model (or all of it with rank 0) and its embedding table
    (tied to the output layer) and final norm; the vision tower and projector only with ``tune_vision``."""
    backbone.requires_grad_(False)
    lm = backbone.model.model.language_model
    if lora_rank:
        add_lora(backbone, lora_spec(lora_rank, lora_alpha))
    else:
        lm.requires_grad_(True)
    backbone.model.get_input_embeddings().requires_grad_(True)
    backbone.model.get_output_embeddings().requires_grad_(True)
    lm.norm.requires_grad_(True)
    if tune_vision:
        backbone.model.model.vision_tower.requires_grad_(True)
        backbone.model.model.multi_modal_projector.requires_grad_(True)
        for name, p in backbone.model.model.vision_tower.named_parameters():
            if "post_layernorm" in name:  # LLaVA reads the tower before its final norm: never a gradient
                p.requires_grad_(False)


def grid_points(grid: int, device: torch.device | None = None) -> Tensor:
    """Normalised (x, y) of the ``grid`` x ``grid`` points answers start from (cell centres, row-major)."""
    return anchor_centres(grid, grid, device)


def sample_at(features: Tensor, side: int, points: Tensor) -> Tensor:
    """Image-token features [B, side*side, D] (row-major) bilinearly sampled at normalised points [P, 2]
    -> [B, P, D] (a point at a cell centre reads that cell exactly)."""
    b, _, d = features.shape
    fmap = features.transpose(1, 2).reshape(b, d, side, side)
    where = (points * 2 - 1).to(features.dtype)[None, None].expand(b, 1, -1, 2)
    return F.grid_sample(fmap, where, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0].transpose(1, 2)


# ---- the sequences ---------------------------------------------------------------------------------
@dataclass
class Answers:
    """A batch of prompts, each followed by grid-point answers, laid out as one sequence per image.

    ``groups[i]`` lists image i's answers as (grid point index, the tokens after the point token)."""

    prefix: list[list[int]]
    groups: list[list[tuple[int, list[int]]]]

    def tensors(self, image_token: int, pad: int, device: torch.device) -> dict[str, Tensor]:
        """ids, positions, the additive attention mask [B, 1, L, L], and per token: its answer (-1 in the
        prompt, -2 padding), its index inside the answer, the grid point of a point token (-1 elsewhere)."""
        rows = []
        for prefix, groups in zip(self.prefix, self.groups):
            ids, seg, step, point, pos = list(prefix), [-1] * len(prefix), [-1] * len(prefix), [-1] * len(prefix), \
                list(range(len(prefix)))
            for g, (p, follow) in enumerate(groups):
                n = 1 + len(follow)
                ids += [pad] + list(follow)  # the point token's id is a placeholder: its embedding is replaced
                seg += [g] * n
                step += list(range(n))
                point += [p] + [-1] * len(follow)
                pos += [len(prefix) + k for k in range(n)]
            rows.append((ids, seg, step, point, pos))
        b, length = len(rows), max(len(r[0]) for r in rows)
        out = {k: torch.full((b, length), v, dtype=torch.long) for k, v in
               (("ids", pad), ("seg", -2), ("step", -1), ("point", -1), ("pos", 0))}
        for i, row in enumerate(rows):
            for key, values in zip(("ids", "seg", "step", "point", "pos"), row):
                out[key][i, :len(values)] = torch.tensor(values, dtype=torch.long)
        out = {k: v.to(device) for k, v in out.items()}
        out["is_image"] = out["ids"] == image_token
        seg = out["seg"]
        order = torch.arange(length, device=device)
        causal = order[None, :, None] >= order[None, None, :]  # [1, q, k]
        sq, sk = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((sk == -1) | (sq == sk)) & (sq != -2)
        allowed |= out["is_image"][:, :, None] & out["is_image"][:, None, :]  # the image sees itself both ways
        allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]  # padding attends to itself
        out["allowed"] = allowed
        return out


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def lm_hidden(backbone: Any, images: Tensor, layout: dict[str, Tensor], points: Tensor) -> Tensor:
    """Final (normed) hidden states [B, L, D] of the language model over ``layout`` (``Answers.tensors``).

    The image tokens carry the projected vision features; a point token's input is the image feature
    sampled at its grid point, and before every later layer that layer's image hidden state at the point
    is added to it (UFO's local visual prompt)."""
    model = backbone.model
    lm = model.model.language_model
    vt_dtype = next(model.model.vision_tower.parameters()).dtype
    feats = model.model.get_image_features(pixel_values=images.to(vt_dtype)).pooler_output
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    ids = layout["ids"]
    embeds = lm.get_input_embeddings()(ids)
    img = layout["is_image"]
    b, n, d = feats.shape
    side = math.isqrt(n)
    if side * side != n:
        raise VlkitError(f"{backbone.name}: {n} image tokens are not a square grid; ufo needs one")
    embeds = embeds.masked_scatter(img[..., None], feats.to(embeds.dtype))
    pt_b, pt_l = (layout["point"] >= 0).nonzero(as_tuple=True)
    pt_idx = layout["point"][pt_b, pt_l]

    def at_points(hidden: Tensor) -> Tensor:
        grid = hidden[img].reshape(b, n, -1)
        return sample_at(grid, side, points)[pt_b, pt_idx]

    embeds = embeds.index_put((pt_b, pt_l), at_points(embeds))

    def add_local(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.index_put((pt_b, pt_l), at_points(hidden), accumulate=True)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handles = [layer.register_forward_pre_hook(add_local, with_kwargs=True) for layer in lm.layers[1:]]
    try:
        mask = additive_mask(layout["allowed"], embeds.dtype)
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=layout["pos"]).last_hidden_state
    finally:
        for h in handles:
            h.remove()


def image_grid(hidden: Tensor, layout: dict[str, Tensor]) -> Tensor:
    """The final hidden states at the image tokens as a grid [B, h, w, D]."""
    b = hidden.shape[0]
    grid = hidden[layout["is_image"]].reshape(b, -1, hidden.shape[-1])
    side = math.isqrt(grid.shape[1])
    return grid.reshape(b, side, side, -1)


def mask_logits(hidden: Tensor, layout: dict[str, Tensor], rows: Sequence[tuple[int, int, int]],
                size: tuple[int, int]) -> Tensor:
    """Mask logits [N, H, W] of the answers ``rows`` = (image, answer, step of its first mask embedding):
    the 16 states from that step on are the ones whose next token is ``<MASK>``."""
    feats = image_grid(hidden, layout)
    seg, step = layout["seg"], layout["step"]
    emb = torch.stack([hidden[i, (seg[i] == g) & (step[i] >= first) & (step[i] < first + MASK_EMBEDS)]
                       for i, g, first in rows])  # [N, 16, D]
    idx = torch.tensor([i for i, _, _ in rows], device=hidden.device)
    return assemble_masks(emb[:, None], feats[idx], size)[:, 0]


class MllmSegmenter:
    """Inference of UFO's answers on an MLLM backbone: pass 1 opens every grid point and reads its class,
    pass 2 writes the ``<MASK>`` tokens of the best points of each class and reads their masks."""

    def __init__(self, backbone: Any, tokens: SegmentTokens, grid: int, classes: Sequence[str] = ()) -> None:
        self.backbone, self.tokens, self.grid = backbone, tokens, grid
        # the classes the model was trained to list: segment() lists them beside a query, as in training
        self.classes = list(classes)

    def prefix(self, classes: Sequence[str]) -> list[int]:
        bb = self.backbone
        return bb.bos + [bb.image_token_id] * bb.n_image_tokens + bb._ids(PROMPT.format(", ".join(classes)))

    def class_tokens(self, classes: Sequence[str]) -> list[list[int]]:
        """Each class's answer tokens; their first tokens must differ (the first one decides)."""
        toks = [self.backbone._ids(c) for c in classes]
        firsts = [t[0] if t else None for t in toks]
        clash = [c for c, f in zip(classes, firsts) if f is None or firsts.count(f) > 1 or f == self.tokens.background]
        if clash:
            raise VlkitError(f"queries {clash} begin with the same token as another query (or with "
                             f"'{BACKGROUND}'): a grid point's answer is read from its first token; ask them apart")
        return toks

    def answers_for(self, classes: list[Sequence[str]], picks: list[list[tuple[int, int]]] | None
                    ) -> tuple[Answers, list[list[list[int]]]]:
        cls_tok = [self.class_tokens(c) for c in classes]
        prefix = [self.prefix(c) for c in classes]
        t = self.tokens
        if picks is None:  # pass 1: every grid point, the point token alone
            return Answers(prefix, [[(p, []) for p in range(self.grid ** 2)] for _ in classes]), cls_tok
        groups = [[(p, cls_tok[i][c] + [t.comma] + list(t.masks[:-1])) for p, c in picks[i]]
                  for i in range(len(classes))]
        return Answers(prefix, groups), cls_tok

    @torch.no_grad()
    def __call__(self, images: Tensor, classes: list[Sequence[str]], top_k: int = 10, nms_sigma: float = 2.0,
                 min_score: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Per image, each of its ``classes``' best ``top_k`` instances: (mask logits [B, Q, k, S, S], scores
        [B, Q, k] after mask re-scoring and matrix NMS (0 = no candidate), semantic probabilities
        [B, Q, S, S]). Every image must list the same number Q of classes."""
        bb, device = self.backbone, images.device
        b, q = images.shape[0], len(classes[0])
        size = tuple(images.shape[-2:])
        points = grid_points(self.grid, device)
        answers, cls_tok = self.answers_for(classes, None)
        layout = answers.tensors(bb.image_token_id, bb.pad_id, device)
        hidden = lm_hidden(bb, images, layout, points)
        at_point = hidden[layout["point"] >= 0].reshape(b, self.grid ** 2, -1)
        probs = bb.model.lm_head(at_point).float().softmax(-1)  # [B, P, V]
        firsts = torch.tensor([[t[0] for t in row] + [self.tokens.background] for row in cls_tok], device=device)
        cand = torch.gather(probs, 2, firsts[:, None].expand(-1, probs.shape[1], -1))  # [B, P, Q+1]
        best, which = cand.max(-1)
        k = min(top_k, self.grid ** 2)
        picks: list[list[tuple[int, int]]] = []
        slot = torch.full((b, q, k), -1, dtype=torch.long)
        obj = torch.zeros(b, q, k)
        for i in range(b):
            mine = []
            for c in range(q):
                s = torch.where((which[i] == c) & (best[i] > min_score), best[i], torch.zeros_like(best[i]))
                top = s.topk(k)
                for j, (v, p) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    if v > 0:
                        slot[i, c, j] = len(mine)
                        obj[i, c, j] = v
                        mine.append((p, c))
            picks.append(mine)
        logits = images.new_full((b, q, k, *size), -30.0, dtype=torch.float32)
        if any(picks):
            answers, _ = self.answers_for(classes, picks)
            layout = answers.tensors(bb.image_token_id, bb.pad_id, device)
            hidden = lm_hidden(bb, images, layout, points)
            # step 0 is the point token, then the class's tokens, then the comma: the first mask embedding
            rows = [(i, g, len(cls_tok[i][c]) + 1) for i in range(b) for g, (_, c) in enumerate(picks[i])]
            found = mask_logits(hidden, layout, rows, size).float()
            for r, (i, g, _) in enumerate(rows):
                c = picks[i][g][1]
                logits[i, c, int((slot[i, c] == g).nonzero()[0, 0])] = found[r]
        prob = logits.sigmoid()
        fg = prob > 0.5
        mask_score = (prob * fg).flatten(-2).sum(-1) / fg.flatten(-2).sum(-1).clamp(min=1)
        scores = obj.to(device) * mask_score * fg.flatten(-2).any(-1)
        scores = matrix_nms(fg.flatten(-2), scores, nms_sigma)
        return logits, scores, (scores[..., None, None] * prob).amax(dim=2)


def load_mllm_run(backbone: Any, ufo_cfg: Any, weights: Any, classes: Sequence[str] = ()) -> MllmSegmenter:
    """Make ``backbone`` the one a ufo run on it trained (its ``<MASK>`` token, its adapters and weights from
    the checkpoint file ``weights``, adapters merged back) and return its segmenter (``classes``: the
    category names the run's prompts listed)."""
    from safetensors.torch import load_file

    from vlkit.backbone.lora import merge_lora

    tokens = prepare_backbone(backbone, ufo_cfg.mllm_mask_tokens)
    make_trainable(backbone, ufo_cfg.mllm_lora_rank, ufo_cfg.mllm_lora_alpha, tune_vision=not ufo_cfg.freeze_backbone)
    state = {k[len("backbone."):]: v for k, v in load_file(str(weights)).items() if k.startswith("backbone.")}
    if not state:
        raise VlkitError(f"{weights} holds no backbone tensors: it is not a checkpoint of a ufo run on an MLLM")
    try:
        bad = backbone.load_state_dict(state, strict=False).unexpected_keys
    except RuntimeError as exc:  # a shape mismatch: another model's run
        raise VlkitError(f"{weights} does not fit {backbone.name}: {str(exc)[:300]}") from None
    if bad:
        raise VlkitError(f"{weights} holds tensors {backbone.name} lacks ({bad[:3]}): a run of another model")
    if ufo_cfg.mllm_lora_rank:
        merge_lora(backbone)  # plain weights again: inference at the model's own speed
    backbone.requires_grad_(False)
    return MllmSegmenter(backbone.eval(), tokens, ufo_cfg.mllm_grid, classes)


def training_points(matched: Tensor, total: int, grid: int, rng: np.random.Generator) -> list[int]:
    """The grid points a training image answers at: every matched one, then random others up to ``total``."""
    chosen = sorted(set(matched.tolist()))
    rest = [p for p in range(grid * grid) if p not in chosen]
    extra = max(0, min(total - len(chosen), len(rest)))
    return chosen + sorted(int(p) for p in rng.choice(rest, size=extra, replace=False))
