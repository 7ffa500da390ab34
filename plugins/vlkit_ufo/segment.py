"""Open-ended segmentation of one image for one text query: post-processing shared with evaluation,
``segment()``, the ``Segmenter`` that loads a trained run, and ``demo()`` for the ``vlkit segment`` command."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from vlkit.data.images import load_image
from vlkit.errors import VlkitError

from .data import ImageTransform
from .head import QueryDecoder, masks_to_boxes, training_free_logits


@dataclass
class Instance:
    """One found instance, at the original image size: ``box`` is xyxy in pixel edges."""

    mask: np.ndarray  # [H, W] bool
    box: tuple[float, float, float, float]
    score: float
    query: str = ""


# ---- shared post-processing -----------------------------------------------------------------------
@torch.no_grad()
def encode_queries(backbone: Any, texts: Sequence[str], prompt: str = "{}", batch: int = 256) -> Tensor:
    """L2-normalised text embeddings [Q, D] of ``prompt.format(text)`` for every text."""
    prompts = [prompt.format(t) for t in texts]
    chunks = [backbone.encode_text(backbone.tokenize(prompts[i:i + batch]).to(backbone.device), normalize=True)
              for i in range(0, len(prompts), batch)]
    return torch.cat(chunks) if chunks else torch.zeros(0, backbone.embed_dim)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def slot_masks(mask_logits: Tensor, obj_logits: Tensor, size: tuple[int, int], mask_threshold: float = 0.5,
               score_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Decoder slots [..., N, h, w] -> (masks [..., N, *size] bool, scores [..., N]).

    Scores follow ``head.predict`` (sigmoid(objectness) x mean foreground probability, computed at the
    decoder's own resolution); masks are the logits resized bilinearly to ``size`` and thresholded, so
    the same instance is found at any output size. Dropped slots (empty, or scoring <= score_threshold)
    get score 0 and an empty mask, which keeps shapes fixed for gathering.
    """
    prob = mask_logits.float().sigmoid()
    fg = prob > mask_threshold
    area = fg.flatten(-2).sum(-1)
    mask_score = (prob * fg).flatten(-2).sum(-1) / area.clamp(min=1)
    scores = obj_logits.float().sigmoid() * mask_score
    scores = torch.where((area > 0) & (scores > score_threshold), scores, torch.zeros_like(scores))
    kept = scores > 0
    masks = torch.zeros(*kept.shape, *size, dtype=torch.bool, device=mask_logits.device)
    if kept.any():  # only kept slots are resized: at a photo's full size that is most of the work
        logits = mask_logits[kept].float()[:, None]
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        masks[kept] = logits[:, 0] > _logit(mask_threshold)
    return masks, scores


def training_free_probs(query_emb: Tensor, feats: Tensor, background_emb: Tensor, scale: float | Tensor) -> Tensor:
    """[B, Q, h, w] probability of each query at each patch: a softmax over the queries plus the
    background prompts of CLIP-scaled cosines (MaskCLIP-style); the background columns are dropped."""
    texts = torch.cat([query_emb, background_emb.to(query_emb)], dim=0)
    logits = training_free_logits(texts, feats, scale=scale)
    return logits.softmax(dim=1)[:, : query_emb.shape[0]]


def component_instances(prob: Tensor, k: int, mask_threshold: float = 0.5, min_area: float = 0.0,
                        mode: str = "components") -> tuple[Tensor, Tensor]:
    """One query's probability map [H, W] -> (masks [k, H, W] bool, scores [k]), zero-padded.

    ``components``: each connected component (8-connectivity) of ``prob > mask_threshold`` is an instance,
    scored by its mean probability; ``single``: the whole map is one instance. Components smaller than
    ``min_area`` (a fraction of the map) are dropped; the ``k`` best-scoring are kept.
    """
    fg = (prob > mask_threshold).cpu().numpy()
    h, w = fg.shape
    masks = torch.zeros(k, h, w, dtype=torch.bool)
    scores = torch.zeros(k)
    if mode == "single":
        labels, n = fg.astype(np.int32), int(fg.any())
    else:
        labels, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n == 0:
        return masks, scores
    p = prob.float().cpu().numpy()
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(fg, labels, idx)
    means = ndimage.mean(p, labels, idx)
    keep = [i for i in np.argsort(-means) if areas[i] >= max(1.0, min_area * h * w)][:k]
    for slot, i in enumerate(keep):
        masks[slot] = torch.from_numpy(labels == idx[i])
        scores[slot] = float(means[i])
    return masks, scores


