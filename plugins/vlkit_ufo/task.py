"""The ufo task: dense features + pixels -> anchored head -> anchor-matched mask losses, and COCO-style evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import Tensor, nn

from vlkit.backbone.lora import add_lora
from vlkit.errors import VlkitError
from vlkit.metrics.coco_eval import coco_evaluate, f1_operating_point, instances_to_coco_results
from vlkit.metrics.segmentation import MeanIoU, confusion_matrix

from .anchored import anchor_centres
from .config import UfoConfig
from .data import Vocabulary
from .losses import LossWeights, mask_terms, objectness_focal_loss
from .matching import anchor_match
from .segment import (
    build_decoder,
    component_instances,
    encode_queries,
    lora_spec,
    threshold_instances,
    training_free_probs,
)

# Ignored (crowd) pixels get this constant logit and a 0 target: their loss is ~0 and, being a constant,
# passes no gradient, so the head is neither rewarded nor punished there (COCO's crowd semantics).
IGNORE_LOGIT = -30.0
# decoder runs (images x queries) per chunk in evaluation: bounds memory for 80-category data sets
EVAL_CHUNK = 256


def pack_masks(masks: Tensor) -> Tensor:
    """Bool [..., e, e] -> uint8 [..., ceil(e*e/8)], 8 pixels a byte: eval outputs are gathered over
    processes and kept for a whole split, so they are stored 8x smaller."""
    flat = masks.flatten(-2).to(torch.uint8)
    pad = (-flat.shape[-1]) % 8
    flat = F.pad(flat, (0, pad)).reshape(*flat.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (flat * weights).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: Tensor, size: int) -> Tensor:
    """Inverse of ``pack_masks`` for square masks of side ``size``."""
    bits = (packed[..., None] >> torch.arange(8, device=packed.device).to(torch.uint8)) & 1
    return bits.flatten(-2)[..., : size * size].reshape(*packed.shape[:-1], size, size).bool()


def resize_binary(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """[k, e, e] bool -> [k, H, W] bool: bilinear on the 0/1 map (pixel centres aligned, as the plain
    resize of the input), then >= 0.5."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    up = F.interpolate(masks[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0] >= 0.5


def semantic_gt(masks: Tensor, mask_cat: Tensor, iscrowd: Tensor, background: int, ignore: int) -> Tensor:
    """[B, M, e, e] instance masks -> [B, e, e] labels: category index, ``background`` where no instance,
    ``ignore`` on crowd regions (painted in annotation order, crowd last)."""
    b, m = mask_cat.shape
    labels = torch.full((b, *masks.shape[-2:]), background, dtype=torch.long, device=masks.device)
    for crowd in (False, True):
        for j in range(m):
            sel = masks[:, j] & ((mask_cat[:, j] >= 0) & (iscrowd[:, j] == crowd))[:, None, None]
            value = torch.full_like(labels, ignore) if crowd else mask_cat[:, j, None, None].expand_as(labels)
            labels = torch.where(sel, value, labels)
    return labels


def mask_losses(logits: Tensor | None, ignore: Tensor | None, gts: Tensor | None, weights: LossWeights,
                zero: Tensor) -> dict[str, Tensor]:
    """Focal and dice per matched mask (logits [N, H, W] against gts [N, H, W]; ignore pixels get
    ``IGNORE_LOGIT``), plus ``zero`` (it keeps every trainable tensor in the graph); ``zero`` alone when
    nothing matched (logits None)."""
    if logits is None:
        return {"loss_focal": zero, "loss_dice": zero}
    logits = torch.where(ignore, logits.new_tensor(IGNORE_LOGIT), logits)
    focal, dice = mask_terms(logits, gts, weights)
    return {"loss_focal": focal / len(logits) + zero, "loss_dice": dice / len(logits) + zero}


def weighted_total(parts: dict[str, Tensor], weights: LossWeights, first: str) -> Tensor:
    """``first`` (objectness, or the answer tokens' cross-entropy) x obj + focal + dice, weighted."""
    return weights.obj * parts[first] + weights.focal * parts["loss_focal"] + weights.dice * parts["loss_dice"]


