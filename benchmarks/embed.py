"""Images per second of Retriever indexing JPEG files against a plain one-image-at-a-time loop.

    python benchmarks/embed.py --n 1000 --model ViT-B-32

Every side uses the same backbone (random weights are fine for speed) and the same files; the plain loop
opens, preprocesses and encodes one image at a time with open_clip, the way a first script would. The
files are split into rounds and each round runs every side on its files in turn, so a busy machine slows
every side alike. Rows: the Retriever in fp32 as it runs by default (one decoding+encoding process per core,
one thread each), in fp32 with ``encoders=1`` (one encoding process on every core, decoding workers beside
it: the default before 0.7), and with ``int8=True`` (int8 linear layers on the CPU; the cosine of its
embeddings to fp32 is printed). Target: fp32 at least 2x the plain loop.
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
from vlkit.index.retriever import Retriever, default_encoders, default_workers


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


def retriever_run(retriever: Retriever, paths: list[Path]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    _, emb = retriever.embed_images(paths)
    return time.perf_counter() - start, emb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1, help="decoding workers (-1 = the Retriever's default)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.model).eval()
    workers = default_workers() if args.workers < 0 else args.workers
    sides = {"fp32": Retriever(bb, batch_size=args.batch_size, num_workers=workers, progress=False),
             "fp32-1": Retriever(bb, batch_size=args.batch_size, num_workers=workers, progress=False, encoders=1),
             "int8": Retriever(bb, batch_size=args.batch_size, num_workers=workers, progress=False, int8=True)}
    times = {"plain": 0.0, **{k: 0.0 for k in sides}}
    embs: dict[str, list[torch.Tensor]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n)
        plain_loop(bb, paths[:4])  # warm up
        for r in range(args.rounds):
            part = paths[r::args.rounds]
            for name, retriever in sides.items():
                t, emb = retriever_run(retriever, part)
                times[name] += t
                embs[name].append(emb)
            times["plain"] += plain_loop(bb, part)
    cos = (torch.cat(embs["int8"]) * torch.cat(embs["fp32"])).sum(-1)
    same = (torch.cat(embs["fp32-1"]) - torch.cat(embs["fp32"])).abs().max()
    print(f"model {args.model}, {args.n} JPEG files in {args.rounds} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}, {default_encoders()} encoding process(es) by default, {workers} decoding "
          f"worker(s) beside one encoder, batch {args.batch_size}")
    print(f"{'':46s}{'seconds':>9s}{'images/s':>10s}{'speed-up':>10s}")
    labels = {"plain": "plain loop (1 at a time, fp32)", "fp32": "Retriever.embed_images (fp32, default)",
              "fp32-1": "Retriever.embed_images (fp32, encoders=1)", "int8": "Retriever.embed_images (int8=True)"}
    for name, label in labels.items():
        print(f"{label:46s}{times[name]:9.1f}{args.n / times[name]:10.1f}{times['plain'] / times[name]:9.2f}x")
    print(f"int8 vs fp32 embeddings: cosine min {cos.min():.4f}, mean {cos.mean():.4f}; fp32 default vs "
          f"encoders=1: max |difference| {same:.2e}")


if __name__ == "__main__":
    main()
