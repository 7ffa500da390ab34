"""The retrieval task: a ranking/contrastive loss over a batch of (image, caption) pairs, and Recall@K
both ways over a split's images and all of their captions."""

from __future__ import annotations

import collections
import math
from typing import Any

import torch
from torch import nn

from vlkit.backbone import Backbone
from vlkit.errors import VlkitError
from vlkit.metrics.retrieval import Positives, positives_from_index, recall_at_k
from vlkit_retrieval.config import RetrievalConfig
from vlkit_retrieval.losses import LOSSES

TRAIN_MODES = ("full", "lock_image", "lock_text", "lora")


def caption_positives(image_captions: list[list[str]], n_images: int) -> tuple[list[str], Positives]:
    """All captions of the first ``n_images`` images, and which images each caption describes: its own
    image, plus every image that has the very same caption (a caption shared by two images matches both)."""
    captions = [c for caps in image_captions[:n_images] for c in caps]
    owner = [k for k, caps in enumerate(image_captions[:n_images]) for _ in caps]
    images_of: dict[str, set[int]] = {}
    for cap, k in zip(captions, owner):
        images_of.setdefault(" ".join(cap.lower().split()), set()).add(k)
    text_idx, image_idx = [], []
    for t, cap in enumerate(captions):
        for k in sorted(images_of[" ".join(cap.lower().split())]):
            text_idx.append(t)
            image_idx.append(k)
    return captions, Positives.from_pairs(text_idx, image_idx, len(captions), n_images)


def set_trainable(backbone: Backbone, mode: str, cfg: RetrievalConfig) -> None:
    if mode not in TRAIN_MODES:
        raise VlkitError(f"retrieval.train_mode={mode!r} is not one of {', '.join(TRAIN_MODES)}")
    model = backbone.model
    if mode == "lora":
        from vlkit_retrieval.lora import add_lora

        add_lora(backbone, cfg)
        backbone.logit_scale_param.requires_grad_(True)  # the temperature still learns
        return
    for p in model.parameters():
        p.requires_grad_(True)
    backbone.logit_scale_param.requires_grad_(True)
    for name, p in model.named_parameters():
        image = backbone.is_image_parameter(name)
        if (mode == "lock_image" and image) or (mode == "lock_text" and not image and name != "logit_scale"):
            p.requires_grad_(False)


def load_teacher(name: str, student: Backbone) -> Backbone:
    """The frozen dense teacher of distillation; it must embed into the student's space (same width) and
    read the student's tokens (same tokenizer)."""
    from omegaconf import OmegaConf

    from vlkit.engine.run import load_model

    teacher = load_model(OmegaConf.create({"name": name, "pretrained": None})).eval().requires_grad_(False)
    probe = ["a red circle"]
    if teacher.embed_dim != student.embed_dim or not torch.equal(teacher.tokenize(probe), student.tokenize(probe)):
        raise VlkitError(f"retrieval.distill_from={name!r} ({teacher.name}, width {teacher.embed_dim}) cannot teach "
                         f"{student.name} (width {student.embed_dim}): distil from the backbone this one was pruned "
                         "or derived from")
    return teacher


