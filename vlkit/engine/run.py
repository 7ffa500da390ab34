"""The main job's straight line: config -> backbone -> data -> task -> Trainer.fit -> evaluate -> run folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from omegaconf import DictConfig

from vlkit.backbone import Backbone, load_backbone
from vlkit.config import ConfigError, to_yaml
from vlkit.engine.checkpoint import (
    CheckpointError,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    read_state,
)
from vlkit.engine.trainer import Trainer, make_accelerator, write_metrics
from vlkit.io import atomic_write_text
from vlkit.plugins import Plugin, check_backbone

# Model names that mean "a named trained backbone": shipped inside vlkit, or exported into vlkit's cache.
CACHED_PREFIX = "cached:"


def load_model(model_cfg: DictConfig) -> Backbone:
    name = str(model_cfg.name)
    if name.startswith(CACHED_PREFIX):
        from vlkit.cache import provide_backbone

        return load_backbone(provide_backbone(name[len(CACHED_PREFIX):]))
    return load_backbone(name, pretrained=model_cfg.pretrained)


def run_dir_for(cfg: DictConfig) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path("runs") / f"{cfg.plugin}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume_point(cfg: DictConfig, run_dir: Path) -> Path | None:
    value = str(cfg.resume or "").strip()
    if value.lower() in ("", "false", "none", "0"):
        if (run_dir / "checkpoints" / "last").exists():
            raise CheckpointError(
                f"{run_dir} already holds a training run; pass resume=true to continue it, or choose "
                f"another run.dir (nothing was overwritten)"
            )
        return None
    if value.lower() in ("true", "1", "yes"):
        return find_checkpoint(run_dir, "last")
    return find_checkpoint(value, "last")


LOGS = ("train_log.jsonl", "eval_log.jsonl")


def _set_aside_old_logs(run_dir: Path, say=print) -> list[Path]:
    """A fresh run in a folder whose earlier run left logs but no checkpoint (killed before its first one)
    starts its own logs; the old ones are kept as ``<name>.prev-<time>.jsonl``, never appended to."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in LOGS:
        old = run_dir / name
        if old.is_file():
            new = old.with_name(f"{old.stem}.prev-{stamp}{old.suffix}")
            os.replace(old, new)
            moved.append(new)
    if moved:
        say(f"{run_dir} held logs of an earlier run without a checkpoint: kept as {', '.join(p.name for p in moved)}")
    return moved


def build(cfg: DictConfig, plugin: Plugin):
    """Backbone, data and task for a config (seeded, so two builds are identical)."""
    set_seed(cfg.train.seed)
    backbone = load_model(cfg.model)
    check_backbone(plugin, backbone)
    # again: a random-init backbone drew from the RNG; the task and data must not depend on how it was loaded
    set_seed(cfg.train.seed)
    data = plugin.build_data(cfg, backbone)
    task = plugin.build_task(cfg, backbone, data)
    return backbone, data, task


def check_run_dir(run_dir: Path) -> None:
    """A run folder that cannot be written fails now, before any model or data is built."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={str(run_dir)!r} is an existing file, not a folder: choose another run.dir")
    ancestor = run_dir
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={str(run_dir)!r} cannot be created or written ({str(ancestor)!r} is not a "
                          f"writable folder): choose another run.dir")


def train(cfg: DictConfig, plugin: Plugin) -> dict[str, Any]:
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs=0 with train.max_steps=0 trains nothing: set one of them above 0 "
                          "(`vlkit eval` evaluates without training)")
    run_dir = run_dir_for(cfg)
    check_run_dir(run_dir)
    resume = _resume_point(cfg, run_dir)
    if resume is not None:  # refuse another plugin's or model's checkpoint before anything is built or written
        state = read_state(resume)
        check_compatible(state, None, cfg.plugin, cfg.model.name, resume)
    acc = make_accelerator(cfg, run_dir)
    with acc.main_process_first():  # one process generates data
        backbone, data, task = build(cfg, plugin)
    if acc.is_main_process and resume is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _set_aside_old_logs(run_dir, acc.print)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    acc.print(f"run folder: {run_dir}")
    trainer = Trainer(cfg, task, data, run_dir, acc)
    trainer.fit(resume)
    if acc.is_main_process and resume is not None:  # the checkpoint was accepted: record the config now
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    metrics = _final_eval(trainer, data)
    if acc.is_main_process:
        task = acc.unwrap_model(trainer.task)
        if plugin.report:
            metrics.update(plugin.report(cfg, task, run_dir, metrics) or {})
        if plugin.after_fit:
            metrics.update(plugin.after_fit(cfg, task, run_dir, metrics, backbone) or {})
        write_metrics(run_dir / "metrics.json", metrics)
        plot_training_log(run_dir / "train_log.jsonl", run_dir / "loss.png")
        acc.print(json.dumps(metrics, indent=2, default=str)[:4000])
    acc.wait_for_everyone()
    acc.end_training()  # closes trackers (and the process group): nothing collective after this
    return metrics


def _final_eval(trainer: Trainer, data) -> dict[str, Any]:
    """Evaluate the final model on val and test (and the best checkpoint's step is recorded)."""
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        if getattr(data, split) is not None:
            metrics[split] = trainer.evaluate(split)
    metrics["step"] = trainer.state.step
    if trainer.state.best_step >= 0:
        metrics["best"] = {"step": trainer.state.best_step, trainer.cfg.train.best_metric: trainer.state.best_value}
    return metrics


def evaluate(cfg: DictConfig, plugin: Plugin) -> dict[str, Any]:
    """`vlkit eval`: load a run's best (else last) checkpoint, or none, and evaluate one split."""
    acc = make_accelerator(cfg)
    with acc.main_process_first():
        backbone, data, task = build(cfg, plugin)
    task.to(acc.device)
    if cfg.checkpoint:
        path = find_checkpoint(cfg.checkpoint, prefer="best")
        load_checkpoint(path, task, None, cfg.plugin, cfg.model.name, restore_rng=False)
        acc.print(f"loaded checkpoint {path}")
    out_dir = Path(cfg.run.dir) if cfg.run.dir else None
    trainer = Trainer(cfg, task, data, out_dir or Path("."), acc)
    metrics = {cfg.split: trainer.evaluate(cfg.split)}
    if acc.is_main_process:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)  # a report hook may write beside eval_<split>.json
            if plugin.report:
                metrics.update(plugin.report(cfg, task, out_dir, metrics) or {})
            write_metrics(out_dir / f"eval_{cfg.split}.json", metrics)
        print(json.dumps(metrics, indent=2, default=str)[:4000])
    return metrics


def plot_training_log(log_path: Path, out_png: Path) -> None:
    """Loss (and learning rate) against steps, for people who would rather look than read."""
    if not log_path.is_file():
        return
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="gray", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="gray")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
