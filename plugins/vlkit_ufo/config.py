"""The ufo plugin's config section (``cfg.ufo``): method, head size, losses, queries and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlkit.config import ConfigError

METHODS = ("head", "training_free")
DENSE_MODES = ("maskclip", "clearclip", "plain")
TF_INSTANCES = ("components", "single")
EVAL_QUERIES = ("all", "present")
IOU_TYPES = ("segm", "bbox")


@dataclass
class UfoConfig:
    # head = AnchoredHead trained on frozen (or adapted) dense features; training_free = text vs dense features only
    method: str = "head"
    # how the backbone's last block yields patch features (vlkit.backbone.dense): maskclip | clearclip | plain
    dense_mode: str = "maskclip"
    # query prompt; '{}' is replaced by the category name or phrase (e.g. 'a photo of a {}.')
    prompt: str = "{}"

    # ---- head (vlkit_ufo.anchored.AnchoredHead) ----
    width: int = 128
    # K = r*r mask embeddings per instance (UFO: 16); masks come out at r x the stride-4 mask features
    num_mask_embeds: int = 16
    # a light convolutional branch that sees the pixels at stride 4 (false: masks from patch features only)
    pixel_branch: bool = True
    # extra stride-4 convolutions in the pixel branch (each widens its receptive field by 8 pixels)
    pixel_depth: int = 4
    # self-attention layers over the anchor tokens, per image, before the query (context for recognition)
    context_layers: int = 1
    # channels of the position code in the mask features (0 = none) and its kernel width (fraction of the side)
    pos_dim: int = 32
    pos_sigma: float = 0.08

    # ---- losses ----
    loss_focal: float = 20.0
    loss_dice: float = 1.0
    loss_obj: float = 1.0
    # anchors matched to each ground-truth instance (UFO repeats every ground truth 3 times)
    gt_repeats: int = 3

    # ---- backbone ----
    # true: the backbone is frozen (only the head trains); false: the image tower is fine-tuned too
    # (the text tower always stays frozen: query embeddings are cached and must keep their meaning)
    freeze_backbone: bool = True
    # > 0: LoRA adapters (peft) of this rank on the image tower's MLPs train with the head while the
    # backbone's own weights stay frozen (needs freeze_backbone=true); merged into the weights for inference
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj"])

    # ---- on an MLLM backbone (vlkit_ufo.mllm: the model's own <MASK> tokens, as in the paper) ----
    # grid points per side; each opens its own answer ("<class> , <MASK> x 16" or "background")
    mllm_grid: int = 8
    # mask tokens: 1 = UFO's one <MASK> token, written 16 times; 16 = <MASK_0> .. <MASK_15>, a token per
    # mask embedding (a small language model cannot tell 16 identical tokens apart by position alone)
    mllm_mask_tokens: int = 1
    # grid points answered per training image: those matched to a ground truth first, then random others
    mllm_train_points: int = 16
    # LoRA rank on the language model's projections (0 = fine-tune the whole language model); its
    # embedding table (with the new <MASK> row) and final norm always train. ufo.freeze_backbone=false
    # trains the vision tower and projector too
    mllm_lora_rank: int = 8
    mllm_lora_alpha: int = 16
    # Hungarian matching of ground truths (x gt_repeats) to grid points: point L1 x this + outside-mask x that
    mllm_point_cost: float = 5.0
    mllm_inside_cost: float = 100.0

    # ---- queries ----
    # add '<color> <shape>' phrases from annotations that carry a 'color' key (the shapes world)
    color_queries: bool = True
    # absent category names asked per training image (all of them when fewer are absent): they teach
    # the head to answer 'nothing here', as evaluation asks every category in every image
    negatives_per_image: int = 8

    # ---- inference ----
    # candidate instances per (image, query): the best anchors by objectness, decoded into masks
    top_k: int = 10
    # matrix NMS (Gaussian kernel) between a query's candidates: larger = stronger suppression
    nms_sigma: float = 2.0
    # a pixel belongs to a mask when its probability exceeds this
    mask_threshold: float = 0.5
    # instances scoring at or below this are dropped (evaluation keeps low scores: AP needs them)
    score_threshold: float = 0.0
    # training_free: how a query's binary map becomes instances (components = one per connected
    # component, single = the whole map as one instance), background prompts it competes with, and
    # components smaller than this fraction of the image are dropped as noise
    tf_instances: str = "components"
    tf_background: list[str] = field(default_factory=lambda: ["background"])
    tf_min_area: float = 0.002

    # ---- evaluation ----
    # all = every category is queried in every image (the COCO protocol: false positives count);
    # present = only the categories annotated in the image (cheaper, an oracle on image labels)
    eval_queries: str = "all"
    # side of the square masks eval_step returns, at most the model input size (0 = that size); all of a
    # split's masks are kept for COCOeval (bit-packed), so keep it modest on big data sets
    eval_mask_size: int = 64
    iou_types: list[str] = field(default_factory=lambda: ["segm", "bbox"])
    # keep the best-scoring detections per image over all queries (detectron2's detections_per_image)
    max_dets_per_image: int = 100
    # semantic mIoU: a query's map is, per pixel, its best instance score x mask probability; pixels whose
    # best query value is below this are labelled background
    sem_threshold: float = 0.5


def check_config(cfg: Any) -> None:
    """Fail early, naming the key, on values the dataclass types cannot rule out."""
    choices = {"method": METHODS, "dense_mode": DENSE_MODES, "tf_instances": TF_INSTANCES,
               "eval_queries": EVAL_QUERIES}
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"ufo.{key}={value!r} is not valid; choose one of {', '.join(allowed)}")
    bad = [t for t in cfg.iou_types if t not in IOU_TYPES]
    if bad or not cfg.iou_types:
        raise ConfigError(f"ufo.iou_types={list(cfg.iou_types)!r}: use a non-empty subset of {list(IOU_TYPES)}")
    if "{}" not in cfg.prompt:
        raise ConfigError(f"ufo.prompt={cfg.prompt!r} must contain '{{}}' where the query text goes")
    if cfg.lora_rank < 0:
        raise ConfigError(f"ufo.lora_rank={cfg.lora_rank} must be >= 0 (0 = no adapters)")
    if cfg.lora_rank and not cfg.freeze_backbone:
        raise ConfigError("ufo.lora_rank > 0 trains adapters on a frozen image tower; ufo.freeze_backbone=false "
                          "fine-tunes the whole tower instead: choose one of them")
    if cfg.mllm_mask_tokens not in (1, 16):
        raise ConfigError(f"ufo.mllm_mask_tokens={cfg.mllm_mask_tokens}: use 1 (UFO's <MASK> written 16 times) or 16")
    if cfg.mllm_grid < 1 or cfg.mllm_train_points < 1 or cfg.mllm_lora_rank < 0:
        raise ConfigError("ufo.mllm_grid and ufo.mllm_train_points must be >= 1, ufo.mllm_lora_rank >= 0")
    if cfg.top_k < 1 or cfg.gt_repeats < 1 or cfg.eval_mask_size < 0 or cfg.negatives_per_image < 0:
        raise ConfigError("ufo.top_k and ufo.gt_repeats must be >= 1, ufo.eval_mask_size and "
                          "ufo.negatives_per_image >= 0")