class RetrievalTask(nn.Module):
    def __init__(self, backbone: Backbone, cfg: RetrievalConfig, eval_sets: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.eval_sets = eval_sets  # split -> EvalImages (captions live on .source)
        set_trainable(backbone, cfg.train_mode, cfg)
        # the frozen teacher of recovery by distillation: kept out of the module tree, so it is neither
        # trained nor saved nor wrapped by DDP
        object.__setattr__(self, "teacher", load_teacher(cfg.distill_from, backbone) if cfg.distill_from else None)
        blocks = None
        if self.teacher is not None and cfg.distill_blocks > 0:  # layer-wise distillation: record block outputs
            from vlkit.compress.distill import BlockOutputs

            blocks = (BlockOutputs(backbone.model), BlockOutputs(self.teacher.model))
        object.__setattr__(self, "block_outputs", blocks)
        # the cross term's anchors: teacher embeddings of the last distill_bank batches (not saved: a resumed
        # run refills it within distill_bank steps)
        object.__setattr__(self, "teacher_bank", collections.deque(maxlen=cfg.distill_bank))
        if cfg.init_temperature > 0:
            with torch.no_grad():
                backbone.logit_scale_param.fill_(math.log(1.0 / cfg.init_temperature))

    def loss(self, img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        fn = LOSSES.get(self.cfg.loss)
        if self.cfg.loss == "ranking":
            return fn(img, txt, pos, margin=self.cfg.margin, max_violation=self.cfg.max_violation)
        scale = self.backbone.logit_scale
        if self.cfg.loss == "contrastive":
            return fn(img, txt, pos, scale)
        weights = {"ranking": self.cfg.ranking_weight, "contrastive": self.cfg.contrastive_weight}
        return fn(img, txt, pos, scale, weights=weights, margin=self.cfg.margin,
                  max_violation=self.cfg.max_violation)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.block_outputs is not None:
            self.block_outputs[0].recording = True
        try:
            img = self.backbone.encode_image(batch["image"])
            txt = self.backbone.encode_text(batch["tokens"])
        finally:
            if self.block_outputs is not None:
                self.block_outputs[0].recording = False
        pos = batch["pos"].to(img.device)
        with torch.no_grad():  # the share of images whose best-scoring caption in the batch is a positive
            hit = pos.gather(1, (img @ txt.T).argmax(dim=1, keepdim=True)).float().mean()
        # clamp like CLIP: a logit scale above 100 makes the contrastive loss unstable
        with torch.no_grad():
            self.backbone.logit_scale_param.clamp_(0, 4.6052)
        out = {"batch_i2t_acc": hit, "logit_scale": self.backbone.logit_scale}
        loss = self.loss(img, txt, pos) if self.cfg.task_weight else img.new_zeros(())
        if self.teacher is not None:
            kd = self.distill(batch, img, txt)
            out.update({k: v for k, v in kd.items() if k.startswith("kd_")})
            loss = self.cfg.task_weight * loss + kd["loss"]
        return {"loss": loss, **out}

    def distill(self, batch: dict[str, Any], img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
        from vlkit.compress.distill import DistillWeights, distillation_loss

        teacher = self.teacher
        if teacher.device != img.device:
            teacher.to(img.device)
        recorders = self.block_outputs
        if recorders is not None:
            recorders[1].recording = True
        try:
            with torch.no_grad():
                t_img, t_txt = teacher.encode_image(batch["image"]), teacher.encode_text(batch["tokens"])
        finally:
            if recorders is not None:
                recorders[1].recording = False
        weights = DistillWeights(relation=self.cfg.distill_relation, feature=self.cfg.distill_feature,
                                 blocks=self.cfg.distill_blocks, cross=self.cfg.distill_cross)
        scale = teacher.logit_scale.detach() / self.cfg.distill_temperature  # > 1: softer targets
        bank = self.teacher_bank
        bank_img = torch.cat([b[0] for b in bank]) if bank else None
        bank_txt = torch.cat([b[1] for b in bank]) if bank else None
        kd = distillation_loss(img, txt, t_img, t_txt, scale, weights, bank_img, bank_txt)
        if weights.cross and bank.maxlen:
            bank.append((t_img.detach(), t_txt.detach()))
        if recorders is not None:
            from vlkit.compress.distill import block_loss

            blocks = block_loss(recorders[0].take(), recorders[1].take())
            kd["loss"] = kd["loss"] + weights.blocks * blocks
            kd["kd_blocks"] = blocks.detach()
        return kd

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image_emb": self.backbone.encode_image(batch["image"]), "index": batch["index"]}

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.backbone.tokenize(texts[i:i + batch_size]).to(self.backbone.device)
            out.append(self.backbone.encode_text(tokens).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        order = outputs["index"].argsort()
        index = outputs["index"][order]
        if not torch.equal(index, torch.arange(len(index))):
            raise RuntimeError(f"gathered {split} outputs are not one per image: duplicates or gaps")
        image_emb = outputs["image_emb"][order].float()
        source = self.eval_sets[split].source
        captions, positives = caption_positives(source.image_captions, len(index))
        text_emb = self.encode_texts(captions).float()
        sim = text_emb @ image_emb.T
        metrics = recall_at_k(sim, positives, ks=tuple(self.cfg.ks))
        # strict: only the image a caption was written for counts (a shared caption can hit one of them)
        owner = torch.tensor([k for k, caps in enumerate(source.image_captions[:len(index)]) for _ in caps])
        strict = recall_at_k(sim, positives_from_index(owner, len(index)), ks=tuple(self.cfg.ks))
        metrics.update({f"strict_{k}": v for k, v in strict.items()})
        labels = self.eval_sets[split].zeroshot
        if labels:
            metrics["zeroshot_acc"] = self.zero_shot(image_emb, labels)
        metrics.update(n_images=float(len(index)), n_captions=float(len(captions)))
        return metrics

    @torch.no_grad()
    def zero_shot(self, image_emb: torch.Tensor, labels: dict[int, str]) -> float:
        """Accuracy (percent) of "a {colour} {shape}" prompts over every colour x shape (48 classes on the
        shapes world) on the images with one object."""
        from vlkit.data.shapes import COLORS, SHAPES

        classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
        prompts = self.encode_texts([("an " if c[0] in "aeiou" else "a ") + c for c in classes]).float()
        rows = sorted(labels)
        pred = (image_emb[rows] @ prompts.T).argmax(dim=1)
        truth = torch.tensor([classes.index(labels[k]) for k in rows])
        return 100.0 * float((pred == truth).float().mean())
