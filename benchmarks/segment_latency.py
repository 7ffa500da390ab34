"""Per-image latency of ufo's ``segment()`` against the backbone's own ``encode_image``, side by side.

Usage: python benchmarks/segment_latency.py [--models vlkit-tiny-conv ViT-B-32] [--repeats 30] [--device cpu]
       [--threads N] [--top-k 10]
Random weights (latency does not depend on them). The image is a PIL image at the model's input size,
so resizing is not what is measured. Columns: encode_image on a ready tensor (the baseline); the parts
of segment(), dense_features and the head alone (``AnchoredHead.instances``: objectness of every anchor,
the ``top_k`` best decoded into masks, matrix NMS, as segment() runs it); segment() with the query embedding
cached (as ``Segmenter`` does for a query run on many images); segment() encoding the query text too.
Target (the ufo-fidelity issue): the head, decoding all ``top_k`` candidates (its worst case; segment()
decodes only those that can pass its threshold), within 1.5x encode_image. The whole segment() over
encode_image is printed beside it: it adds dense_features (about one encode_image) and the preprocessing.
Calls are interleaved round by round so a busy machine slows every column alike; the median is reported.
Exit status 1 when the target is missed.

``--mllm`` models (default vlkit-tiny-llava) get their own rows: UFO on an MLLM has no head, so segment()
(the two passes of ``MllmSegmenter``: every grid point's class, then the <MASK> tokens of the ``top_k``
best; threshold 0, so all ``top_k`` are decoded: the worst case) is set beside the backbone's own
``encode_image`` (one forward of the image prompt).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from vlkit.backbone import load_backbone
from vlkit_ufo.config import UfoConfig
from vlkit_ufo.data import ImageTransform
from vlkit_ufo.segment import build_decoder, encode_queries, segment

TARGET = 1.5


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def bench(model: str, repeats: int, device: str, top_k: int) -> dict[str, float]:
    torch.manual_seed(0)
    bb = load_backbone(model).to(device).eval()
    head = build_decoder(UfoConfig(), bb.embed_dim).to(device).eval()
    size = bb.image_size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    x = ImageTransform.for_backbone(bb)(image)[None].to(device)
    q = encode_queries(bb, ["red circle"])
    feats = bb.dense_features(x)
    fns = {
        "encode_image": lambda: bb.encode_image(x),
        "dense": lambda: bb.dense_features(x),
        "head": lambda: head.instances(q, feats, x, top_k=top_k, semantic=False),
        "segment_cached": lambda: segment(image, "red circle", bb, head, 0.5, query_emb=q, top_k=top_k),
        "segment": lambda: segment(image, "red circle", bb, head, 0.5, top_k=top_k),
    }
    return _median_ms(fns, repeats)


@torch.inference_mode()
def bench_mllm(model: str, repeats: int, device: str, top_k: int) -> dict[str, float]:
    from vlkit_ufo.mllm import MllmSegmenter, prepare_backbone

    torch.manual_seed(0)
    bb = load_backbone(model).to(device).eval()
    seg = MllmSegmenter(bb, prepare_backbone(bb), UfoConfig.mllm_grid)
    size = bb.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    x = ImageTransform.for_backbone(bb)(image)[None].to(device)
    return _median_ms({"encode_image": lambda: bb.encode_image(x),
                       "segment": lambda: segment(image, "red circle", bb, seg, 0.0, top_k=top_k)}, repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vlkit-tiny-conv", "ViT-B-32"])
    ap.add_argument("--mllm", nargs="*", default=["vlkit-tiny-llava"], help="MLLM backbones (rows of their own)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--top-k", type=int, default=UfoConfig.top_k,
                    help="candidates decoded into masks per query (ufo.top_k)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, median of {args.repeats} (ms/image)")
    print(f"{'model':16s} {'encode_image':>12s} {'dense':>7s} {'head':>7s} {'ratio':>6s} {'segment(cached q)':>18s} "
          f"{'ratio':>6s} {'segment':>8s} {'ratio':>6s}")
    missed = []
    for model in args.models:
        ms = bench(model, args.repeats, args.device, args.top_k)
        r_cached, r_full = ms["segment_cached"] / ms["encode_image"], ms["segment"] / ms["encode_image"]
        r_head = ms["head"] / ms["encode_image"]
        if r_head > TARGET:
            missed.append(model)
        print(f"{model:16s} {ms['encode_image']:12.2f} {ms['dense']:7.2f} {ms['head']:7.2f} {r_head:6.2f} "
              f"{ms['segment_cached']:18.2f} {r_cached:6.2f} {ms['segment']:8.2f} {r_full:6.2f}")
    for model in args.mllm:
        ms = bench_mllm(model, args.repeats, args.device, args.top_k)
        print(f"{model:16s} {ms['encode_image']:12.2f} {'-':>7s} {'-':>7s} {'-':>6s} {'-':>18s} {'-':>6s} "
              f"{ms['segment']:8.2f} {ms['segment'] / ms['encode_image']:6.2f}   (MLLM: its own <MASK> tokens)")
    print(f"target: head <= {TARGET}x encode_image: " + (
        f"MISSED by {', '.join(missed)}" if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
