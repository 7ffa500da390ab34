"""Retrieval accuracy kept after one-shot pruning, without and with recovery by distillation, side by side.

Usage: python benchmarks/prune_recovery.py [--teacher cached:vlkit-tiny-shapes] [--flops 0.5]
       [--methods optin magnitude] [--steps 156] [--task-weight 0] [--lr 5e-4] [--n-calib 16]
       [--seeds 0 1 2] [--train "KEY=VALUE ..."] [--out runs/prune-recovery] [--json results.json]

For each method: `vlkit prune model=TEACHER method=M flops=F` (both towers), the test split's R@1 both ways
of the pruned model, then the same prune with `recover_steps=STEPS` (distillation from the teacher through
the retrieval plugin's training on the shapes world, lr --lr, batch 128) and its test R@1. The dense
teacher's R@1 is measured in the same run. "kept" = mean of both directions' R@1 over the teacher's.
With several --seeds each row is the mean +- std over one run per seed (the seed draws OPTIN's calibration
sample and the recovery's data order). The default 156 steps are 10% of the 1560 steps that trained the shipped backbone (10 epochs, batch 128).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from vlkit.cli import main as vlkit_main
from vlkit.cli import resolve_config
from vlkit.engine.run import evaluate


def test_r1(model: str) -> tuple[float, float]:
    plugin, cfg = resolve_config(["plugin=retrieval", f"model.name={model}", "split=test", "train.progress=false"],
                                 name="eval")
    m = evaluate(cfg, plugin)["test"]
    return float(m["t2i_R@1"]), float(m["i2t_R@1"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="cached:vlkit-tiny-shapes")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=["optin", "magnitude"])
    ap.add_argument("--steps", type=int, default=156)
    ap.add_argument("--task-weight", type=float, default=0.0)
    ap.add_argument("--blocks", type=float, default=0.0, help="weight of layer-wise (block output) distillation")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--out", default="runs/prune-recovery")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="seeds of the calibration sample and the recovery run: one run each, mean +- std")
    ap.add_argument("--prune", default="", help="further `vlkit prune` keys, e.g. \"min_neurons=32 reconstruct=0\"")
    ap.add_argument("--train", default="", help="further `vlkit train` overrides of the recovery (recover_train=)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = Path(args.out)
    dense_r1 = test_r1(args.teacher)
    runs: dict[str, list[dict]] = {"dense": [{"r1": dense_r1}]}
    for seed in args.seeds:
        folder = out / f"seed{seed}" if len(args.seeds) > 1 else out
        for method in args.methods:
            base = ["prune", f"model={args.teacher}", f"method={method}", f"flops={args.flops}",
                    f"n_calib={args.n_calib}", f"seed={seed}", *shlex.split(args.prune)]
            t0 = time.perf_counter()
            if vlkit_main([*base, f"out={folder / method}"]) != 0:
                return 1
            pruned = test_r1(str(folder / method))
            t1 = time.perf_counter()
            if vlkit_main([*base, f"out={folder / (method + '-recovered')}", f"recover_steps={args.steps}",
                           f"recover_lr={args.lr}", f"recover_task_weight={args.task_weight}",
                           f"recover_blocks={args.blocks}", f"recover_train={args.train}"]) != 0:
                return 1
            t2 = time.perf_counter()
            recovered = test_r1(str(folder / (method + "-recovered")))
            runs.setdefault(method, []).append({"seed": seed, "r1": pruned, "prune_s": t1 - t0})
            runs.setdefault(method + "+recovery", []).append({"seed": seed, "r1": recovered, "recover_s": t2 - t1})
    dense = sum(dense_r1) / 2
    print(f"\nFLOPs {args.flops}, recovery {args.steps} steps (task weight {args.task_weight}, lr {args.lr}, "
          f"seeds {' '.join(map(str, args.seeds))}); test R@1 t2i / i2t and mean kept of the dense {dense:.1f}, "
          f"mean +- std over seeds")
    summary = {}
    for name, rows in runs.items():
        t2i, i2t = (torch.tensor([r["r1"][d] for r in rows], dtype=torch.float64) for d in (0, 1))
        kept = 100 * (t2i + i2t) / 2 / dense
        summary[name] = {"t2i": _ms(t2i), "i2t": _ms(i2t), "kept": _ms(kept), "n": len(rows)}
        print(f"  {name:22s} {_fmt(t2i)} / {_fmt(i2t)}   kept {_fmt(kept)}%   "
              f"(per seed: {', '.join(f'{float(k):.1f}' for k in kept)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=2))
    return 0


def _ms(x: torch.Tensor) -> list[float]:
    return [float(x.mean()), float(x.std()) if len(x) > 1 else 0.0]


def _fmt(x: torch.Tensor) -> str:
    mean, std = _ms(x)
    return f"{mean:5.1f} +- {std:3.1f}" if len(x) > 1 else f"{mean:5.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
