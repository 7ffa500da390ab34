"""The task a backbone gets: the anchored-head task (vlkit_ufo.task) on CLIP, UFO's <MASK>-token task
(vlkit_ufo.mllm_task) on an MLLM."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from vlkit.plugins import DataBundle, settings

from .config import UfoConfig, check_config
from .mllm_task import MllmUfoTask
from .task import UfoTask


def build_task(cfg: DictConfig, backbone: Any, data: DataBundle) -> UfoTask:
    """The ufo task for ``backbone`` (``cfg.ufo`` checked first): MllmUfoTask on an MLLM, else UfoTask."""
    ufo = settings(cfg, UfoConfig, "ufo")
    check_config(ufo)
    info = data.info
    if getattr(backbone, "kind", "clip") == "mllm":
        return MllmUfoTask(ufo, backbone, info["vocab"], info["coco"], info["image_size"], info["eval_mask_size"],
                           seed=cfg.train.seed)
    return UfoTask(ufo, backbone, info["vocab"], info["coco"], info["image_size"], info["eval_mask_size"])
