"""Retrieval accuracy kept after one-shot pruning, without and with recovery by distillation, side by side.

Usage: python benchmarks/prune_recovery.py [--teacher cached:vlkit-tiny-shapes] [--flops 0.5]
       [--methods optin magnitude] [--steps 156 [312 ...]] [--task-weight W] [--lr 5e-4] [--n-calib 16]
       [--seeds 0 1 2] [--train "KEY=VALUE ..."] [--out runs/prune-recovery] [--json results.json]
       [--control] [--plot kept_vs_steps.png] [--train-steps 1560]

For each method: `vlkit prune model=TEACHER method=M flops=F` (both towers, each to F of its own FLOPs;
with --prune budget=model both together to F of their sum, split as vlkit prune chooses), the test split's
R@1 both ways of the pruned model, then the same prune with `recover_steps=STEPS` (distillation from the
teacher through the retrieval plugin's training on the shapes world, lr --lr, batch 128) and its test R@1.
The dense teacher's R@1 is measured in the same run. "kept" = mean of both directions' R@1 over the teacher's.
--control runs the same recovery on the unpruned teacher (flops=1): what the steps alone do to it (the dense
model is not fully trained, so "kept" can pass 100%). With several --steps, the first recovery runs as above
and every further one starts from the same pruned folder (`vlkit prune model=PRUNED method=magnitude flops=1
reconstruct=0 recover_teacher=TEACHER recover_steps=N`: nothing more is removed, the recovery is the same
run), and --plot draws kept against steps, marking 10% of --train-steps (the teacher's training steps).
With several --seeds each row is the mean +- std over one run per seed (the seed draws OPTIN's calibration
sample and the recovery's data order). The default 156 steps are 10% of the 1560 steps that trained the
shipped backbone (10 epochs, batch 128).
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
    ap.add_argument("--steps", type=int, nargs="+", default=[156],
                    help="recovery steps; several: one recovery each from the same prune (and --plot)")
    ap.add_argument("--task-weight", type=float, default=None,
                    help="recover_task_weight (default: vlkit prune's own, 0.2)")
    ap.add_argument("--blocks", type=float, default=0.0, help="weight of layer-wise (block output) distillation")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--out", default="runs/prune-recovery")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="seeds of the calibration sample and the recovery run: one run each, mean +- std")
    ap.add_argument("--prune", default="", help="further `vlkit prune` keys, e.g. \"min_neurons=32 reconstruct=0\"")
    ap.add_argument("--train", default="", help="further `vlkit train` overrides of the recovery (recover_train=)")
    ap.add_argument("--json", default="")
    ap.add_argument("--control", action="store_true",
                    help="also run each recovery on the unpruned teacher itself (what the same steps do to it)")
    ap.add_argument("--plot", default="", help="a PNG of kept R@1 against recovery steps (mean +- std over seeds)")
    ap.add_argument("--train-steps", type=int, default=1560,
                    help="the steps that trained the teacher (the shipped backbone: 10 epochs of batch 128)")
    args = ap.parse_args()
    out = Path(args.out)
    dense_r1 = test_r1(args.teacher)
    runs: dict[str, list[dict]] = {"dense": [{"r1": dense_r1}]}
    recover = [f"recover_lr={args.lr}", f"recover_blocks={args.blocks}", f"recover_train={args.train}"]
    if args.task_weight is not None:
        recover.append(f"recover_task_weight={args.task_weight}")
    for seed in args.seeds:
        folder = out / f"seed{seed}" if len(args.seeds) > 1 else out
        for method in args.methods:
            base = ["prune", f"model={args.teacher}", f"method={method}", f"flops={args.flops}",
                    f"n_calib={args.n_calib}", f"seed={seed}", *shlex.split(args.prune)]
            t0 = time.perf_counter()
            if vlkit_main([*base, f"out={folder / method}"]) != 0:
                return 1
            pruned = test_r1(str(folder / method))
            runs.setdefault(method, []).append({"seed": seed, "r1": pruned, "prune_s": time.perf_counter() - t0})
            again = ["prune", f"model={folder / method}", "method=magnitude", "flops=1", "reconstruct=0",
                     f"recover_teacher={args.teacher}", f"seed={seed}"]  # the same pruned start, nothing removed
            for k, steps in enumerate(args.steps):
                name = method + "-recovered" + (f"-{steps}" if len(args.steps) > 1 else "")
                t1 = time.perf_counter()
                if vlkit_main([*(base if k == 0 else again), f"out={folder / name}", f"recover_steps={steps}",
                               *recover]) != 0:
                    return 1
                t2 = time.perf_counter()
                row = {"seed": seed, "steps": steps, "r1": test_r1(str(folder / name)), "recover_s": t2 - t1}
                runs.setdefault(_recovered(method, steps, args.steps), []).append(row)
        for steps in args.steps if args.control else ():
            name = f"dense-recipe-{steps}"
            if vlkit_main(["prune", f"model={args.teacher}", "method=magnitude", "flops=1", "reconstruct=0",
                           f"seed={seed}", f"out={folder / name}", f"recover_steps={steps}", *recover]) != 0:
                return 1
            runs.setdefault(f"dense+recipe@{steps}", []).append({"seed": seed, "steps": steps,
                                                                  "r1": test_r1(str(folder / name))})
    dense = sum(dense_r1) / 2
    print(f"\nFLOPs {args.flops}, recovery {'/'.join(map(str, args.steps))} steps "
          f"(task weight {_or_default(args.task_weight)}, lr {args.lr}, "
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
    if args.plot:
        plot_steps(summary, args.methods, args.steps, args.flops, args.plot, args.train_steps)
    return 0


def _or_default(value: float | None) -> str:
    return "default" if value is None else str(value)


def _recovered(method: str, steps: int, all_steps: list[int]) -> str:
    return method + "+recovery" + (f"@{steps}" if len(all_steps) > 1 else "")


def plot_steps(summary: dict, methods: list[str], steps: list[int], flops: float, path: str,
               train_steps: int = 1560) -> None:
    """Kept R@1 (mean +- std over seeds) against recovery steps, from the one-shot prune (0 steps) on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in methods:
        xs = [0, *steps]
        rows = [summary[method], *(summary[_recovered(method, n, steps)] for n in steps)]
        mean = [r["kept"][0] for r in rows]
        std = [r["kept"][1] for r in rows]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3,
                    label=f"{method}: mean +- std of {rows[0]['n']} seed(s)")
    control = [(n, summary[f"dense+recipe@{n}"]["kept"]) for n in steps if f"dense+recipe@{n}" in summary]
    if control:
        ax.errorbar([n for n, _ in control], [k[0] for _, k in control], yerr=[k[1] for _, k in control],
                    marker="s", ls="none", color="grey", capsize=3, label="the unpruned model, same steps")
    ax.axhline(98, color="grey", ls="--", lw=1, label="target 98%")
    ax.axvline(train_steps / 10, color="grey", ls=":", lw=1, label="10% of the teacher's training steps")
    ax.set_xlabel(f"recovery steps (the teacher trained {train_steps})")
    ax.set_ylabel("mean R@1 kept of the dense model (%)")
    ax.set_title(f"pruned to {flops:g} of the FLOPs, recovered by distillation")
    lo = min(min(summary[m]["kept"][0] for m in methods) - 5, 90)
    hi = max(100.0, *(r["kept"][0] + r["kept"][1] for r in summary.values())) + 0.5
    ax.set_ylim(lo, hi)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _ms(x: torch.Tensor) -> list[float]:
    return [float(x.mean()), float(x.std()) if len(x) > 1 else 0.0]


def _fmt(x: torch.Tensor) -> str:
    mean, std = _ms(x)
    return f"{mean:5.1f} +- {std:3.1f}" if len(x) > 1 else f"{mean:5.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
