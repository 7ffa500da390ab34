"""Retrieval accuracy kept by one-shot pruning without retraining: R@1 both ways against FLOPs, per method.

Usage: python benchmarks/prune_accuracy.py --backbone DIR --data SHAPES_ROOT [--split test] [--calib-split train]
       [--flops 0.8 0.6 0.4] [--methods optin magnitude random] [--n-calib 64] [--seed 0] [--reconstruct 256] [--threads 2]
       [--budget tower|model] [--plot prune_accuracy.png] [--json results.json]

DIR is a saved backbone trained for retrieval (e.g. vlkit/backbone/weights/vlkit-tiny-shapes, the shipped default); SHAPES_ROOT a
shapes world (or any COCO-captions layout: images/<split>/ and annotations/captions_<split>.json). Both
towers are pruned to each FLOP fraction; R@1 text->image and image->text is measured on all images and
captions of --split (a caption shared by several images matches all of them, as in the retrieval
plugin). OPTIN is calibrated on --n-calib images and captions of --calib-split, never the evaluated split.
Each method's importances are computed once and reused for every FLOP level (they do not depend on the
budget), which is what vlkit.compress.prune_backbone would compute at each level, at a third of the cost.
The random baseline is one draw (--seed); it varies from seed to seed. With --reconstruct N (default 256, as
`vlkit prune`) each pruned model is also measured after the least-squares refit of its pruned projections on N
calibration images and captions (rows METHOD+refit; vlkit.compress.reconstruct). With --budget model each
FLOP level is a fraction of both towers' summed FLOPs, split between the towers as `vlkit prune budget=model`
splits it (vlkit.compress.choose_split, on 256 held-out train pairs; the refit rows use the refit's choice,
the plain rows the choice without a refit).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlkit.backbone import load_backbone
from vlkit.compress import (
    choose_split,
    count_flops,
    flop_model,
    magnitude_importance,
    optin_importance,
    random_importance,
    select_under_budget,
)
from vlkit.compress.calibration import Calibration, calibration_batch
from vlkit.compress.materialize import materialize
from vlkit.compress.reconstruct import reconstruct, snapshot_blocks
from vlkit.data.coco import CocoCaptions
from vlkit.metrics.retrieval import Positives, recall_at_k
from vlkit_retrieval.task import caption_positives

TOWERS = ("image", "text")
COLORS = {"optin": "#1f77b4", "magnitude": "#ff7f0e", "random": "#2ca02c",  # the same in every plot
          "optin+refit": "#0b3d66", "magnitude+refit": "#a34f00", "random+refit": "#145214"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="a saved vlkit backbone folder")
    p.add_argument("--data", required=True, help="shapes world root (images/<split>, annotations/captions_<split>.json)")
    p.add_argument("--split", default="test")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--flops", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--methods", nargs="+", default=["optin", "magnitude", "random"],
                   choices=["optin", "magnitude", "random"])
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reconstruct", type=int, default=256,
                   help="calibration images/captions of the least-squares refit, measured beside each plain prune "
                        "as METHOD+refit (vlkit prune's default; 0 = plain prunes only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="evaluation batch size")
    p.add_argument("--budget", choices=("tower", "model"), default="tower",
                   help="each tower keeps the FLOP fraction, or both towers together (split as vlkit prune does)")
    p.add_argument("--plot", default="prune_accuracy.png")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


class EvalSet:
    """All images (preprocessed) and captions of one split, with the positives of every caption."""

    def __init__(self, root: Path, split: str, preprocess, tokenize) -> None:
        ds = CocoCaptions(root / "images" / split, root / "annotations" / f"captions_{split}.json", preprocess)
        self.images = torch.stack([ds.load(i) for i in range(len(ds))])
        captions, self.positives = caption_positives(ds.image_captions, len(ds))
        self.tokens = tokenize(captions)

    @torch.inference_mode()
    def recall(self, model: torch.nn.Module, batch: int) -> dict[str, float]:
        model.eval()
        img = torch.cat([model.encode_image(x, normalize=True) for x in self.images.split(batch)])
        txt = torch.cat([model.encode_text(t, normalize=True) for t in self.tokens.split(batch)])
        return recall_at_k(txt @ img.T, self.positives, ks=(1, 5))


def importances(model: torch.nn.Module, method: str, calib: Calibration, seed: int):
    if method == "optin":
        return optin_importance(model, calib.images, calib.texts, towers=TOWERS, seed=seed)
    if method == "magnitude":
        return magnitude_importance(model, TOWERS)
    return random_importance(model, TOWERS, seed=seed)


def prune_levels(model: torch.nn.Module, method: str, levels: list[float], calib: Calibration, seed: int,
                 refit_on: Calibration | None = None, split_on: Calibration | None = None):
    """(level, pruned model, seconds for the importances, the pruned model refit by least squares on
    ``refit_on`` or None) for every level. With ``split_on`` (image-caption pairs) each level is a budget over
    both towers, split by ``choose_split`` (separately for the plain and the refit model: the refit changes
    which split keeps most)."""
    t0 = time.perf_counter()
    imp = importances(model, method, calib, seed)
    seconds = time.perf_counter() - t0
    fm = flop_model(model, TOWERS)
    targets = snapshot_blocks(model, TOWERS) if refit_on is not None else None  # once: every level refits to it
    refit_inputs = {"image": refit_on.images, "text": refit_on.texts} if refit_on is not None else {}
    kw = {"split": "proportional" if method == "random" else "best"}

    def select(level: float, refit: bool):
        fractions: float | dict[str, float] = level
        if split_on is not None:
            pairs = {"image": split_on.images, "text": split_on.texts}
            fractions, _ = choose_split(model, imp, fm, level, pairs, targets if refit else None, refit_inputs,
                                        1e-2, **kw)
        return materialize(model, *select_under_budget(imp, fm, fractions, **kw)[:2])

    for level in levels:
        pruned = select(level, refit=False)
        refit = None
        if refit_on is not None:
            refit = select(level, refit=True) if split_on is not None else copy.deepcopy(pruned)
            reconstruct(refit, targets, refit_inputs)
        yield level, pruned, seconds, refit


def chance(pos: Positives) -> dict[str, float]:
    """Expected R@1 of a random ranking: mean fraction of positives per query, both ways (percent)."""
    return {"t2i_R@1": 100 * float(pos.images_per_text().float().mean()) / pos.n_images,
            "i2t_R@1": 100 * float(pos.texts_per_image().float().mean()) / pos.n_texts}


def print_table(dense: dict[str, float], rows: list[dict[str, Any]], base: dict[str, float]) -> None:
    ref = (dense["t2i_R@1"] + dense["i2t_R@1"]) / 2
    print(f"\n{'method':16s} {'FLOPs':>6s} {'image':>6s} {'text':>6s} {'both':>6s} {'t2i R@1':>8s} "
          f"{'i2t R@1':>8s} {'retained':>9s}")
    print(f"{'dense':16s} {1.0:6.2f} {1.0:6.3f} {1.0:6.3f} {1.0:6.3f} {dense['t2i_R@1']:8.2f} "
          f"{dense['i2t_R@1']:8.2f} {100.0:8.1f}%")
    for r in rows:
        kept = (r["t2i_R@1"] + r["i2t_R@1"]) / 2 / ref * 100 if ref else float("nan")
        ratio = r["ratio"]
        print(f"{r['method']:16s} {r['flops']:6.2f} {ratio['image']:6.3f} {ratio['text']:6.3f} {ratio['model']:6.3f} "
              f"{r['t2i_R@1']:8.2f} {r['i2t_R@1']:8.2f} {kept:8.1f}%")
    print(f"{'chance':16s} {'':6s} {'':6s} {'':6s} {'':6s} {base['t2i_R@1']:8.2f} {base['i2t_R@1']:8.2f}")
    print("(image/text/both: counted FLOPs after / before per tower and for one image plus one caption; retained: "
          "mean R@1 as a share of the dense one)")


def plot(dense: dict[str, float], rows: list[dict[str, Any]], base: dict[str, float], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, name in zip(axes, ("t2i_R@1", "i2t_R@1"), ("text -> image R@1", "image -> text R@1")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["flops"], r[key]) for r in rows if r["method"] == method)
            ax.plot([1.0] + [p[0] for p in pts][::-1], [dense[key]] + [p[1] for p in pts][::-1], marker="o",
                    linestyle="--" if method.endswith("+refit") else "-",
                    color=COLORS[method], label=method)
        ax.axhline(dense[key], color="black", linestyle="--", linewidth=1, label="dense")
        ax.axhline(base[key], color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("FLOPs kept (fraction of dense)")
        ax.set_ylabel("%")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone)
    bb.model.eval()
    root = Path(args.data)
    data = EvalSet(root, args.split, bb.preprocess, bb.tokenize)
    calib = calibration_batch(bb, str(root), args.n_calib, split=args.calib_split, seed=args.seed)
    print(f"{bb.name} from {args.backbone}: {len(data.images)} {args.split} images, {data.positives.n_texts} "
          f"captions; calibration {calib.source['n_images']} images / {calib.source['n_texts']} captions "
          f"of {args.calib_split}", flush=True)
    dense = data.recall(bb.model, args.batch)
    refit_on = None
    if args.reconstruct:
        refit_on = calibration_batch(bb, str(root), args.reconstruct, split=args.calib_split, seed=args.seed)
    split_on = None
    if args.budget == "model":  # the held-out pairs vlkit prune budget=model draws
        from vlkit.cli.compress import SPLIT_SEED_OFFSET

        split_on = calibration_batch(bb, str(root), 256, split=args.calib_split, seed=args.seed + SPLIT_SEED_OFFSET)
    rows = []
    probe = (calib.images[:1], calib.texts[:1])
    before = count_flops(bb.model, *probe)
    for method in args.methods:
        for level, pruned, seconds, refit in prune_levels(bb.model, method, args.flops, calib, args.seed,
                                                          refit_on, split_on):
            for name, model in ((method, pruned), (method + "+refit", refit)):
                if model is None:
                    continue
                metrics = data.recall(model, args.batch)
                after = count_flops(model, *probe)
                ratio = {t: after[t] / before[t] for t in TOWERS}
                ratio["model"] = sum(after.values()) / sum(before.values())
                rows.append({"method": name, "flops": level, "ratio": ratio, "importance_s": seconds, **metrics})
                print(f"  {name} @ {level:.2f}: t2i R@1 {metrics['t2i_R@1']:.2f}, i2t R@1 "
                      f"{metrics['i2t_R@1']:.2f} (importances {seconds:.0f} s)", flush=True)
    base = chance(data.positives)
    print_table(dense, rows, base)
    plot(dense, rows, base, Path(args.plot), f"{bb.name} ({Path(args.backbone).name}), {args.split} split, "
                                             f"no retraining, FLOP budget per {args.budget}")
    print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "chance": base, "rows": rows,
                                               "backbone": args.backbone, "data": args.data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
