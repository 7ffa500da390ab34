"""vlkit ufo plugin: open-ended instance segmentation and detection by embedding retrieval (UFO-style)."""

from __future__ import annotations

from pathlib import Path

from vlkit.plugins import Plugin

from .build import build_task
from .config import UfoConfig
from .data import build_data
from .demo_tab import SEGMENTATION
from .segment import Instance, Segmenter, segment
from .task import UfoTask

plugin = Plugin(
    name="ufo",
    config=UfoConfig,
    build_data=build_data,
    build_task=build_task,
    headline_metric="segm/AP",
    configs=str(Path(__file__).parent / "configs"),
    description="open-ended segmentation/detection: a text query becomes per-anchor mask embeddings "
                "retrieved against dense CLIP + pixel features (or the training-free baseline); on an MLLM the model's own "
                "<MASK> tokens (UFO); COCOeval metrics",
    segment=segment,
    demo_tab=SEGMENTATION,
    backbones=("clip", "mllm"),
)

__all__ = ["Instance", "Segmenter", "UfoConfig", "UfoTask", "plugin", "segment"]
