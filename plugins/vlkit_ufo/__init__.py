"""vlkit ufo plugin: open-ended instance segmentation and detection by embedding retrieval (UFO-style)."""

from __future__ import annotations

from vlkit.plugins import Plugin

from .config import UfoConfig
from .data import build_data
from .segment import Instance, Segmenter, demo, segment
from .task import UfoTask, build_task

plugin = Plugin(
    name="ufo",
    config=UfoConfig,
    build_data=build_data,
    build_task=build_task,
    description="open-ended segmentation/detection: a text query becomes per-anchor mask embeddings "
                "retrieved against dense CLIP + pixel features (or the training-free baseline); on an MLLM the model's own "
                "<MASK> tokens (UFO); COCOeval metrics",
    demo=demo,
    backbones=("clip", "mllm"),
)

__all__ = ["Instance", "Segmenter", "UfoConfig", "UfoTask", "demo", "plugin", "segment"]
