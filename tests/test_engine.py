"""The Accelerate engine: training, exact resume, crash safety, bad input, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlkit.cli import resolve_config
from vlkit.engine.checkpoint import CheckpointError
from vlkit.engine.run import train
from vlkit.engine.trainer import TrainingError
from vlkit.errors import VlkitError

BASE = ["plugin=toy", "model=tiny-test", "train.epochs=3", "train.batch_size=16", "train.eval_batch_size=8",
        "train.checkpoint_every=4", "train.progress=false", "optim.lr=0.2", "optim.warmup_steps=2"]


def _run(tmp_path, name, *extra):
    plugin, cfg = resolve_config([*BASE, f"run.dir={tmp_path / name}", *extra])
    return train(cfg, plugin)


def _log(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]


def _weights(tmp_path, name, ckpt="last"):
    return load_file(str(tmp_path / name / "checkpoints" / ckpt / "task.safetensors"))


def test_loss_falls_and_run_folder_is_complete(tmp_path, toy_plugin):
    metrics = _run(tmp_path, "a")
    log = _log(tmp_path, "a")
    assert len(log) == 18 and [r["step"] for r in log] == list(range(1, 19))
    assert sum(r["loss"] for r in log[-3:]) < 0.2 * sum(r["loss"] for r in log[:3])
    run = tmp_path / "a"
    for f in ("config.yaml", "metrics.json", "loss.png", "checkpoints/last/task.safetensors"):
        assert (run / f).exists(), f
    assert metrics["val"]["n"] == 37 and metrics["val"]["n_unique"] == 37
    assert json.loads((run / "metrics.json").read_text())["val"]["mse"] == pytest.approx(metrics["val"]["mse"])


def _assert_same_run(tmp_path, a, b):
    la, lb = _log(tmp_path, a), _log(tmp_path, b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # exactly, data order and dropout included
    wa, wb = _weights(tmp_path, a), _weights(tmp_path, b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, toy_plugin):
    _run(tmp_path, "full")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", "toy.die_at_step=7")
    state = json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == 7  # saved on the signal, not only on the every-4-steps schedule
    _run(tmp_path, "cut", "resume=true")
    _assert_same_run(tmp_path, "full", "cut")


def test_hard_crash_resumes_from_last_checkpoint(tmp_path, toy_plugin):
    _run(tmp_path, "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "crash", "toy.crash_at_step=11")
    assert len(_log(tmp_path, "crash")) == 10  # steps 9 and 10 logged after the step-8 checkpoint
    _run(tmp_path, "crash", "resume=true")
    _assert_same_run(tmp_path, "full", "crash")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, toy_plugin):
    with pytest.raises(TrainingError, match="loss became nan.*the last good checkpoint .* is kept"):
        _run(tmp_path, "nan", "toy.nan_at_step=6")
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):  # NaN before any checkpoint
        _run(tmp_path, "nan-early", "toy.nan_at_step=2")
    state = json.loads((tmp_path / "nan/checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(v.float()).all() for v in _weights(tmp_path, "nan").values())


def test_empty_dataset_is_a_clear_error(tmp_path, toy_plugin):
    with pytest.raises(TrainingError, match="train dataset is empty"):
        _run(tmp_path, "empty", "toy.n_train=0")


def test_existing_run_needs_resume_and_checks_model(tmp_path, toy_plugin):
    _run(tmp_path, "r", "train.epochs=1")
    with pytest.raises(CheckpointError, match="resume=true"):
        _run(tmp_path, "r", "train.epochs=1")
    with pytest.raises(CheckpointError, match="trained on model 'vlkit-tiny-test'"):
        _run(tmp_path, "r", "train.epochs=2", "resume=true", "model.name=vlkit-tiny")
    with pytest.raises(CheckpointError, match="does not fit this task"):
        _run(tmp_path, "r", "train.epochs=2", "resume=true", "toy.dim=5")


def test_best_checkpoint_tracks_val_metric(tmp_path, toy_plugin):
    metrics = _run(tmp_path, "best", "train.best_metric=mse", "train.best_mode=min")
    assert metrics["best"]["step"] > 0
    assert (tmp_path / "best/checkpoints/best/task.safetensors").is_file()
    log_steps = {r["step"] for r in _log(tmp_path, "best")}
    assert metrics["best"]["step"] in log_steps


def test_a_refused_resume_leaves_the_run_config_untouched(tmp_path, toy_plugin):
    _run(tmp_path, "r", "train.epochs=1")
    before = (tmp_path / "r" / "config.yaml").read_bytes()
    for extra in (["model.name=vlkit-tiny"], ["toy.dim=5"]):  # refused early / refused when the task is built
        with pytest.raises(CheckpointError):
            _run(tmp_path, "r", "train.epochs=2", "resume=true", *extra)
        assert (tmp_path / "r" / "config.yaml").read_bytes() == before


def test_a_fresh_run_never_appends_to_logs_left_without_a_checkpoint(tmp_path, toy_plugin):
    run = tmp_path / "r"
    run.mkdir()
    stale = '{"step": 999, "loss": 123.0}\n'
    (run / "train_log.jsonl").write_text(stale)  # an earlier run killed before its first checkpoint
    _run(tmp_path, "r", "train.epochs=1")
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps and 999 not in steps
    (kept,) = run.glob("train_log.prev-*.jsonl")
    assert kept.read_text() == stale


@pytest.mark.parametrize("key, value, allowed", [
    ("train.batch_size", "0", ">= 1"), ("train.batch_size", "-4", ">= 1"), ("train.grad_accum", "0", ">= 1"),
    ("train.epochs", "-1", ">= 0"), ("optim.lr", "-0.1", ">= 0.0"), ("data.image_size", "8", ">= 16"),
])
def test_out_of_range_numbers_fail_before_any_work(key, value, allowed, toy_plugin):
    from vlkit.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{key}': {value} \(it must be {allowed}\)"):
        resolve_config([*BASE, f"{key}={value}"])


def test_nothing_to_train_and_unwritable_run_dir_fail_before_building(tmp_path, toy_plugin, monkeypatch):
    import vlkit.engine.run as run_mod
    from vlkit.config import ConfigError

    def no_build(*a, **k):  # must not be reached
        raise AssertionError("the model and data were built before the config was checked")

    monkeypatch.setattr(run_mod, "build", no_build)
    with pytest.raises(ConfigError, match="trains nothing"):
        _run(tmp_path, "zero", "train.epochs=0")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a folder"):
        _run(tmp_path, "afile")
    with pytest.raises(ConfigError, match="cannot be created or written"):
        _run(tmp_path, "afile/sub")


def test_damaged_optimizer_state_is_a_clear_error_and_runs_nothing(tmp_path, toy_plugin):
    import pickle

    _run(tmp_path, "r", "train.epochs=1")
    optim = tmp_path / "r" / "checkpoints" / "last" / "optimizer.pt"

    class Boom:  # a pickle that would run code if it were unpickled without weights_only
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    optim.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(VlkitError, match="optimizer.pt was changed or damaged"):  # its recorded sha256
        _run(tmp_path, "r", "train.epochs=2", "resume=true")
    # a checkpoint written before checksums existed: the file is read, with weights_only, and refused
    state_file = optim.parent / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k not in ("files", "sha256_self")}))
    with pytest.raises(CheckpointError, match="optimizer.pt' cannot be read as an optimizer state"):
        _run(tmp_path, "r", "train.epochs=2", "resume=true")
    assert not (tmp_path / "pwned").exists()


def test_seeded_items_make_a_batch_from_its_indices_alone_and_leave_the_global_rngs_alone():
    import random

    import numpy as np

    from vlkit.engine.trainer import SeededItems

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return (i, torch.rand(()).item(), np.random.rand(), random.random())

    items = SeededItems(Draws(), seed=3)
    torch.manual_seed(0)
    before = torch.rand(()).item()
    torch.manual_seed(0)
    first = items.__getitems__([4, 7, 1])
    assert torch.rand(()).item() == before  # the training step's RNG stream is untouched
    assert items.__getitems__([4, 7, 1]) == first  # whatever was fetched before (prefetching, resume)
    assert len({d for row in first for d in row[1:]}) == 9  # every draw differs within the batch
    assert items.__getitems__([4, 7]) != first[:2]  # keyed by the batch's composition
    items.set_epoch(1)
    assert items.__getitems__([4, 7, 1]) != first  # and by the epoch
    assert items[4] == items.__getitems__([4])[0]
