"""The GPU check (run by benchmarks/gpu_check.sh, at most about 5 minutes on one GPU).

    python benchmarks/gpu_check.py [--device cuda] [--model ViT-B-32] [--precision bf16]

1. A few bf16 training steps of every first-party plugin through `vlkit train` (Accelerate): seconds per step
   and whether the loss stayed finite.
2. ViT-B-32 image embedding throughput (random weights): vlkit's Backbone.encode_image under the engine's
   autocast vs a plain open_clip loop, images per second side by side, rounds interleaved.
3. OPTIN scoring time of ViT-B-32's image tower on 64 calibration images.

``--device cpu --model vlkit-tiny-test --precision no`` runs the same code on a CPU with tiny sizes (what the
developers check it with when no GPU is lent). Exit status 1 when a training run fails or its loss is not finite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlkit.backbone import load_backbone
from vlkit.cli import resolve_config
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import train

PLUGIN_ARGS = {
    "retrieval": ["plugin=retrieval", "model=tiny-test"],
    "csp": ["plugin=csp", "model=tiny-test", "data=czsl"],
    "ufo": ["plugin=ufo", "model=tiny-test", "data.image_size=32"],
    "caption": ["plugin=caption", "model=tiny-llava-test", "caption.vision_from="],
}


def plugin_steps(world: Path, tmp: Path, precision: str, steps: int, cpu: bool) -> tuple[dict, bool]:
    rows, ok = {}, True
    for name, args in PLUGIN_ARGS.items():
        root = world / "czsl" if name == "csp" else world
        run = tmp / name
        cfg_args = [*args, f"data.root={root}", f"train.max_steps={steps}", "train.epochs=0", "train.batch_size=16",
                    "train.progress=false", "train.checkpoint_every=0", "train.best_metric=", "data.limit_eval=16",
                    f"train.mixed_precision={precision}", f"train.cpu={str(cpu).lower()}", f"run.dir={run}"]
        if name == "caption":
            cfg_args.append("caption.max_new_tokens=4")
        plugin, cfg = resolve_config(cfg_args)
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                train(cfg, plugin)
        except Exception as exc:  # reported, the others still run
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            ok = False
            continue
        log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        finite = all(math.isfinite(r["loss"]) for r in log)
        ok &= finite and len(log) == steps
        rows[name] = {"steps": len(log), "first_loss": round(log[0]["loss"], 4), "last_loss": round(log[-1]["loss"], 4),
                      "finite": finite, "seconds_with_setup_and_eval": round(time.perf_counter() - t0, 1)}
    return rows, ok


def _rate(fn, images: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


@torch.no_grad()
def embedding_throughput(model: str, device: torch.device, precision: str, batch: int, rounds: int) -> dict:
    """images/s of Backbone.encode_image vs open_clip's own encode_image (same weights, same autocast)."""
    import open_clip

    bb = load_backbone(model).to(device).eval()
    plain = open_clip.create_model(model) if model in open_clip.list_models() else bb.model
    plain.load_state_dict(bb.model.state_dict())
    plain = plain.to(device).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None
    images = torch.randn(batch, 3, bb.image_size, bb.image_size, device=device)
    cast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    sides = {"vlkit": lambda x: bb.encode_image(x), "plain open_clip": lambda x: plain.encode_image(x)}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    with cast():
        for fn in sides.values():
            fn(images)  # warm-up (kernels, allocator)
        for _ in range(rounds):
            for name, fn in sides.items():
                rates[name].append(_rate(fn, images, device))
    best = {k: max(v) for k, v in rates.items()}
    return {"images_per_s": {k: round(v, 1) for k, v in best.items()},
            "ratio_vlkit_over_plain": round(best["vlkit"] / best["plain open_clip"], 3)}


def optin_time(model: str, device: torch.device, n_calib: int) -> dict:
    from vlkit.compress.importance import optin_importance

    bb = load_backbone(model).to(device).eval()
    images = torch.randn(n_calib, 3, bb.image_size, bb.image_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    imp = optin_importance(bb.model, images, None, towers=("image",))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": round(time.perf_counter() - t0, 2), "heads_scored": sum(v.numel() for v in imp["heads"].values()),
            "neurons_scored": sum(v.numel() for v in imp["neurons"].values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calib", type=int, default=64)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"gpu_check: device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, precision {args.precision}")
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_shapes(world, n_train=128, n_val=16, n_test=16, image_size=32, seed=0, n_czsl_per_pair=4,
                        progress=False, workers=1)
        rows, ok = plugin_steps(world, Path(tmp), args.precision, args.steps, cpu=device.type == "cpu")
    print("1. training steps through vlkit train:")
    for name, row in rows.items():
        print(f"   {name:10s} {json.dumps(row)}")
    emb = embedding_throughput(args.model, device, args.precision, args.batch, args.rounds)
    print(f"2. {args.model} image embedding, batch {args.batch}, best of {args.rounds}: {json.dumps(emb)}")
    opt = optin_time(args.model, device, args.calib)
    print(f"3. OPTIN scoring of {args.model}'s image tower on {args.calib} images: {json.dumps(opt)}")
    print("gpu_check: " + ("PASS" if ok else "FAIL (a plugin's training failed or its loss was not finite)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
