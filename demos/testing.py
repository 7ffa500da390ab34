"""A seconds-small demo for tests: a tiny random backbone, a tiny shapes world and its index, served locally."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class TinyDemo:
    backbone_dir: Path
    world: Path
    index: Path
    examples: list[tuple[str, str]]

    @property
    def images(self) -> Path:
        return self.world / "images" / "test"

    @property
    def captions(self) -> Path:
        return self.world / "annotations" / "captions_test.json"


def make_tiny_demo(root: Path, n_images: int = 8, seed: int = 0, backbone: str | Path | None = None) -> TinyDemo:
    """Save ``vlkit-tiny-test`` (random, seeded; or use the saved ``backbone`` folder), write a shapes world
    of ``n_images`` test images and index them with their captions, all under ``root``."""
    from vlkit.backbone import load_backbone
    from vlkit.cli.index import IndexArgs
    from vlkit.data.shapes import generate_shapes
    from vlkit.demos.resources import shapes_examples
    from vlkit.index.sharded import build_index

    torch.manual_seed(seed)
    bb_dir = Path(backbone) if backbone else load_backbone("vlkit-tiny-test").save(root / "backbone")
    world = root / "world"
    generate_shapes(world, n_train=0, n_val=0, n_test=n_images, n_czsl_per_pair=0, workers=1, progress=False)
    demo = TinyDemo(bb_dir, world, root / "index", shapes_examples(world))
    build_index(IndexArgs(images=str(demo.images), out=str(demo.index), model=str(bb_dir),
                          captions=str(demo.captions), workers=0, progress=False))
    return demo


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: Any) -> str:
    """Launch ``app`` on a free 127.0.0.1 port without blocking; returns its URL (close with app.close())."""
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"
