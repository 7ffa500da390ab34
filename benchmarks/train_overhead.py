"""What `vlkit train` costs over a bare PyTorch loop: training images per second, side by side in one run.

Usage: python benchmarks/train_overhead.py [--model tiny-conv] [--batch 128] [--steps 40] [--images 4096]
       [--repeats 3]

The same model (the same initial weights), the same training data and batch size go through
1. `vlkit train plugin=retrieval` (Accelerate, per-item seeded RNGs, logging, the progress bar, a final
   checkpoint): seconds per step = the difference between a run of ``warmup + steps`` steps and one of
   ``warmup`` steps, so building the data, loading the model and the final evaluation cancel out
   (``train.eval_every`` is set past the run: the default validation at each epoch's end would fall inside
   the longer run only, and validation is not training throughput; the bare loops do not validate);
2. a bare loop over the plugin's own ``task.forward`` (its loss, vlkit's text encoding) with a plain
   DataLoader and AdamW: the engine's cost alone;
3. a bare loop with open_clip's own ``encode_image`` / ``encode_text`` and ``ClipLoss`` (the loop a user
   would write first), for context: it differs from 2 in the loss's positives and in that open_clip runs
   the text tower over all 77 positions.
Retrieval runs with ``retrieval.loss=contrastive`` and ``retrieval.positives=caption`` so its loss is
InfoNCE as in 3, and with ``optim.grad_clip=0`` (gradient clipping is part of a recipe, not of the engine;
the bare loops do not clip either). Target: vlkit train >= 0.95x the bare loop of 2. Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from vlkit.cli import resolve_config
from vlkit.engine.run import build, train

TARGET = 0.95


def overrides(args: argparse.Namespace, world: Path, run_dir: Path, steps: int) -> list[str]:
    return ["plugin=retrieval", f"model={args.model}", f"data.root={world}", f"data.limit_train={args.images}",
            f"train.batch_size={args.batch}", f"train.max_steps={steps}", "train.eval_every=1000000",
            "train.checkpoint_every=0", "train.progress=false", "data.limit_eval=64",
            "retrieval.loss=contrastive", "retrieval.positives=caption", "optim.grad_clip=0",
            f"run.dir={run_dir}"]


def engine_seconds_per_step(args: argparse.Namespace, world: Path, tmp: Path) -> float:
    wall = {}
    for steps in (args.warmup, args.warmup + args.steps):
        run_dir = Path(tempfile.mkdtemp(dir=tmp)) / f"run-{steps}"  # a fresh folder every round
        plugin, cfg = resolve_config(overrides(args, world, run_dir, steps))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own report
            train(cfg, plugin)
        wall[steps] = time.perf_counter() - t0
    return (wall[args.warmup + args.steps] - wall[args.warmup]) / args.steps


def bare_seconds_per_step(args: argparse.Namespace, world: Path, tmp: Path, open_clip_loop: bool) -> float:
    plugin, cfg = resolve_config(overrides(args, world, Path(tempfile.mkdtemp(dir=tmp)) / "bare",
                                           args.warmup + args.steps))
    set_seed(cfg.train.seed)
    backbone, data, task = build(cfg, plugin)
    task.train()
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = DataLoader(data.train, batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=data.collate)
    if open_clip_loop:
        from open_clip.loss import ClipLoss

        model, clip_loss = backbone.model, ClipLoss()

        def step_loss(batch):
            img = model.encode_image(batch["image"], normalize=True)
            txt = model.encode_text(batch["tokens"], normalize=True)
            return clip_loss(img, txt, model.logit_scale.exp())
    else:
        def step_loss(batch):
            return task(batch)["loss"]

    done, t0 = 0, 0.0
    while done < args.warmup + args.steps:
        for batch in loader:
            if done == args.warmup:
                t0 = time.perf_counter()
            loss = step_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == args.warmup + args.steps:
                break
    return (time.perf_counter() - t0) / args.steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-conv", help="a model option of configs/model")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--images", type=int, default=4096, help="training images of the generated world")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each contender's best round counts")
    args = ap.parse_args()
    from vlkit.data.shapes import generate_shapes

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        world = tmp / "world"
        generate_shapes(world, n_train=args.images, n_val=64, n_test=64, image_size=64, seed=0, n_czsl_per_pair=0,
                        progress=False, workers=1)
        print(f"model {args.model}, batch {args.batch}, {args.steps} timed steps after {args.warmup}, "
              f"torch threads {torch.get_num_threads()}")
        runs = {"vlkit train": lambda: engine_seconds_per_step(args, world, tmp),
                "bare loop, task.forward": lambda: bare_seconds_per_step(args, world, tmp, open_clip_loop=False),
                "bare loop, open_clip + ClipLoss": lambda: bare_seconds_per_step(args, world, tmp, True)}
        # round by round, so load drifts on a shared machine hit every contender alike; best of the rounds
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(fn())
        sec = {name: min(ts) for name, ts in times.items()}
    for name, s in sec.items():
        print(f"{name:32s} {args.batch / s:8.1f} images/s ({s * 1000:.0f} ms/step)")
    ratio = sec["bare loop, task.forward"] / sec["vlkit train"]
    context = sec["bare loop, open_clip + ClipLoss"] / sec["vlkit train"]
    print(f"vlkit train / bare loop (task.forward) = {ratio:.3f}x throughput (target >= {TARGET}): "
          + ("met" if ratio >= TARGET else "MISSED"))
    print("per round (ms/step): " + "; ".join(f"{n}: {', '.join(f'{t * 1000:.0f}' for t in ts)}"
                                             for n, ts in times.items()))
    print(f"vlkit train / bare open_clip loop = {context:.3f}x throughput (context)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
