"""The ufo task on an MLLM backbone: UFO's answers (``vlkit_ufo.mllm``) trained with the language-model
loss on the answer tokens plus focal + dice on the masks of the ``<MASK>`` embeddings; evaluated with the
CLIP task's COCOeval path (every category listed in the prompt of every image)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import Tensor, nn

from vlkit.errors import VlkitError

from .config import UfoConfig
from .data import Vocabulary
from .losses import LossWeights
from .matching import anchor_match
from .mllm import (
    Answers,
    MllmSegmenter,
    grid_points,
    lm_hidden,
    make_trainable,
    mask_logits,
    prepare_backbone,
    training_points,
)
from .segment import threshold_instances
from .task import UfoTask, mask_losses, pack_masks, weighted_total


class MllmUfoTask(UfoTask):
    """UFO on a multimodal LLM: the category list in the prompt, one answer per grid point."""

    def __init__(self, cfg: UfoConfig, backbone: Any, vocab: Vocabulary, cocos: dict[str, COCO],
                 image_size: int, eval_mask_size: int, seed: int = 0) -> None:
        nn.Module.__init__(self)
        if cfg.method != "head":
            raise VlkitError(f"ufo.method={cfg.method!r} runs on CLIP backbones; on an MLLM the model answers "
                             "itself: use ufo.method=head")
        self.cfg, self.vocab, self.cocos, self.seed = cfg, vocab, cocos, int(seed)
        self.image_size, self.eval_mask_size = image_size, eval_mask_size
        self.backbone = backbone
        self.tokens = prepare_backbone(backbone, cfg.mllm_mask_tokens)
        make_trainable(backbone, cfg.mllm_lora_rank, cfg.mllm_lora_alpha, tune_vision=not cfg.freeze_backbone)
        self.tunes_backbone = True
        self.weights = LossWeights(focal=cfg.loss_focal, dice=cfg.loss_dice, obj=cfg.loss_obj)
        self.num_classes = len(vocab.categories)
        self.ignore_index = max(255, self.num_classes + 1)
        self.names = [name for _, name in vocab.categories]
        self.segmenter = MllmSegmenter(backbone, self.tokens, cfg.mllm_grid)
        self.cls_tok = self.segmenter.class_tokens(self.names)  # fails early on names it cannot tell apart

    def train(self, mode: bool = True) -> MllmUfoTask:
        return nn.Module.train(self, mode)

    # ---- training ---------------------------------------------------------------------------------
    def _answers(self, batch: dict[str, Tensor]) -> tuple[Answers, list, list, list]:
        """The training sequences: per image, the shuffled category list and its grid points' answers;
        with the (image, answer, first mask step) rows, their ground-truth masks and ignore regions."""
        t, cfg, n_cat = self.tokens, self.cfg, self.num_classes
        size = batch["image"].shape[-1]
        points = grid_points(cfg.mllm_grid)
        prefix, groups, rows, gts, ignores = [], [], [], [], []
        for i, image_id in enumerate(batch["image_id"].tolist()):
            rng = np.random.default_rng([self.seed, int(image_id)])
            order = [int(c) for c in rng.permutation(n_cat)]
            prefix.append(self.segmenter.prefix([self.names[c] for c in order]))
            queries = batch["queries"][i].tolist()
            cat_col = {q: j for j, q in enumerate(queries) if 0 <= q < n_cat}
            inst, cats = [], []
            for m in range(batch["masks"].shape[1]):
                cols = [j for q, j in cat_col.items() if batch["mask_query"][i, m, j]]
                if cols:
                    inst.append(m)
                    cats.append(queries[cols[0]])
            masks = batch["masks"][i, inst] if inst else batch["masks"].new_zeros(0, size, size)
            ai, gi = anchor_match(points, masks.cpu(), cfg.gt_repeats, cfg.mllm_point_cost, cfg.mllm_inside_cost)
            gt_of = dict(zip(ai.tolist(), gi.tolist()))
            mine = []
            for p in training_points(ai, cfg.mllm_train_points, cfg.mllm_grid, rng):
                if p in gt_of:
                    c = cats[gt_of[p]]
                    rows.append((i, len(mine), len(self.cls_tok[c]) + 1))
                    gts.append(masks[gt_of[p]])
                    ignores.append(batch["ignore"][i, cat_col[c]])
                    mine.append((p, self.cls_tok[c] + [t.comma] + list(t.masks) + [t.eos]))
                else:
                    mine.append((p, [t.background, t.eos]))
            groups.append(mine)
        return Answers(prefix, groups), rows, gts, ignores

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy on every answer token (class or background, comma, the <MASK>s, the end) and focal
        + dice on the masks of the answers matched to a ground truth."""
        bb, images = self.backbone, batch["image"]
        answers, rows, gts, ignores = self._answers(batch)
        layout = answers.tensors(bb.image_token_id, bb.pad_id, images.device)
        hidden = lm_hidden(bb, images, layout, grid_points(self.cfg.mllm_grid, images.device))
        ids, seg = layout["ids"], layout["seg"]
        # the next token of the same answer is each answer token's target
        has_next = (seg[:, :-1] >= 0) & (seg[:, :-1] == seg[:, 1:])
        logits = bb.model.lm_head(hidden[:, :-1][has_next]).float()
        parts = {"loss_text": F.cross_entropy(logits, ids[:, 1:][has_next])}
        zero = hidden.sum() * 0.0
        if rows:
            pred = mask_logits(hidden, layout, rows, tuple(images.shape[-2:]))
            parts.update(mask_losses(pred, torch.stack(ignores), torch.stack(gts), self.weights, zero))
        else:
            parts.update(mask_losses(None, None, None, self.weights, zero))
        return {"loss": weighted_total(parts, self.weights, "loss_text"), **parts,
                "num_matched": torch.tensor(float(len(rows)), device=images.device)}

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Every category listed in every image's prompt: (packed masks [B, Q, K, P], scores [B, Q, K],
        semantic labels [B, e, e]); categories not queried are masked out by ``eval_step``."""
        images = batch["image"]
        b, e, cfg = images.shape[0], self.eval_mask_size, self.cfg
        logits, scores, sem = self.segmenter(images, [self.names] * b, top_k=cfg.top_k, nms_sigma=cfg.nms_sigma)
        q, k = scores.shape[1:]
        masks, scores = threshold_instances(logits.flatten(0, 2), scores.flatten(), (e, e), cfg.mask_threshold,
                                            cfg.score_threshold)
        sem = F.interpolate(sem.float(), size=(e, e), mode="bilinear", align_corners=False)
        sem = sem * batch["queried"].bool()[..., None, None]
        best_p, best_q = sem.max(dim=1)
        labels = torch.where(best_p >= cfg.sem_threshold, best_q, torch.full_like(best_q, q))
        return pack_masks(masks.reshape(b, q, k, e, e)), scores.reshape(b, q, k), labels
