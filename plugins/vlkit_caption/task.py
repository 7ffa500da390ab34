"""The caption task: next-token loss on captions; evaluation by greedy captions scored against the scene."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from vlkit.errors import VlkitError
from vlkit_caption.config import CaptionConfig

TRAIN_MODES = ("full", "projector", "lora")


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def mentioned(caption: str) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """The (colour, shape) pairs, colour words and shape words (plurals folded) a caption names."""
    from vlkit.data.shapes import COLORS, SHAPES

    words = re.findall(r"[a-z]+", caption.lower())
    shape_of = {s: s for s in SHAPES} | {_plural(s): s for s in SHAPES}
    pairs = {(a, shape_of[b]) for a, b in zip(words, words[1:]) if a in COLORS and b in shape_of}
    return pairs, {w for w in words if w in COLORS}, {shape_of[w] for w in words if w in shape_of}


def f1(predicted: list[set], truth: list[set]) -> float:
    """Micro-averaged F1 of predicted sets against true sets (percent)."""
    tp = sum(len(p & t) for p, t in zip(predicted, truth))
    n_pred, n_true = sum(len(p) for p in predicted), sum(len(t) for t in truth)
    if n_pred + n_true == 0:
        return 100.0
    return 100.0 * 2 * tp / (n_pred + n_true)


def caption_metrics(captions: list[str], objects: list[list[tuple[str, str]]], truths: list[frozenset[str]]
                    ) -> dict[str, float]:
    """Scores of generated captions against each scene's objects and its set of true captions: pair / colour /
    shape F1 (percent), exact (the caption is one the world's templates make true of the scene, percent), and
    the floor: the pair F1 of naming the split's most common (colour, shape) in every caption."""
    said = [mentioned(c) for c in captions]
    true_pairs = [set(o) for o in objects]
    common = Counter(p for o in true_pairs for p in o).most_common(1)
    floor = [{common[0][0]} for _ in objects] if common else [set() for _ in objects]
    return {
        "pair_f1": f1([s[0] for s in said], true_pairs),
        "color_f1": f1([s[1] for s in said], [{c for c, _ in o} for o in objects]),
        "shape_f1": f1([s[2] for s in said], [{s for _, s in o} for o in objects]),
        "exact": 100.0 * sum(c in t for c, t in zip(captions, truths)) / max(1, len(captions)),
        "pair_f1_floor": f1(floor, true_pairs),
    }


def set_trainable(backbone, cfg: CaptionConfig) -> None:
    if cfg.train_mode not in TRAIN_MODES:
        raise VlkitError(f"caption.train_mode={cfg.train_mode!r} is not one of {', '.join(TRAIN_MODES)}")
    model = backbone.model
    if cfg.train_mode == "full":
        model.requires_grad_(True)
    elif cfg.train_mode == "projector":
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
    else:
        from vlkit.backbone.lora import LoraSpec, add_lora

        add_lora(backbone, LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                    tower="text"))
        model.model.multi_modal_projector.requires_grad_(True)
    backbone.logit_scale_param.requires_grad_(False)


class CaptionTask(nn.Module):
    def __init__(self, backbone, cfg: CaptionConfig, eval_sets: dict[str, Any]) -> None:
        super().__init__()
        self.backbone, self.cfg, self.eval_sets = backbone, cfg, eval_sets
        set_trainable(backbone, cfg)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": self.backbone.caption_loss(batch)}

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = self.backbone.generate_ids(batch["image"], self.cfg.max_new_tokens)
        return {"ids": ids, "index": batch["index"]}

    @torch.no_grad()
    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        order = outputs["index"].argsort()
        index = outputs["index"][order].tolist()
        captions = self.backbone.decode(outputs["ids"][order])
        data = self.eval_sets[split]
        ids = [data.source.image_ids[k] for k in index]
        metrics = caption_metrics(captions, [data.objects(k) for k in index], [data.scenes.truths(i) for i in ids])
        metrics["n_images"] = float(len(index))
        self.last_captions = dict(zip(ids, captions))
        return metrics
