"""Open-ended segmentation of one image for one text query: post-processing shared with evaluation,
``segment()``, the ``Segmenter`` that loads a trained run, and ``demo()`` for the ``vlkit segment`` command."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from vlkit.backbone.lora import LoraSpec, add_lora, merge_lora
from vlkit.data.images import load_image
from vlkit.errors import VlkitError

from .anchored import AnchoredHead
from .data import ImageTransform
from .head import masks_to_boxes, training_free_logits
from .mllm import MllmSegmenter
from .shipped import DEFAULT_HEAD, run_threshold, shipped_head

if TYPE_CHECKING:
    from .config import UfoConfig


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


def threshold_instances(mask_logits: Tensor, scores: Tensor, size: tuple[int, int], mask_threshold: float = 0.5,
                        score_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Candidate instances [N, h, w] logits with their scores [N] -> (masks [N, *size] bool, scores [N]).

    Masks are the logits resized bilinearly to ``size`` and thresholded, so the same instance is found at
    any output size. Dropped candidates (empty, or scoring <= score_threshold) get score 0 and an empty
    mask, which keeps shapes fixed for gathering.
    """
    kept = scores > score_threshold
    masks = torch.zeros(*kept.shape, *size, dtype=torch.bool, device=mask_logits.device)
    if kept.any():  # only kept candidates are resized: at a photo's full size that is most of the work
        logits = mask_logits[kept].float()[:, None]
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        masks[kept] = logits[:, 0] > _logit(mask_threshold)
    empty = ~masks.flatten(1).any(1)
    return masks, torch.where(kept & ~empty, scores.float(), torch.zeros_like(scores, dtype=torch.float32))


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
def segment(image: Image.Image | str | Path, query: str, backbone: Any = None, head: Any = None,
            threshold: float | None = None, *, mask_threshold: float = 0.5, dense_mode: str = "maskclip",
            prompt: str = "{}", background: Sequence[str] = ("background",), tf_instances: str = "components",
            tf_min_area: float = 0.002, query_emb: Tensor | None = None, top_k: int = 10,
            nms_sigma: float = 2.0) -> list[Instance]:
    """Every instance of ``query`` in ``image``, best first, masks at the original image size.

    Without a ``backbone``: the shipped default, the shapes-trained backbone with the head trained on it
    (``Segmenter.shipped()``, loaded once; its own inference settings apply). ``threshold`` None is the
    shipped head's F1-best threshold on val there, and 0.5 otherwise.

    With a trained ``head`` (an ``AnchoredHead``) instances are its ``top_k`` best anchors' masks whose score
    after matrix NMS exceeds ``threshold``; on an MLLM backbone ``head`` is the run's ``MllmSegmenter``
    (``Segmenter.from_run``): the prompt lists the run's classes and the query, each grid point answers one of
    them or "background", and the query's answers are its instances;
    without one, the training-free baseline: the query competes with the ``background`` prompts per
    patch, and each connected component of its map (``tf_instances``) is an instance. ``query_emb``
    ([1, D], from ``encode_queries``) skips the text tower when the same query runs on many images.
    """
    if backbone is None:
        if head is not None:
            raise VlkitError("segment() got a head but no backbone: pass the backbone the head was trained on")
        return default_segmenter()(image, query, threshold)
    threshold = 0.5 if threshold is None else threshold
    pil = _as_image(image)
    size = (pil.height, pil.width)
    x = ImageTransform.for_backbone(backbone)(pil)[None].to(backbone.device)
    if isinstance(head, MllmSegmenter):  # an MLLM answering with its own <MASK> tokens
        # the prompt lists the classes the run learned (as in its training), plus the query when it is new
        listed = [c for c in head.classes if c != query] + [query]
        logits, scores, _ = head(x, [listed], top_k=top_k, nms_sigma=nms_sigma, min_score=threshold)
        masks, scores = threshold_instances(logits[0, -1], scores[0, -1], size, mask_threshold, threshold)
        return _to_instances(masks, scores, query)
    feats = backbone.dense_features(x, mode=dense_mode)
    q = encode_queries(backbone, [query], prompt) if query_emb is None else query_emb.to(feats.device)
    if head is not None:
        logits, scores, _ = head.instances(q.to(feats.device), feats, x, top_k=top_k, nms_sigma=nms_sigma,
                                           min_score=threshold, semantic=False)
        masks, scores = threshold_instances(logits[0, 0], scores[0, 0], size, mask_threshold, threshold)
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

    def __init__(self, backbone: Any, head: Any, ufo_cfg: Any, threshold: float = 0.5) -> None:
        """``head``: an ``AnchoredHead``, an ``MllmSegmenter`` (MLLM backbones), or None (training-free)."""
        self.backbone, self.cfg = backbone.eval(), ufo_cfg
        self.head = head.eval() if isinstance(head, torch.nn.Module) else head
        # the default score threshold: a trained run's F1-best on val (``segm/F1_threshold``), else 0.5
        self.threshold = float(threshold)
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
        if getattr(backbone, "kind", "clip") == "mllm":
            from .mllm import load_mllm_run

            head = load_mllm_run(backbone, cfg.ufo, find_checkpoint(run, prefer) / WEIGHTS_FILE, run_classes(cfg))
            if device:
                backbone.to(device)
            return cls(backbone, head, cfg.ufo, threshold=run_threshold(run))
        head = build_decoder(cfg.ufo, backbone.embed_dim) if cfg.ufo.method == "head" else None
        if head is not None:
            if cfg.ufo.lora_rank:
                add_lora(backbone, lora_spec(cfg.ufo, backbone))
            state = load_file(str(find_checkpoint(run, prefer) / WEIGHTS_FILE))
            load_task_weights(state, backbone, head)
            if cfg.ufo.lora_rank:
                merge_lora(backbone)  # plain weights again: inference runs at the backbone's own speed
        if device:
            backbone.to(device)
            head = head.to(device) if head is not None else None
        return cls(backbone, head, cfg.ufo, threshold=run_threshold(run) if head is not None else 0.5)

    @classmethod
    def shipped(cls, name: str = DEFAULT_HEAD, device: str | None = None, backbone: Any = None,
                root: Path | None = None) -> Segmenter:
        """The head shipped inside the package (``vlkit_ufo.shipped``) on the backbone it was trained on
        (loaded, or ``backbone`` when it is that very model: same identity)."""
        from omegaconf import OmegaConf
        from safetensors.torch import load_file

        from vlkit.engine.run import load_model, set_seed

        from .config import UfoConfig

        meta, weights = shipped_head(name) if root is None else shipped_head(name, Path(root))
        try:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(UfoConfig), meta["ufo"]))
        except Exception as exc:  # a head written by another vlkit version
            raise VlkitError(f"the shipped ufo head {name!r} does not fit this vlkit ({exc}); reinstall vlkit") from None
        given = backbone is not None
        if not given:
            set_seed(int(meta.get("seed", 0)))  # as the training run did, for a randomly initialised backbone
            backbone = load_model(OmegaConf.create(meta["model"]))
        if backbone.identity != meta["backbone_identity"]:
            what = "the backbone given" if given else meta["model"]["name"]
            raise VlkitError(f"the shipped ufo head {name!r} was trained on backbone {meta['backbone_identity']}, but "
                             f"{what} is {backbone.identity}; " + (
                                 "segment with a head trained on it (vlkit train plugin=ufo model.name=...)" if given
                                 else "reinstall vlkit"))
        head = build_decoder(cfg, backbone.embed_dim)
        head.load_state_dict(load_file(str(weights)), strict=True)
        if device:
            backbone.to(device)
            head.to(device)
        return cls(backbone, head, cfg, threshold=float(meta.get("threshold", 0.5)))

    def __call__(self, image: Image.Image | str | Path, query: str, threshold: float | None = None) -> list[Instance]:
        c = self.cfg
        threshold = self.threshold if threshold is None else threshold
        if isinstance(self.head, MllmSegmenter):  # an MLLM reads the query itself
            return segment(image, query, self.backbone, self.head, threshold, mask_threshold=c.mask_threshold,
                           top_k=c.top_k, nms_sigma=c.nms_sigma)
        if query not in self._queries:
            self._queries = {**dict(list(self._queries.items())[-255:]), query: encode_queries(
                self.backbone, [query], c.prompt)}
        return segment(image, query, self.backbone, self.head, threshold, mask_threshold=c.mask_threshold,
                       dense_mode=c.dense_mode, prompt=c.prompt, background=list(c.tf_background),
                       tf_instances=c.tf_instances, tf_min_area=c.tf_min_area, query_emb=self._queries[query],
                       top_k=c.top_k, nms_sigma=c.nms_sigma)


