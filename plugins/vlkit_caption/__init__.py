"""The caption plugin: teaches an MLLM backbone to describe images (next-token loss on captions through
the Accelerate engine) and scores its greedy captions on the colour and shape words the scene makes true.

``vlkit train plugin=caption`` trains the tiny offline LLaVA (``vlkit-tiny-llava``) on the shapes world;
``python -m vlkit.backbone.shipped RUN/backbone --name vlkit-tiny-llava-shapes`` ships the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlkit.plugins import Plugin, settings
from vlkit_caption.config import CaptionConfig
from vlkit_caption.data import build_data


def build_task(cfg: DictConfig, backbone, data):
    from vlkit_caption.task import CaptionTask

    cc = settings(cfg, CaptionConfig)
    if cc.vision_from and getattr(backbone, "random_init", False) and not cfg.checkpoint:
        start_vision_from_clip(backbone, cc, data, cfg)
    elif cc.vision_from:  # a trained MLLM (or a checkpoint about to be loaded) keeps its own tower
        print(f"caption.vision_from={cc.vision_from} skipped: {backbone.name} is not a fresh model"
              + (" (a checkpoint is loaded)" if cfg.checkpoint else ""))
    return CaptionTask(backbone, cc, {"val": data.val, "test": data.test})


def start_vision_from_clip(backbone, cc: CaptionConfig, data, cfg: DictConfig) -> dict[str, float]:
    """caption.vision_from: a freshly built MLLM's vision tower starts from a CLIP backbone's image tower (copied,
    then distilled on training images; vlkit.backbone.tiny_llava). Seeded: every process, and a resumed run, does
    the same. A loaded (trained) MLLM is never touched."""
    import torch
    from omegaconf import OmegaConf

    from vlkit.backbone.tiny_llava import distill_vision, vision_from_clip
    from vlkit.engine.run import load_model
    from vlkit.errors import VlkitError

    clip = load_model(OmegaConf.create({"name": cc.vision_from, "pretrained": None}))
    if getattr(clip, "kind", "clip") != "clip":
        raise VlkitError(f"caption.vision_from={cc.vision_from!r} is not a CLIP backbone")
    clip.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    n = min(cc.vision_distill_images, len(data.train))
    picks = torch.randperm(len(data.train), generator=gen)[:n].tolist()
    images = torch.stack([data.train[i]["image"] for i in picks])
    try:
        stats = vision_from_clip(backbone, clip, images[:512])
    except ValueError as exc:
        raise VlkitError(f"caption.vision_from={cc.vision_from!r}: {exc}") from None
    if cc.vision_distill_steps:
        stats.update(distill_vision(backbone, clip, images, steps=cc.vision_distill_steps, seed=cfg.train.seed,
                                    progress=cfg.train.progress))
    print("vision tower from " + cc.vision_from + ": " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    return stats


def after_fit(cfg: DictConfig, task, run_dir: Path, metrics: dict[str, Any], backbone) -> dict[str, Any]:
    """Save the trained MLLM in the run folder (adapters merged first)."""
    from vlkit.backbone.lora import has_lora, merge_lora, save_adapter

    if has_lora(backbone):
        save_adapter(backbone, run_dir / "adapter")
        merge_lora(backbone)
    backbone.save(run_dir / "backbone")
    return {"backbone": str(run_dir / "backbone")}


plugin = Plugin(
    name="caption",
    config=CaptionConfig,
    build_data=build_data,
    build_task=build_task,
    headline_metric="pair_f1",
    configs=str(Path(__file__).parent / "configs"),
    after_fit=after_fit,
    backbones=("mllm",),
    description="image captioning on an MLLM backbone (next-token loss); colour/shape word F1 of greedy captions",
)
