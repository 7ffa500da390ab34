"""The one Accelerate trainer every plugin runs through: steps, schedule, checkpoints, resume, evaluation."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlkit.engine.checkpoint import TrainerState, load_checkpoint, save_checkpoint, save_rng
from vlkit.engine.optim import build_optimizer, build_scheduler
from vlkit.errors import VlkitError
from vlkit.io import atomic_write_json
from vlkit.plugins import DataBundle, evaluation_only_reason
from vlkit.progress import progress


class TrainingError(VlkitError, RuntimeError):
    """Training cannot go on (empty data, a non-finite loss); the last good checkpoint is kept."""


def make_accelerator(cfg: DictConfig, run_dir: Path | None = None) -> Accelerator:
    from accelerate.utils import DistributedDataParallelKwargs

    from vlkit.cache import backbone_kind

    tracker = None if cfg.train.tracker in ("", "none") else cfg.train.tracker
    # an MLLM has weights a task never reaches (the vision tower's final norm: LLaVA reads the hidden states
    # before it), which DDP refuses unless told to look for them
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] \
        if backbone_kind(str(cfg.model.name)) == "mllm" else []
    return Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        # Accelerate only forms a multi-process CPU (gloo) group when told cpu=True
        cpu=cfg.train.cpu or not torch.cuda.is_available(),
        log_with=tracker,
        project_dir=str(run_dir) if run_dir else None,
        # a seeded sampler whose order depends only on (seed, epoch): resume replays it exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )


def _check_dataset(dataset: Dataset | None, split: str) -> Dataset:
    if dataset is None or len(dataset) == 0:
        raise TrainingError(
            f"the {split} dataset is empty: check data.root / data.{split}_split and the annotation files "
            f"(data.limit_{'train' if split == 'train' else 'eval'}=0 uses everything)"
        )
    return dataset


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checks it after each step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains ``task`` (an nn.Module whose forward is the training step) on ``data`` with Accelerate."""

    def __init__(self, cfg: DictConfig, task: nn.Module, data: DataBundle, run_dir: Path,
                 accelerator: Accelerator | None = None) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.acc = accelerator or make_accelerator(cfg, self.run_dir)
        self.task = task
        self.state = TrainerState(plugin=cfg.plugin, model=cfg.model.name)
        self.log_path = self.run_dir / "train_log.jsonl"
        # one line per validation: step, training time so far (wall and CPU seconds) and the metrics
        self.eval_log_path = self.run_dir / "eval_log.jsonl"
        self._evaluated_at = -1
        self._clock = (time.perf_counter(), time.process_time())

    def _tick(self) -> None:
        """Add the time since the last tick to the state's training clocks (evaluation time excluded)."""
        now = (time.perf_counter(), time.process_time())
        self.state.wall_s += now[0] - self._clock[0]
        self.state.cpu_s += now[1] - self._clock[1]
        self._clock = now

    # ---- data ---------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        drop_last = shuffle and len(dataset) >= batch_size * self.acc.num_processes
        # a private generator: creating a loader iterator draws a seed from it, never from the global
        # RNG, so the global RNG (dropout, augmentation) replays exactly after a resume
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=self.data.collate, num_workers=self.cfg.data.num_workers,
                          generator=generator)

    # ---- training -----------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> TrainerState:
        cfg = self.cfg
        self._train_set = SeededItems(_check_dataset(self.data.train, "train"), cfg.train.seed)
        train_dl = self._loader(self._train_set, cfg.train.batch_size, shuffle=True)
        params = [p for p in self.task.parameters() if p.requires_grad]
        if not params:
            reason = evaluation_only_reason(self.task)
            if reason:  # e.g. hand-written prompts: nothing to learn, the run only evaluates
                self.acc.print(f"plugin {cfg.plugin!r}: {reason}; nothing to train, evaluating only")
                self.task = self.acc.prepare(self.task)
                return self.state
            raise TrainingError(f"plugin {cfg.plugin!r} built a task with no trainable parameters")
        optimizer = build_optimizer(cfg.optim, self.task)
        self.task, optimizer, train_dl = self.acc.prepare(self.task, optimizer, train_dl)
        steps_per_epoch = max(1, len(train_dl) // cfg.train.grad_accum)
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        scheduler = build_scheduler(cfg.optim, optimizer, total)
        if resume_from is not None:
            self.state = load_checkpoint(resume_from, self.acc.unwrap_model(self.task), optimizer,
                                         cfg.plugin, cfg.model.name, rank=self.acc.process_index)
            scheduler.load_state_dict(self.state.scheduler)
            self._truncate_log(self.log_path, self.state.step)
            self._truncate_log(self.eval_log_path, self.state.step)
            self.acc.print(f"resumed from {resume_from} at step {self.state.step}")
        if cfg.train.tracker not in ("", "none"):
            self.acc.init_trackers(cfg.plugin)
        with _StopFlag() as stop:
            self._loop(train_dl, optimizer, scheduler, total, steps_per_epoch, stop)
        if self._evaluated_at != self.state.step:  # the final step's model is evaluated (and saved) too
            self._maybe_eval(optimizer, scheduler)
        return self.state

    def _loop(self, train_dl, optimizer, scheduler, total: int, steps_per_epoch: int, stop: _StopFlag) -> None:
        cfg, st = self.cfg, self.state
        bar = tqdm(total=total, initial=st.step, disable=not (cfg.train.progress and self.acc.is_main_process),
                   desc=f"train {cfg.plugin}", dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        self._clock = (t0, time.process_time())
        while st.step < total:
            train_dl.set_epoch(st.epoch)
            set_dataset_epoch(self._train_set, st.epoch)
            loader = self.acc.skip_first_batches(train_dl, st.batch_in_epoch) if st.batch_in_epoch else train_dl
            for batch in loader:
                loss, logs = self._micro_step(batch, optimizer)
                st.batch_in_epoch += 1
                seen += _batch_len(batch) * self.acc.num_processes
                if not self.acc.sync_gradients:
                    continue
                scheduler.step()
                st.step += 1
                stop_now = self._reduce_and_log(loss, logs, optimizer, stop, seen / (time.perf_counter() - t0), bar)
                if self._after_step(optimizer, scheduler, stop_now) or st.step >= total:
                    break
            else:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                if not cfg.train.eval_every:
                    self._maybe_eval(optimizer, scheduler)
                continue
            if stop.raised or st.step >= total:
                break
        bar.close()
        if stop.raised:
            raise KeyboardInterrupt("training interrupted; the last checkpoint was saved")

    def _micro_step(self, batch, optimizer) -> tuple[torch.Tensor, dict[str, float]]:
        with self.acc.accumulate(self.task):
            out = self.task(batch)
            loss = out["loss"]
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.cfg.optim.grad_clip > 0:
                self.acc.clip_grad_norm_(self.task.parameters(), self.cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        logs = {k: float(v.detach()) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}
        return loss.detach(), logs

    def _reduce_and_log(self, loss, logs, optimizer, stop: _StopFlag, rate: float, bar) -> bool:
        # one all-reduce per step carries the loss and the stop flag, so every process stops together
        packed = torch.tensor([float(loss), float(stop.raised)], device=self.acc.device)
        packed = self.acc.reduce(packed, reduction="sum")
        mean_loss = float(packed[0]) / self.acc.num_processes
        if not math.isfinite(mean_loss):
            last = self.run_dir / "checkpoints" / "last"
            kept = (f"the last good checkpoint {last} is kept" if last.is_dir()
                    else "no checkpoint had been written yet")
            raise TrainingError(
                f"the loss became {mean_loss} at step {self.state.step}; stopped without saving ({kept}). "
                f"Lower optim.lr or check the data."
            )
        lr = optimizer.param_groups[0]["lr"]
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": mean_loss, "lr": lr, **logs}
        if self.acc.is_main_process:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if self.cfg.train.tracker not in ("", "none"):
            self.acc.log(record, step=self.state.step)
        stop.raised = float(packed[1]) > 0
        return stop.raised

    def _after_step(self, optimizer, scheduler, stop_now: bool) -> bool:
        cfg, st = self.cfg, self.state
        if cfg.train.eval_every and st.step % cfg.train.eval_every == 0:
            self._maybe_eval(optimizer, scheduler)
        elif stop_now or (cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0):
            self.save(optimizer, scheduler, "last")
        return stop_now

    def _maybe_eval(self, optimizer, scheduler) -> None:
        """Evaluate on val (when there is one), then save 'last' and, if it improved, 'best'."""
        improved = False
        self._evaluated_at = self.state.step
        self._tick()
        if self.data.val is not None and self.cfg.train.best_metric:
            metrics = self.evaluate("val")
            self._clock = (time.perf_counter(), time.process_time())  # evaluation is not training time
            if self.acc.is_main_process:
                record = {"step": self.state.step, "wall_s": round(self.state.wall_s, 2),
                          "cpu_s": round(self.state.cpu_s, 2), **metrics}
                with open(self.eval_log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            value = metrics.get(self.cfg.train.best_metric)
            if value is None:
                raise TrainingError(
                    f"train.best_metric={self.cfg.train.best_metric!r} is not among the val metrics: "
                    f"{', '.join(sorted(metrics))}"
                )
            better = (lambda a, b: a > b) if self.cfg.train.best_mode == "max" else (lambda a, b: a < b)
            if self.state.best_value is None or better(value, self.state.best_value):
                self.state.best_value, self.state.best_step, improved = float(value), self.state.step, True
            self.acc.print(f"step {self.state.step} val: " + _fmt(metrics))
        self.save(optimizer, scheduler, "last")
        if improved:
            self.save(None, scheduler, "best")
        self._clock = (time.perf_counter(), time.process_time())  # evaluating and saving are not training

    def save(self, optimizer, scheduler, name: str) -> None:
        path = self.run_dir / "checkpoints" / name
        self._tick()
        self.state.scheduler = scheduler.state_dict() if scheduler is not None else {}
        save_rng(path, self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_checkpoint(path, self.acc.unwrap_model(self.task), optimizer, self.state,
                            world=self.acc.num_processes)
        self.acc.wait_for_everyone()

    def _truncate_log(self, path: Path, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        if not self.acc.is_main_process or not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """Run eval_step over a split on every process, gather without duplicates, compute metrics."""
        dataset = _check_dataset(getattr(self.data, split), split)
        loader = self.acc.prepare(self._loader(dataset, self.cfg.train.eval_batch_size, shuffle=False))
        model = self.acc.unwrap_model(self.task)
        was_training = model.training
        model.eval()
        outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        with torch.no_grad():
            for batch in progress(loader, f"eval {split}", self.cfg.train.progress and self.acc.is_main_process,
                                  leave=False):
                for key, value in self.acc.gather_for_metrics(model.eval_step(batch)).items():
                    outputs[key].append(value.cpu())
        model.train(was_training)
        merged = {k: torch.cat(v) for k, v in outputs.items()}
        return model.compute_metrics(merged, split)


class SeededItems(Dataset):
    """The training set, each batch made under global RNGs (torch, numpy, random) seeded by (seed, epoch, the
    batch's indices) and restored afterwards: random augmentations (a random crop, dropped words) then depend
    only on which items of which epoch are made together, never on how far the loader has prefetched, so a
    resume from the middle of an epoch replays them exactly, and the training step's own RNG stream is left
    untouched. The DataLoader fetches a batch at once (``__getitems__``): seeding once per batch instead of per
    item saves ~0.1 ms an item (13 ms a step at batch 128). A single item (``dataset[i]``) is seeded alone."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_dataset_epoch(self.dataset, epoch)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        state = np.random.SeedSequence([self.seed, self.epoch, len(indices), *map(int, indices)]).generate_state(2)
        saved = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator alone, which fork_rng restores: torch.manual_seed would also seed
                # accelerators (leaking past the fork) and, without CUDA initialised, queue a lazy call
                # that formats a stack trace each time (1 ms a call)
                torch.default_generator.manual_seed(int(state[0]))
                random.seed(int(state[1]))
                np.random.seed(int(state[1]))
                return [self.dataset[i] for i in indices]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def set_dataset_epoch(dataset: Any, epoch: int) -> None:
    """Tell a training dataset (or the one a Subset wraps) which epoch starts, when it wants to know: a
    dataset that draws per item from a generator keyed by (seed, epoch, index) is then independent of the
    loader's prefetching and of skipped batches, so a resume mid-epoch replays it exactly."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


def _batch_len(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_len(batch[0])
    return 1


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(path, metrics)
