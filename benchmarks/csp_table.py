"""The CSP fidelity protocol: a learning rate chosen per method on val, several seeds, mean +- std tables.

Usage: python benchmarks/csp_table.py --out runs/csp-table [--split-name compositional-split-colour]
       [--lrs 1e-3 5e-3 2e-2] [--seeds 0 1 2] [--methods clip coop csp] [--jobs 2] [--probe-steps 300]
       [-- key=value ...]

For CoOp and CSP every learning rate of --lrs is trained with the first seed (`vlkit train plugin=csp`);
the one with the best closed-world validation AUC (best checkpoint over the epochs) is the method's
learning rate, recorded in <out>/<method>/lr_choice.json; the other seeds then train at that rate. Every
run is scored on test from its best-on-val checkpoint (`vlkit eval ... checkpoint=RUN split=test`).
CLIP's hand-written prompts learn nothing and are deterministic: one evaluation (std 0).

The ceiling: a linear probe (multinomial logistic regression) of the attribute and of the object on the
frozen image embeddings of the training images, scored on every test image. No prompt over the same
frozen features can recognise attributes much better than this probe.

Writes <out>/results.json (every run's metrics, the choices, the probe) and <out>/table.md. Runs are
subprocesses of one thread each, --jobs at a time; arguments after `--` go to every vlkit command
(e.g. model.name=... data.root=... train.epochs=...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

METHODS = ("clip", "coop", "csp")
COLUMNS = (("best_seen", "closed S"), ("best_unseen", "closed U"), ("best_hm", "closed HM"), ("AUC", "closed AUC"),
           ("open_best_hm", "open HM"), ("open_AUC", "open AUC"), ("attr_acc", "attr acc"), ("obj_acc", "obj acc"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs, results.json and table.md")
    p.add_argument("--split-name", default="auto", help="csp.split_name (auto: the colour split on the shapes world)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-3, 2e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--probe-steps", type=int, default=300, help="full-batch Adam steps of the linear probe (0: none)")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def _vlkit(argv: list[str], log: Path) -> None:
    """One vlkit command in a one-thread subprocess; its output goes to ``log``; fails loudly."""
    # the installed console script (`python -m vlkit` run from a source checkout would import the checkout's
    # vlkit/ instead of the installed package; PYTHONSAFEPATH keeps the fallback from doing so)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    script = Path(sys.executable).with_name("vlkit")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vlkit"]
    with open(log, "w") as fh:
        done = subprocess.run([*cmd, *argv], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"`vlkit {' '.join(argv)}` failed (exit {done.returncode}); see {log}")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def train_and_test(out: Path, method: str, lr: float, seed: int, common: list[str]) -> dict[str, Any]:
    """Train one run (unless its test metrics exist already: the protocol resumes), then score test from
    its best-on-val checkpoint. Returns {val_AUC (best), best_step, test: {...}}."""
    run = out / method / f"lr{lr:g}-seed{seed}"
    keys = [f"csp.method={method}", *common]
    if not (run / "eval_test.json").is_file():
        if not (run / "metrics.json").is_file():
            if run.exists():  # an interrupted run: start it again from scratch (runs are minutes long)
                import shutil

                shutil.rmtree(run)
            run.parent.mkdir(parents=True, exist_ok=True)
            _vlkit(["train", "plugin=csp", *keys, f"optim.lr={lr}", f"train.seed={seed}", f"run.dir={run}"],
                   run.parent / f"{run.name}.train.log")
        _vlkit(["eval", "plugin=csp", *keys, f"checkpoint={run}", f"run.dir={run}", "split=test"],
               run.parent / f"{run.name}.eval.log")
    best = _read(run / "metrics.json")["best"]
    return {"lr": lr, "seed": seed, "run": str(run), "val_AUC": best["AUC"], "best_step": best["step"],
            "test": _read(run / "eval_test.json")["test"]}


def clip_baseline(out: Path, common: list[str]) -> dict[str, Any]:
    run = out / "clip"
    if not (run / "eval_test.json").is_file():
        run.mkdir(parents=True, exist_ok=True)
        _vlkit(["eval", "plugin=csp", "csp.method=clip", *common, f"run.dir={run}", "split=test"], out / "clip.eval.log")
    return {"seed": None, "run": str(run), "test": _read(run / "eval_test.json")["test"]}


def choose_lr(grid: list[dict[str, Any]]) -> float:
    """The learning rate whose run has the highest best-on-val closed-world AUC (ties: the smaller rate)."""
    return max(sorted(grid, key=lambda r: r["lr"]), key=lambda r: r["val_AUC"])["lr"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method, every table column as (mean, std) over its runs' test metrics."""
    return {m: {k: mean_std([r["test"][k] for r in rs]) for k, _ in COLUMNS} for m, rs in runs.items() if rs}


