"""Exact resume after a real SIGTERM mid-epoch, for every real plugin's dataset (each run in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlkit.data.shapes import generate_shapes
from vlkit.plugins import list_plugins

SCRIPT = Path(__file__).parent / "scripts" / "sigterm_at_step.py"
COMMON = ["model=tiny-test", "train.progress=false", "train.best_metric=", "train.checkpoint_every=0",
          "train.max_steps=7", "train.epochs=3", "optim.scheduler=constant", "optim.warmup_steps=0",
          "train.eval_batch_size=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal-world")
    generate_shapes(root, n_train=40, n_val=8, n_test=8, image_size=32, seed=0, n_czsl_per_pair=2, progress=False)
    return root


def _plugin_args(plugin: str, world: Path) -> list[str]:
    """Each bundled plugin's data and the source of randomness its resume must restore; any other installed
    plugin runs on the shapes world with its own defaults."""
    if plugin == "retrieval":  # random caption draws and hard negatives: the dataset's own randomness
        return ["plugin=retrieval", f"data.root={world}", "train.batch_size=6", "retrieval.hard_negatives=true"]
    if plugin == "csp":  # attribute dropout draws from the global RNG in every step
        return ["plugin=csp", "data=czsl", f"data.root={world / 'czsl'}", "train.batch_size=6"]
    if plugin == "caption":  # the MLLM backbone: random caption draws, dropout-free transformers layers
        return ["plugin=caption", "model=tiny-llava-test", f"data.root={world}", "train.batch_size=6",
                "caption.vision_from="]
    if plugin == "ufo":
        return ["plugin=ufo", f"data.root={world}", "data.image_size=32", "train.batch_size=6"]
    return [f"plugin={plugin}", f"data.root={world}", "train.batch_size=6"]


def _train(run: Path, k: int, args: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(k), *args, f"run.dir={run}", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
@pytest.mark.parametrize("plugin", list_plugins())
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(plugin, world, tmp_path):
    own = _plugin_args(plugin, world)
    args = [*(a for a in COMMON if not (a.startswith("model=") and any(o.startswith("model=") for o in own))), *own]
    whole = _train(tmp_path / "whole", 0, args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = _train(tmp_path / "cut", 3, args)
    assert cut.returncode != 0 and "interrupted" in cut.stderr  # stopped by the signal, checkpoint saved
    state = json.loads((tmp_path / "cut" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 3  # mid-epoch (several more batches per epoch)
    again = _train(tmp_path / "cut", 0, args, "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]

    def losses(run: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    assert len(losses("whole")) == 7 and losses("cut") == losses("whole")
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / "task.safetensors")) for r in ("whole", "cut"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
