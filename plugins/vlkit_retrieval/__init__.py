"""The retrieval plugin: image-text retrieval trained with ranking/contrastive losses, Recall@K both ways.

Its default run trains the backbone that vlkit ships as ``cached:vlkit-tiny-shapes`` (the csp, ufo and demo
default); ``python -m vlkit.backbone.shipped RUN/backbone`` stores a run's backbone as the shipped one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlkit.plugins import Plugin, settings
from vlkit_retrieval.config import RetrievalConfig
from vlkit_retrieval.data import build_data


def build_task(cfg: DictConfig, backbone, data):
    from vlkit_retrieval.task import RetrievalTask

    check_export_name(cfg)
    return RetrievalTask(backbone, settings(cfg, RetrievalConfig), {"val": data.val, "test": data.test})


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


def report(cfg: DictConfig, task, out_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """``recall.png``: validation Recall@1 both ways against the CPU minutes of training (from eval_log.jsonl)."""
    from vlkit_retrieval.plots import plot_recall_vs_time

    log = Path(out_dir) / "eval_log.jsonl"
    if log.is_file() and plot_recall_vs_time(log, Path(out_dir) / "recall.png"):
        return {"recall_plot": str(Path(out_dir) / "recall.png")}
    return {}


def check_export_name(cfg: DictConfig) -> None:
    """``retrieval.export_as`` may not name a backbone shipped with vlkit (those are replaced only on purpose,
    with ``python -m vlkit.backbone.shipped``); checked before any training."""
    from vlkit.backbone.shipped import shipped_names
    from vlkit.errors import VlkitError

    if cfg.retrieval.export_as and cfg.retrieval.export_as in shipped_names():
        raise VlkitError(
            f"retrieval.export_as={cfg.retrieval.export_as!r} names a backbone shipped with vlkit; export under "
            f"another name (the run folder's backbone/ always holds the result; to replace the shipped one: "
            f"python -m vlkit.backbone.shipped RUN_DIR/backbone --name {cfg.retrieval.export_as})"
        )


def recovery(teacher: str, task_weight: float, blocks: float = 0.0) -> list[str]:
    """The retrieval keys of recovery by distillation (`vlkit prune ... recover_steps=N`): the unpruned model as
    teacher (similarity relations both ways + embeddings, and each block's output at weight ``blocks``;
    vlkit.compress.distill), the contrastive/ranking loss at ``task_weight``, the temperature taken from the
    student as it is."""
    return [f"retrieval.distill_from={teacher}", f"retrieval.task_weight={task_weight}",
            f"retrieval.distill_blocks={blocks}", "retrieval.init_temperature=0"]


plugin = Plugin(
    name="retrieval",
    config=RetrievalConfig,
    build_data=build_data,
    build_task=build_task,
    headline_metric="rsum",
    configs=str(Path(__file__).parent / "configs"),
    after_fit=after_fit,
    report=report,
    recovery=recovery,
    backbones=("clip", "mllm"),
    description="bidirectional image-text retrieval (VSE++ hinge / InfoNCE), Recall@K both ways",
)