def run_classes(cfg: Any) -> list[str]:
    """The category names a run's data holds (what an MLLM run's prompts listed); [] with a warning when its
    data cannot be read any more (segment() then lists the query alone, which such a model has not seen)."""
    import warnings

    from .data import open_split

    try:
        return [name for _, name in sorted(open_split(cfg.data, "val").cat_names.items())]
    except Exception as exc:  # moved or deleted data: still segment, less well
        warnings.warn(f"could not read the run's categories from its data ({exc}); the prompt will list the "
                      "query alone", stacklevel=2)
        return []


@functools.lru_cache(maxsize=1)
def default_segmenter() -> Segmenter:
    """``Segmenter.shipped()``, loaded on first use and kept."""
    return Segmenter.shipped()


def build_decoder(ufo_cfg: Any, embed_dim: int) -> AnchoredHead:
    c = ufo_cfg
    return AnchoredHead(embed_dim, width=c.width, num_mask_embeds=c.num_mask_embeds, pos_dim=c.pos_dim,
                        pos_sigma=c.pos_sigma, pixel_branch=c.pixel_branch, pixel_depth=c.pixel_depth,
                        context_layers=c.context_layers)


def lora_spec(cfg: UfoConfig, backbone: Any) -> LoraSpec:
    """The adapters ``ufo.lora_rank`` puts on the image tower; never on layers the dense path skips."""
    exclude = []
    if cfg.dense_mode != "plain":
        last = len(backbone.model.visual.transformer.resblocks) - 1
        exclude.append(f"visual.transformer.resblocks.{last}.mlp")
    return LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=list(cfg.lora_targets), tower="image",
                    exclude=exclude)


def load_task_weights(state: dict[str, Tensor], backbone: Any, head: AnchoredHead) -> None:
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


def segment_to_file(image: str, query: str, checkpoint: str = "", out: str = "overlay.png",
                    threshold: float | None = None) -> list[Instance]:
    """What ``vlkit segment image=... query=... [checkpoint=RUN] out=overlay.png`` runs: segment one image
    with a trained run (default: the shipped head on the shipped backbone) and write the overlay PNG;
    prints one line per instance. ``threshold`` None: the run's (or the shipped head's) F1-best on val."""
    from .overlay import overlay

    segmenter = Segmenter.from_run(checkpoint) if checkpoint else default_segmenter()
    instances = segmenter(image, query, threshold)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    overlay(_as_image(image), instances).save(out)
    for inst in instances:
        print(f"{inst.query}: score {inst.score:.3f} box {[round(v, 1) for v in inst.box]}")
    print(f"{len(instances)} instance(s) of {query!r}; overlay written to {out}")
    return instances