def _unfreeze_image_tower(backbone: Any, dense_mode: str) -> None:
    """Train the image tower, except what the dense path never runs: maskclip/clearclip skip the last
    block's MLP branch, and a parameter without a gradient would make DDP fail (and would never change)."""
    visual = backbone.model.visual
    visual.requires_grad_(True)
    if dense_mode != "plain":
        last = visual.transformer.resblocks[-1]
        for name in ("ln_2", "mlp", "ls_2"):
            if hasattr(last, name):
                getattr(last, name).requires_grad_(False)


class UfoTask(nn.Module):
    """Trains the anchored ufo head on frozen (or adapted) dense features and evaluates every category of the
    data set as a query in every image: segm/bbox AP through COCOeval and semantic mIoU."""

    def __init__(self, cfg: UfoConfig, backbone: Any, vocab: Vocabulary, cocos: dict[str, COCO],
                 image_size: int, eval_mask_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab, self.cocos = cfg, vocab, cocos
        self.image_size, self.eval_mask_size = image_size, eval_mask_size
        self.backbone = backbone
        backbone.requires_grad_(False)
        if not cfg.freeze_backbone:
            _unfreeze_image_tower(backbone, cfg.dense_mode)
        if cfg.lora_rank:
            add_lora(backbone, lora_spec(cfg, backbone))
        self.tunes_backbone = not cfg.freeze_backbone or cfg.lora_rank > 0
        self.decoder = build_decoder(cfg, backbone.embed_dim)
        # cached once: the text tower never trains, and queries come from a fixed vocabulary
        self.register_buffer("query_emb", encode_queries(backbone, vocab.texts, cfg.prompt), persistent=False)
        self.register_buffer("background_emb", encode_queries(backbone, cfg.tf_background, cfg.prompt),
                             persistent=False)
        self.weights = LossWeights(focal=cfg.loss_focal, dice=cfg.loss_dice, obj=cfg.loss_obj)
        self.num_classes = len(vocab.categories)
        self.ignore_index = max(255, self.num_classes + 1)

    def train(self, mode: bool = True) -> UfoTask:
        super().train(mode)
        if not self.tunes_backbone:  # a frozen backbone always runs as at inference
            self.backbone.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        trainable = self.training and self.tunes_backbone
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.backbone.dense_features(images, mode=self.cfg.dense_mode)

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One batch of images, each with its queries: objectness over every anchor (focal, RetinaNet
        normalisation) and focal + dice on the masks of the anchors matched to each ground truth (UFO's
        point matching, ``gt_repeats`` anchors per instance)."""
        if self.cfg.method != "head":
            raise VlkitError("ufo.method=training_free has nothing to train; evaluate it with "
                             "`vlkit eval plugin=ufo ufo.method=training_free ...`, or train ufo.method=head")
        head, images = self.decoder, batch["image"]
        size = tuple(images.shape[-2:])
        feats = self.features(images)
        content, tokens = head.image_features(feats, images)
        qidx = batch["queries"]
        valid_q = qidx >= 0
        qemb = self.query_emb[qidx.clamp(min=0)]
        qtok = head.query_tokens(tokens, qemb)  # [B, Q, A, W]
        obj = head.objectness(qtok)
        h, w = feats.shape[1:3]
        anchors = anchor_centres(h, w, images.device)
        ignore = batch["ignore"]  # [B, Q, S, S]
        # an anchor whose centre lies in an ignore (crowd) region is neither positive nor negative
        ax = (anchors[:, 0] * size[1]).long().clamp(max=size[1] - 1)
        ay = (anchors[:, 1] * size[0]).long().clamp(max=size[0] - 1)
        obj_valid = valid_q[..., None] & ~ignore[:, :, ay, ax]
        obj_target = torch.zeros_like(obj)
        picks, gts = [], []
        for i, j in valid_q.nonzero().tolist():
            masks = batch["masks"][i][batch["mask_query"][i, :, j]] & ~ignore[i, j]
            ai, gi = anchor_match(anchors, masks, self.cfg.gt_repeats)
            obj_target[i, j, ai] = 1.0
            obj_valid[i, j, ai] = True
            picks += [(i, j, a) for a in ai.tolist()]
            gts.append(masks[gi])
        parts = {"loss_obj": objectness_focal_loss(obj, obj_target, obj_valid.to(obj.dtype))}
        # keeps every parameter in the graph when nothing matched (DDP needs a gradient for each)
        zero = sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0 + content.sum() * 0.0
        if picks:
            bi, qi, ai = (torch.tensor(v, device=images.device) for v in zip(*picks))
            codes = head.grid_code(h, w, content)[ai] if head.pos_dim else content.new_zeros(len(ai), 0)
            emb = head.mask_embeddings(qtok[bi, qi, ai], codes)
            logits = head.masks(content[bi], emb[:, None], size)[:, 0]
            parts.update(mask_losses(logits, ignore[bi, qi], torch.cat(gts), self.weights, zero))
        else:
            parts.update(mask_losses(None, None, None, self.weights, zero))
        return {"loss": weighted_total(parts, self.weights, "loss_obj"), **parts,
                "num_matched": torch.tensor(float(len(picks)), device=images.device)}

    # ---- evaluation -------------------------------------------------------------------------------
    def eval_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per image: every category's top candidates as packed masks [Q, K, P] and scores [Q, K] (0 = none),
        and the image's semantic confusion matrix at the eval resolution."""
        packed, scores, labels = self.predict_batch(batch)
        queried = batch["queried"].bool()
        gt = semantic_gt(batch["masks"], batch["mask_cat"], batch["iscrowd"], self.num_classes, self.ignore_index)
        conf = [confusion_matrix(labels[i], gt[i], self.num_classes + 1, self.ignore_index) for i in range(len(gt))]
        return {"image_id": batch["image_id"], "queried": queried.to(torch.uint8),
                "scores": scores * queried[..., None], "masks": packed,
                "confusion": torch.from_numpy(np.stack(conf)).to(scores.device)}

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(packed masks [B, Q, K, P] uint8, scores [B, Q, K], semantic labels [B, e, e]) for the Q
        category queries; labels = best queried category's probability, background below sem_threshold."""
        feats = self.features(batch["image"])
        b, q_total, e = feats.shape[0], self.num_classes, self.eval_mask_size
        queried = batch["queried"].bool()
        tf_probs = None
        if self.cfg.method == "training_free":
            cats = self.query_emb[:q_total]
            tf_probs = training_free_probs(cats, feats, self.background_emb, self.backbone.logit_scale)
        best_p = feats.new_zeros(b, e, e, dtype=torch.float32)
        best_q = torch.zeros(b, e, e, dtype=torch.long, device=feats.device)
        packed, scores = [], []
        step = max(1, EVAL_CHUNK // b)
        for q0 in range(0, q_total, step):
            q1 = min(q_total, q0 + step)
            if tf_probs is None:
                masks, sc, sem = self._head_chunk(feats, batch["image"], q0, q1, e)
            else:
                masks, sc, sem = self._tf_chunk(tf_probs[:, q0:q1], e)
            packed.append(pack_masks(masks))
            scores.append(sc)
            p, idx = (sem * queried[:, q0:q1, None, None]).max(dim=1)
            better = p > best_p
            best_p, best_q = torch.where(better, p, best_p), torch.where(better, idx + q0, best_q)
        labels = torch.where(best_p >= self.cfg.sem_threshold, best_q, torch.full_like(best_q, q_total))
        return torch.cat(packed, 1), torch.cat(scores, 1), labels

    def _head_chunk(self, feats: Tensor, images: Tensor, q0: int, q1: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        logits, scores, sem = self.decoder.instances(self.query_emb[q0:q1], feats, images, top_k=self.cfg.top_k,
                                                     nms_sigma=self.cfg.nms_sigma)
        b, c, k = scores.shape
        masks, scores = threshold_instances(logits.flatten(0, 2), scores.flatten(), (e, e), self.cfg.mask_threshold,
                                            self.cfg.score_threshold)
        sem = F.interpolate(sem.float(), size=(e, e), mode="bilinear", align_corners=False)
        return masks.reshape(b, c, k, e, e), scores.reshape(b, c, k), sem

    def _tf_chunk(self, probs: Tensor, e: int) -> tuple[Tensor, Tensor, Tensor]:
        b, c = probs.shape[:2]
        up = F.interpolate(probs.float(), size=(e, e), mode="bilinear", align_corners=False)
        k, cfg = self.cfg.top_k, self.cfg
        found = [component_instances(up[i, j], k, cfg.mask_threshold, cfg.tf_min_area, cfg.tf_instances)
                 for i in range(b) for j in range(c)]
        masks = torch.stack([m for m, _ in found]).reshape(b, c, k, e, e).to(up.device)
        scores = torch.stack([s for _, s in found]).reshape(b, c, k).to(up.device)
        scores = torch.where(scores > cfg.score_threshold, scores, torch.zeros_like(scores))
        return masks & (scores > 0)[..., None, None], scores, up

    def coco_results(self, outputs: dict[str, Tensor], coco: COCO) -> list[dict]:
        """COCO result dicts: the best ``max_dets_per_image`` candidates of each image, masks resized to it."""
        results: list[dict] = []
        cat_ids = self.vocab.cat_ids
        for n, image_id in enumerate(outputs["image_id"].tolist()):
            scores = outputs["scores"][n].float()  # [Q, K]
            flat = scores.flatten()
            top = flat.argsort(descending=True)[: self.cfg.max_dets_per_image]
            top = top[flat[top] > 0]
            if top.numel() == 0:
                continue
            info = coco.imgs[int(image_id)]
            k = scores.shape[1]
            for q in (top // k).unique().tolist():
                slots = top[top // k == q] % k
                masks = unpack_masks(outputs["masks"][n, q, slots], self.eval_mask_size)
                masks = resize_binary(masks, (int(info["height"]), int(info["width"])))
                results += instances_to_coco_results(int(image_id), masks, scores[q, slots], cat_ids[q])
        return results

    def compute_metrics(self, outputs: dict[str, Tensor], split: str) -> dict[str, float]:
        """COCOeval segm/bbox AP over every queried category, then the diagnostics that tell mask quality
        from recognition: class-agnostic AP (``agnostic/segm/*``: any detection may match any gt) and AP
        with only the categories present in each image (``present/segm/*``: false positives of absent
        categories removed); the best F1 at IoU 0.5 and the score threshold reaching it (``segm/F1``,
        ``segm/F1_threshold``: the default threshold a trained run offers); semantic mIoU beside its
        all-background floor (``mIoU_floor``) and the mean IoU of the object classes alone (``fgIoU``)."""
        coco = self.cocos[split]
        results = self.coco_results(outputs, coco)
        image_ids = sorted(set(outputs["image_id"].tolist()))
        metrics = coco_evaluate(coco, results, list(self.cfg.iou_types), img_ids=image_ids,
                                cat_ids=self.vocab.cat_ids)
        if "segm" in self.cfg.iou_types:
            f1, threshold = f1_operating_point(coco, results, "segm", img_ids=image_ids, cat_ids=self.vocab.cat_ids)
            metrics["segm/F1"], metrics["segm/F1_threshold"] = f1, threshold
            present = {(a["image_id"], a["category_id"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids))}
            views = {"agnostic": (results, False),
                     "present": ([r for r in results if (r["image_id"], r["category_id"]) in present], True)}
            for name, (res, use_cats) in views.items():
                stats = coco_evaluate(coco, res, ["segm"], img_ids=image_ids, cat_ids=self.vocab.cat_ids,
                                      use_cats=use_cats)
                metrics.update({f"{name}/segm/{k}": stats[f"segm/{k}"] for k in ("AP", "AP50", "AP75")})
        conf = outputs["confusion"].sum(0).cpu().numpy().astype(np.int64)
        miou = MeanIoU(self.num_classes + 1, self.ignore_index)  # the last class is background
        miou.confusion = conf
        metrics.update(miou.compute())
        metrics["fgIoU"] = float(np.nanmean(miou.per_class_iou()[: self.num_classes]))
        floor = MeanIoU(self.num_classes + 1, self.ignore_index)
        floor.confusion[:, self.num_classes] = conf.sum(1)  # every pixel predicted background
        metrics["mIoU_floor"] = floor.compute()["mIoU"]
        metrics["images"] = float(len(image_ids))
        metrics["detections"] = float(len(results))
        return metrics