def table(summary: dict[str, dict[str, tuple[float, float]]], n: dict[str, int]) -> str:
    head = "| method (runs) | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for method, cols in summary.items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (cols[k] for k, _ in COLUMNS)]
        lines.append(f"| {method.upper() if method != 'coop' else 'CoOp'} ({n[method]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def linear_probe(common: list[str], steps: int) -> dict[str, float]:
    """Attribute and object accuracy of logistic regression on frozen image embeddings (train -> test)."""
    import torch

    from vlkit.cli import resolve_config
    from vlkit.engine.run import load_model

    plugin, cfg = resolve_config(["plugin=csp", *common])
    backbone = load_model(cfg.model).eval()
    data = plugin.build_data(cfg, backbone)

    @torch.no_grad()
    def embed(split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, attrs, objs = [], [], []
        for i in range(0, len(split), 256):
            items = [split[j] for j in range(i, min(len(split), i + 256))]
            feats.append(backbone.encode_image(torch.stack([it["image"] for it in items])))
            attrs += [it["attr"] for it in items]
            objs += [it["obj"] for it in items]
        return torch.cat(feats), torch.tensor(attrs), torch.tensor(objs)

    x_tr, a_tr, o_tr = embed(data.train)
    x_te, a_te, o_te = embed(data.test)
    out = {}
    for name, y_tr, y_te, k in (("attr", a_tr, a_te, len(data.info["attrs"])), ("obj", o_tr, o_te, len(data.info["objs"]))):
        torch.manual_seed(0)
        head = torch.nn.Linear(x_tr.shape[1], k)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x_tr), y_tr).backward()
            opt.step()
        with torch.no_grad():
            out[f"probe_{name}_acc"] = float((head(x_te).argmax(1) == y_te).float().mean())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"csp.split_name={args.split_name}", *args.extra]
    learned = [m for m in args.methods if m != "clip"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    choices: dict[str, Any] = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        clip = pool.submit(clip_baseline, out, common) if "clip" in args.methods else None
        grid = {m: [pool.submit(train_and_test, out, m, lr, args.seeds[0], common) for lr in args.lrs] for m in learned}
        later = {}
        for m in learned:
            results = [f.result() for f in grid[m]]
            lr = choose_lr(results)
            choices[m] = {"chosen_lr": lr, "by": "best closed-world val AUC over epochs, seed " + str(args.seeds[0]),
                          "grid": {f"{r['lr']:g}": r["val_AUC"] for r in results}}
            (out / m / "lr_choice.json").write_text(json.dumps(choices[m], indent=2))
            runs[m].append(next(r for r in results if r["lr"] == lr))
            later[m] = [pool.submit(train_and_test, out, m, lr, s, common) for s in args.seeds[1:]]
        for m in learned:
            runs[m] += [f.result() for f in later[m]]
        if clip is not None:
            runs["clip"].append(clip.result())
    probe = linear_probe(common, args.probe_steps) if args.probe_steps else {}
    summary = summarize(runs)
    n = {m: len(rs) for m, rs in runs.items()}
    text = table(summary, n)
    if probe:
        text += (f"\n\nLinear probe on the frozen image embeddings (train -> test): attribute "
                 f"{probe['probe_attr_acc']:.3f}, object {probe['probe_obj_acc']:.3f}.")
    (out / "table.md").write_text(text + "\n")
    result = {"split_name": args.split_name, "extra": args.extra, "choices": choices, "runs": runs,
              "summary": {m: {k: list(v) for k, v in cols.items()} for m, cols in summary.items()}, "probe": probe}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(text)
    return result


if __name__ == "__main__":
    main()
