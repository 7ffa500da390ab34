"""The retrieval plugin: image-text retrieval trained with ranking/contrastive losses, Recall@K both ways.

It also provides the trained tiny backbone (``cached:vlkit-tiny-shapes``) the csp and ufo defaults use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlkit.plugins import Plugin
from vlkit_retrieval.config import RetrievalConfig
from vlkit_retrieval.data import build_data


def build_task(cfg: DictConfig, backbone, data):
    from vlkit_retrieval.task import RetrievalTask

    return RetrievalTask(backbone, RetrievalConfig(**cfg.retrieval), {"val": data.val, "test": data.test})


def after_fit(cfg: DictConfig, task, run_dir: Path, metrics: dict[str, Any], backbone) -> dict[str, Any]:
    """Save the trained backbone in the run folder (adapters alone too, when LoRA) and, with
    retrieval.export_as, into vlkit's cache where the csp/ufo defaults find it."""
    from vlkit.cache import backbone_dir
    from vlkit_retrieval.lora import has_lora, merge_lora, save_adapter

    if has_lora(backbone):
        save_adapter(backbone, run_dir / "adapter")
        merge_lora(backbone)
    backbone.save(run_dir / "backbone")
    out: dict[str, Any] = {"backbone": str(run_dir / "backbone")}
    if cfg.retrieval.export_as:
        target = backbone_dir(cfg.retrieval.export_as)
        backbone.save(target)
        print(f"saved the trained backbone as {cfg.retrieval.export_as!r} in {target}")
        out["exported_as"] = cfg.retrieval.export_as
    return out


def _train_default_backbone(dest: Path) -> None:
    """Train the offline default backbone (the plugin's built-in defaults) and save it to ``dest``."""
    from vlkit.cache import cache_root
    from vlkit.cli import resolve_config
    from vlkit.engine.run import train

    run_dir = cache_root() / "runs" / dest.name
    resume = ["resume=true"] if (run_dir / "checkpoints" / "last").exists() else []
    plugin, cfg = resolve_config(["plugin=retrieval", f"run.dir={run_dir}", f"retrieval.export_as={dest.name}",
                                  *resume])
    train(cfg, plugin)


plugin = Plugin(
    name="retrieval",
    config=RetrievalConfig,
    build_data=build_data,
    build_task=build_task,
    after_fit=after_fit,
    description="bidirectional image-text retrieval (VSE++ hinge / InfoNCE), Recall@K both ways",
    provides={"vlkit-tiny-shapes": _train_default_backbone},
)
