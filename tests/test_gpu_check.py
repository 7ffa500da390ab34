"""benchmarks/gpu_check.sh: on a machine without a CUDA GPU it says so and succeeds (CI machines have none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run for minutes")
def test_gpu_check_skips_with_a_clear_line_without_a_gpu():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False)"


def test_gpu_check_refuses_a_python_without_torch(tmp_path):
    fake = tmp_path / "python"  # a python that cannot import torch
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr
