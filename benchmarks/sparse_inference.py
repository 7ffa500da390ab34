"""Does unstructured sparsity pay on this CPU? The image tower's linear layers, dense vs sparse, side by side.

Usage: python benchmarks/sparse_inference.py [--models vlkit-tiny-conv ViT-B-32] [--sparsity 0.8 0.9]
       [--batches 1 32] [--layouts csr bsr16 bsr32] [--repeats 20] [--threads N]

For each model (random init: latency does not depend on the values, only on the zeros' count and place),
the image tower's weights are zeroed by layer-wise magnitude (`vlkit.compress.apply_sparsity`, made
permanent), then its linear layers that `vlkit.compress.sparse_inference.to_sparse_inference` would swap run
on inputs of their real shape (batch x tokens rows) as the dense layer (F.linear on the zero-filled weight) and
as each sparse layout: CSR, and BSR with 16 x 16 / 32 x 32 blocks. BSR of an unstructured pattern keeps any
block holding one nonzero (its fill is printed); ``--block-sparse`` instead zeroes whole blocks (the blocks of
smallest L2 norm, the same share) for the BSR rows, the pattern BSR kernels are made for. Printed: summed median milliseconds over the
layers, dense / sparse (> 1 = the sparse path is faster), the worst absolute difference from the dense
output, and the whole `encode_image` with the layers swapped. Calls are interleaved round by round.
Target (issue 18): >= 1.3x at 80% and 90%, batch 1 and 32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vlkit.backbone import load_backbone
from vlkit.compress import apply_sparsity, make_permanent
from vlkit.compress.sparse_inference import SparseLinear, to_sparse_inference

TARGET = 1.3


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def block_prune(w: torch.Tensor, block: int, sparsity: float) -> torch.Tensor:
    """``w`` with the ``sparsity`` share of its ``block`` x ``block`` blocks of least L2 norm set to zero."""
    o, i = w.shape
    blocks = w.reshape(o // block, block, i // block, block)
    norms = blocks.pow(2).sum((1, 3))
    k = int(round(sparsity * norms.numel()))
    drop = norms.flatten().argsort()[:k]
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    keep[drop] = False
    return (blocks * keep.reshape(norms.shape)[:, None, :, None]).reshape(o, i)


def layout_of(name: str) -> tuple[str, int]:
    return ("csr", 16) if name == "csr" else ("bsr", int(name[3:]))


@torch.inference_mode()
def bench(model: str, sparsity: float, batch: int, layouts: list[str], repeats: int,
          block_sparse: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    bb = load_backbone(model).eval()
    apply_sparsity(bb.model, sparsity, scope="layer", towers=("image",))
    make_permanent(bb.model)
    probe = bb.model
    names = to_sparse_inference(probe, min_sparsity=sparsity - 0.01, prefix="visual.", layout="csr")
    tokens = (bb.image_size // int(bb.config["vision_cfg"]["patch_size"])) ** 2 + 1
    layers = [probe.get_submodule(n) for n in names]
    xs = [torch.randn(batch * tokens, m.in_features) for m in layers]
    dense_w = [m.dense_weight() for m in layers]
    fns = {"dense": lambda: [F.linear(x, w, m.bias) for x, w, m in zip(xs, dense_w, layers)]}
    out: dict[str, float] = {"layers": len(layers)}
    for lay in layouts:
        kind, block = layout_of(lay)
        weights = [block_prune(w, block, sparsity) if kind == "bsr" and block_sparse else w for w in dense_w]
        sparse = [SparseLinear(w, m.bias, kind, block) for w, m in zip(weights, layers)]
        fns[lay] = lambda sparse=sparse: [s(x) for s, x in zip(sparse, xs)]
        got = fns[lay]()
        want = [F.linear(x, w, m.bias) for x, w, m in zip(xs, weights, layers)]
        out[f"{lay}_err"] = max(float((a - b).abs().max()) for a, b in zip(got, want))
        if kind == "bsr":
            out[f"{lay}_fill"] = sum(s.weight_sparse.values().numel() for s in sparse) / sum(w.numel() for w in dense_w)
    ms = median_ms(fns, repeats)
    out.update({f"{k}_ms": v for k, v in ms.items()})
    # the whole image tower: dense weights (with zeros) vs the CSR-swapped tower
    dense_bb = load_backbone(model).eval()
    torch.manual_seed(0)
    dense_bb.model.load_state_dict({k: v for k, v in bb.model.state_dict().items() if "weight_sparse" not in k},
                                   strict=False)
    for name, m in zip(names, dense_w):
        dense_bb.model.get_submodule(name).weight.copy_(m)
    images = torch.randn(batch, 3, bb.image_size, bb.image_size)
    tower = median_ms({"dense": lambda: dense_bb.encode_image(images), "csr": lambda: bb.encode_image(images)}, repeats)
    out["tower_dense_ms"], out["tower_csr_ms"] = tower["dense"], tower["csr"]
    out["tower_err"] = float((dense_bb.encode_image(images) - bb.encode_image(images)).abs().max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vlkit-tiny-conv", "ViT-B-32"])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.8, 0.9])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--layouts", nargs="+", default=["csr", "bsr16", "bsr32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--block-sparse", action="store_true", help="BSR rows on weights zeroed in whole blocks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}; "
          f"speed-up = dense ms / sparse ms over the image tower's swapped linears")
    best = 0.0
    for model in args.models:
        for sp in args.sparsity:
            for b in args.batches:
                r = bench(model, sp, b, args.layouts, args.repeats, args.block_sparse)
                cells = []
                for lay in args.layouts:
                    ratio = r["dense_ms"] / r[f"{lay}_ms"]
                    best = max(best, ratio) if lay == "csr" else best
                    fill = f" fill {r[f'{lay}_fill']:.2f}" if f"{lay}_fill" in r else ""
                    cells.append(f"{lay} {r[f'{lay}_ms']:7.2f} ms {ratio:5.2f}x (err {r[f'{lay}_err']:.1e}{fill})")
                print(f"{model:15s} sparsity {sp:.1f} batch {b:3d}: {int(r['layers'])} layers, dense "
                      f"{r['dense_ms']:7.2f} ms | " + " | ".join(cells)
                      + f" || tower dense {r['tower_dense_ms']:.2f} ms, csr {r['tower_csr_ms']:.2f} ms "
                        f"({r['tower_dense_ms'] / r['tower_csr_ms']:.2f}x, err {r['tower_err']:.1e})")
    if "csr" in args.layouts:
        print(f"target >= {TARGET}x: best CSR ratio {best:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