# ---- one image ------------------------------------------------------------------------------------
def _as_image(image: Image.Image | str | Path) -> Image.Image:
    return load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")


def _to_instances(masks: Tensor, scores: Tensor, query: str) -> list[Instance]:
    boxes, _ = masks_to_boxes(masks)
    order = scores.argsort(descending=True).tolist()
    return [Instance(masks[i].cpu().numpy(), tuple(float(v) for v in boxes[i]), float(scores[i]), query)
            for i in order if scores[i] > 0 and masks[i].any()]


@torch.inference_mode()  # lighter than no_grad per op, which matters for tiny models
def segment(image: Image.Image | str | Path, query: str, backbone: Any, head: QueryDecoder | None = None,
            threshold: float = 0.5, *, mask_threshold: float = 0.5, dense_mode: str = "maskclip",
            prompt: str = "{}", background: Sequence[str] = ("background",), tf_instances: str = "components",
            tf_min_area: float = 0.002, query_emb: Tensor | None = None) -> list[Instance]:
    """Every instance of ``query`` in ``image``, best first, masks at the original image size.

    With a trained ``head`` (a ``QueryDecoder``) instances are its slots scoring above ``threshold``;
    without one, the training-free baseline: the query competes with the ``background`` prompts per
    patch, and each connected component of its map (``tf_instances``) is an instance. ``query_emb``
    ([1, D], from ``encode_queries``) skips the text tower when the same query runs on many images.
    """
    pil = _as_image(image)
    size = (pil.height, pil.width)
    x = ImageTransform.for_backbone(backbone)(pil)[None].to(backbone.device)
    feats = backbone.dense_features(x, mode=dense_mode)
    q = encode_queries(backbone, [query], prompt) if query_emb is None else query_emb.to(feats.device)
    if head is not None:
        _, obj, logits = head.candidates(q.to(feats.device), feats, min_objectness=threshold)
        masks, scores = slot_masks(logits, obj, size, mask_threshold, threshold)
        return _to_instances(masks, scores, query)
    bg = encode_queries(backbone, list(background), prompt)
    prob = training_free_probs(q, feats, bg, backbone.logit_scale)[0, 0]
    prob = F.interpolate(prob[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    masks, scores = component_instances(prob, 100, mask_threshold, tf_min_area, tf_instances)
    keep = scores > threshold
    return _to_instances(masks[keep], scores[keep], query)


class Segmenter:
    """A trained ufo run ready to segment: its backbone (from the run's config.yaml ``model``), its head
    (``checkpoints/best`` else ``last``), and its ``cfg.ufo`` inference settings."""

    def __init__(self, backbone: Any, head: QueryDecoder | None, ufo_cfg: Any) -> None:
        self.backbone, self.head, self.cfg = backbone.eval(), head.eval() if head is not None else None, ufo_cfg
        self._queries: dict[str, Tensor] = {}  # the weights never change here: a query is encoded once

    @classmethod
    def from_run(cls, run: str | Path, prefer: str = "best", device: str | None = None) -> Segmenter:
        from omegaconf import OmegaConf
        from safetensors.torch import load_file

        from vlkit.config import schema_for, validate
        from vlkit.engine.checkpoint import WEIGHTS_FILE, find_checkpoint
        from vlkit.engine.run import load_model, set_seed

        from .config import UfoConfig

        run = Path(run)
        if (run / "trainer_state.json").is_file():  # a checkpoint folder: its run is two levels up
            prefer, run = run.name, run.parent.parent
        if not (run / "config.yaml").is_file():
            raise VlkitError(f"{run} is not a ufo run folder (no config.yaml); pass the run.dir of `vlkit train plugin=ufo`")
        cfg = validate(OmegaConf.load(run / "config.yaml"), schema_for("ufo", UfoConfig))
        if cfg.plugin != "ufo":
            raise VlkitError(f"{run} is a run of plugin {cfg.plugin!r}, not ufo")
        set_seed(cfg.train.seed)  # as the run did: a randomly initialised backbone gets the run's weights
        backbone = load_model(cfg.model)
        head = build_decoder(cfg.ufo, backbone.embed_dim) if cfg.ufo.method == "head" else None
        if head is not None:
            from vlkit.backbone.lora import add_lora, merge_lora

            from .task import lora_spec

            if cfg.ufo.lora_rank:
                add_lora(backbone, lora_spec(cfg.ufo, backbone))
            state = load_file(str(find_checkpoint(run, prefer) / WEIGHTS_FILE))
            load_task_weights(state, backbone, head)
            if cfg.ufo.lora_rank:
                merge_lora(backbone)  # plain weights again: inference runs at the backbone's own speed
        if device:
            backbone.to(device)
            head = head.to(device) if head is not None else None
        return cls(backbone, head, cfg.ufo)

    def __call__(self, image: Image.Image | str | Path, query: str, threshold: float = 0.5) -> list[Instance]:
        c = self.cfg
        if query not in self._queries:
            self._queries = {**dict(list(self._queries.items())[-255:]), query: encode_queries(
                self.backbone, [query], c.prompt)}
        return segment(image, query, self.backbone, self.head, threshold, mask_threshold=c.mask_threshold,
                       dense_mode=c.dense_mode, prompt=c.prompt, background=list(c.tf_background),
                       tf_instances=c.tf_instances, tf_min_area=c.tf_min_area, query_emb=self._queries[query])


def build_decoder(ufo_cfg: Any, embed_dim: int) -> QueryDecoder:
    c = ufo_cfg
    return QueryDecoder(embed_dim, num_slots=c.num_slots, width=c.width, num_layers=c.num_layers,
                        num_heads=c.num_heads, num_mask_embeds=c.num_mask_embeds, dropout=c.dropout,
                        query_skip=c.query_skip)


def load_task_weights(state: dict[str, Tensor], backbone: Any, head: QueryDecoder) -> None:
    """Load a ufo task checkpoint (``decoder.*``, and ``backbone.*`` when the image tower was fine-tuned)."""
    dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    if not dec:
        raise VlkitError("the checkpoint holds no ufo head weights (no 'decoder.*' tensors): was it written by "
                         "`vlkit train plugin=ufo` with ufo.method=head?")
    head.load_state_dict(dec, strict=True)
    bb = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if bb:
        bad = backbone.load_state_dict(bb, strict=False).unexpected_keys
        if bad:
            raise VlkitError(f"checkpoint backbone tensors do not fit the run's model: {bad[:3]}")


def demo(image: str, query: str, checkpoint: str, out: str = "overlay.png", threshold: float = 0.5) -> list[Instance]:
    """What ``vlkit segment image=... query=... checkpoint=RUN out=overlay.png`` runs: segment one image
    with a trained run and write the overlay PNG; prints one line per instance."""
    from .overlay import overlay

    instances = Segmenter.from_run(checkpoint)(image, query, threshold)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    overlay(_as_image(image), instances).save(out)
    for inst in instances:
        print(f"{inst.query}: score {inst.score:.3f} box {[round(v, 1) for v in inst.box]}")
    print(f"{len(instances)} instance(s) of {query!r}; overlay written to {out}")
    return instances
