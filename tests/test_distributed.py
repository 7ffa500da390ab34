"""Two real processes (torchrun, gloo on CPU): data-parallel training and de-duplicated gathering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlkit.cli import resolve_config
from vlkit.engine.run import train

SCRIPT = Path(__file__).parent / "scripts" / "ddp_toy.py"
ARGS = ["plugin=toy", "model=tiny-test", "train.epochs=2", "train.eval_batch_size=8", "train.progress=false",
        "train.checkpoint_every=0", "optim.lr=0.2", "optim.warmup_steps=2", "toy.dropout=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, script: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, toy_plugin):
    ddp_dir = tmp_path / "ddp"
    torchrun(2, SCRIPT, [*ARGS, "train.batch_size=8", f"run.dir={ddp_dir}"])
    ranks = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # both processes hold the same model
    val = ranks[0]["metrics"]["val"]
    assert val["n"] == 37 and val["n_unique"] == 37  # 37 = uneven over 2 processes: no duplicates kept

    plugin, cfg = resolve_config([*ARGS, "train.batch_size=16", f"run.dir={tmp_path / 'single'}"])
    single = train(cfg, plugin)
    a = load_file(str(ddp_dir / "checkpoints/last/task.safetensors"))
    b = load_file(str(tmp_path / "single/checkpoints/last/task.safetensors"))
    for key in ("lin.weight", "lin.bias"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert val["mse"] == pytest.approx(single["val"]["mse"], rel=1e-3)
    log = [json.loads(x) for x in (ddp_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == len([x for x in (tmp_path / "single/train_log.jsonl").read_text().splitlines()])
