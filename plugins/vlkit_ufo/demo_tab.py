"""The ufo plugin's tab of `vlkit demo`: segment an uploaded image by a free-text query (``Plugin.demo_tab``).

``vlkit demo ufo=RUN`` loads a trained run; without it the head shipped with vlkit runs when the demo's backbone
is the shipped one, else the training-free baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlkit.errors import VlkitError

SEGMENT_MAX_SIDE = 1024  # masks are computed at the image's size, so its area bounds the work


@dataclass
class SegmentTool:
    """What the tab calls: ``run(image, query, threshold) -> instances`` and their overlay."""

    backbone: Any
    run: Callable[[Image.Image, str, float], list[Any]]
    overlay: Callable[[Image.Image, Sequence[Any]], Image.Image]
    mode: str
    threshold: float = 0.5  # the slider's start: a trained run's F1-best score threshold on val


def segment_tool(segmenter_or_backbone: Any) -> SegmentTool:
    """A ``Segmenter`` (a trained run) or a bare backbone (the training-free baseline) as the tab's tool."""
    from .mllm import MllmSegmenter
    from .overlay import overlay
    from .segment import Segmenter, segment

    if isinstance(segmenter_or_backbone, Segmenter):
        seg = segmenter_or_backbone
        mode = ("training-free (settings of the ufo run)" if seg.head is None else
                "the MLLM's own <MASK> tokens (UFO)" if isinstance(seg.head, MllmSegmenter) else "trained ufo head")
        return SegmentTool(seg.backbone, lambda im, q, t: seg(im, q, t), overlay, mode, round(seg.threshold, 2))
    bb = segmenter_or_backbone
    return SegmentTool(bb, lambda im, q, t: segment(im, q, bb, None, t), overlay,
                       "training-free (MaskCLIP dense features against the query's text embedding)")


class SegmentationTab:
    """``vlkit.plugins.DemoTab`` of the ufo plugin."""

    title = "Segmentation"
    key = "ufo"
    help = ("a `vlkit train plugin=ufo` run folder for a trained segmentation head; empty: the head shipped with "
            "vlkit when the backbone is the shipped one, else training-free")

    def load(self, backbone: Any, run: str) -> SegmentTool:
        from .segment import Segmenter

        if run:
            return segment_tool(Segmenter.from_run(run))
        try:
            return segment_tool(Segmenter.shipped(backbone=backbone))
        except VlkitError:  # not the shipped backbone: the training-free baseline on it
            return segment_tool(backbone)

    def describe(self, tool: SegmentTool) -> str:
        return f"**Segmentation:** {tool.mode}"

    def build(self, tool: SegmentTool, page: Any) -> None:
        import gradio as gr
        import torch

        @torch.no_grad()
        def run(image: str | None, query: str, threshold: float) -> tuple[Image.Image, list[list], str]:
            pil, note = page.open_image(image, SEGMENT_MAX_SIDE)
            query = page.query(query)
            instances = tool.run(pil, query, float(threshold))
            rows = [[i + 1, round(inst.score, 4), [round(v, 1) for v in inst.box], int(inst.mask.sum())]
                    for i, inst in enumerate(instances)]
            status = f"{len(instances)} instance(s) of “{query}” scoring above {float(threshold):.2f}{note}"
            return tool.overlay(pil, instances), rows, status

        with gr.Row():
            with gr.Column(scale=1):
                image = page.image_input(label="Image", elem_id="segment-image", height=300)
                query = gr.Textbox(label="What to find", placeholder="a red circle", elem_id="segment-query")
                threshold = gr.Slider(0.0, 1.0, value=tool.threshold, step=0.01, label="Score threshold",
                                      elem_id="segment-threshold")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column(scale=1):
                status = gr.Markdown("Upload an image (or pick an example) and say what to find.", label="Status",
                                     elem_id="segment-status")
                overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False,
                                   elem_id="segment-overlay", height=420)
                table = gr.Dataframe(headers=["#", "score", "box (x1, y1, x2, y2)", "area (px)"],
                                     label="Instances", elem_id="segment-instances", interactive=False)
        if page.examples:
            gr.Examples([list(e) for e in page.examples], inputs=[image, query], label="Examples")
        fn = page.guarded(run, lambda: (None, []))
        outputs = [overlay, table, status]
        button.click(fn, [image, query, threshold], outputs, api_name="segment")
        query.submit(fn, [image, query, threshold], outputs, **page.private)

        def rerun(image: str | None, query: str, threshold: float) -> tuple:
            # moving the slider before there is anything to segment is not an error worth a warning
            return fn(image, query, threshold) if image and (query or "").strip() else (gr.skip(),) * 3

        threshold.release(rerun, [image, query, threshold], outputs, **page.private)


SEGMENTATION = SegmentationTab()
