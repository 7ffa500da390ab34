"""Images per second of Retriever indexing JPEG files against a plain one-image-at-a-time loop.

    python benchmarks/embed.py --n 1000 --model ViT-B-32

Both sides use the same backbone (random weights are fine for speed) and the same files; the plain loop
opens, preprocesses and encodes one image at a time with open_clip, the way a first script would.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlkit.backbone import load_backbone
from vlkit.retriever import Retriever


def make_jpegs(folder: Path, n: int, size: int = 320) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size * 4 // 3, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


@torch.no_grad()
def plain_loop(bb, paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        x = bb.preprocess(Image.open(p).convert("RGB")).unsqueeze(0)
        bb.model.encode_image(x)
    return time.perf_counter() - start


def retriever_run(bb, folder: Path, batch_size: int, workers: int) -> float:
    r = Retriever(bb, batch_size=batch_size, num_workers=workers, progress=False)
    start = time.perf_counter()
    r.add_images(folder)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        plain_loop(bb, paths[:4])  # warm up both paths
        t_ret = retriever_run(bb, Path(tmp), args.batch_size, args.workers)
        t_plain = plain_loop(bb, paths)
    print(f"model {args.model}, {args.n} JPEG files, torch threads {torch.get_num_threads()}")
    print(f"{'':28s}{'seconds':>10s}{'images/s':>10s}")
    print(f"{'plain loop (1 at a time)':28s}{t_plain:10.1f}{args.n / t_plain:10.1f}")
    print(f"{'Retriever.add_images':28s}{t_ret:10.1f}{args.n / t_ret:10.1f}")
    print(f"speed-up: {t_plain / t_ret:.2f}x")


if __name__ == "__main__":
    main()
