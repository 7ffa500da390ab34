"""`vlkit segment`: the ufo plugin's command (entry-point group ``vlkit.commands``; nothing heavy is imported
until it runs)."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.cli.common import Command, kv_help
from vlkit.config import parse_kv
from vlkit.errors import VlkitError


@dataclass
class SegmentArgs:
    image: str = ""
    query: str = ""
    # a ufo run folder (or its checkpoints/best|last folder); empty: the head shipped with vlkit, on the
    # shipped backbone
    checkpoint: str = ""
    out: str = "overlay.png"
    # instances scoring above it are kept; < 0: the head's F1-best score threshold on val (0.5 training-free)
    threshold: float = -1.0


def _segment(args: list[str]) -> int:
    opts = parse_kv(args, SegmentArgs)
    if not opts.image or not opts.query.strip():
        raise VlkitError("vlkit segment needs image=PATH and a non-empty query=TEXT (checkpoint=RUN_DIR is optional: "
                         "without it the head shipped with vlkit runs on the shipped backbone)")
    from vlkit_ufo.segment import segment_to_file

    segment_to_file(opts.image, opts.query, opts.checkpoint, out=opts.out,
                    threshold=opts.threshold if opts.threshold >= 0 else None)
    return 0


SEGMENT = Command(_segment, "segment a free-text query in an image: vlkit segment image=X query=\"red circle\" "
                            "[checkpoint=RUN]", lambda a: kv_help("segment", SegmentArgs))
