"""examples/plugin_template as a third party would use it: installed as a package (into a private folder,
never into the venv), found through its entry points, trained and evaluated by the `vlkit` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin_template"
# the smoke world and tiny-test backbone; 10 epochs = 50 steps, enough for the classifier to learn colours
SMOKE = ["plugin=template", "experiment=smoke", "train.epochs=10", "train.progress=false"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The template built and installed with pip into a folder of its own (put on PYTHONPATH by ``vlkit``)."""
    pytest.importorskip("setuptools", reason="the template builds with setuptools, without build isolation")
    work = tmp_path_factory.mktemp("plugin-template")
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = shutil.copytree(TEMPLATE, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "vlkit_template" / "configs" / "plugin" / "template.yaml").is_file(), "YAML defaults not shipped"
    return target


@pytest.fixture
def cli(site, tmp_path, _private_cache):
    """Run ``python -m vlkit ARGS`` with the template importable, from a folder that is not the repository."""
    env = dict(os.environ, PYTHONPATH=str(site), VLKIT_CACHE=str(_private_cache), OMP_NUM_THREADS="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlkit", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
    return run


def test_found_through_its_entry_points(cli):
    listed = cli("plugins")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split() == ["template", "vlkit_template:plugin"] for line in listed.stdout.splitlines()), listed.stdout
    usage = cli("--help")
    assert usage.returncode == 0, usage.stderr
    assert any(line.split()[:1] == ["zeroshot"] for line in usage.stdout.splitlines()), usage.stdout  # vlkit.commands


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
def test_trains_learns_and_evaluates_its_checkpoint(cli, tmp_path):
    run_dir = tmp_path / "run"
    trained = cli("train", *SMOKE, f"run.dir={run_dir}")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    # the plugin's YAML (model: tiny-shapes) came first, the experiment after it (model: tiny-test)
    config = (run_dir / "config.yaml").read_text()
    assert "plugin: template" in config and "name: vlkit-tiny-test" in config

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["best"]) == {"step", "acc"}  # the declared headline metric picked the best checkpoint
    for split in ("val", "test"):
        m = metrics[split]
        assert m["n"] == 96 and 0.0 < m["chance"] < 1.0
        # a random-init backbone: zero-shot is no better than chance, the trained classifier is
        assert m["acc"] > m["chance"] + 0.1, (split, m)
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 50
    assert sum(losses[-10:]) / 10 < losses[0] - 0.2, losses  # the loss fell
    # the optional report hook ran and its keys joined metrics.json
    assert metrics["summary"] == str(run_dir / "template_summary.md") and "| val |" in Path(metrics["summary"]).read_text()

    # `vlkit eval` rebuilds the task and loads the best checkpoint: the best step's val accuracy again
    out = tmp_path / "eval"
    evaluated = cli("eval", *SMOKE, f"checkpoint={run_dir}", "split=val", f"run.dir={out}")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    again = json.loads((out / "eval_val.json").read_text())["val"]
    assert again["acc"] == pytest.approx(metrics["best"]["acc"], abs=1e-6)


def test_unknown_key_fails_before_any_work(cli, tmp_path):
    bad = cli("train", "plugin=template", "template.nope=1", f"run.dir={tmp_path / 'never'}")
    assert bad.returncode == 2
    assert "unknown config key 'template.nope'" in bad.stderr and "template.target" in bad.stderr, bad.stderr
    assert not (tmp_path / "never").exists()
