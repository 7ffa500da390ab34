"""The CSP fidelity protocol (benchmarks/csp_table.py): lr chosen on val and recorded, seeds, mean +- std."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from vlkit.data.shapes import CZSL_COLOUR_SPLIT, generate_shapes

SCRIPT = __import__("pathlib").Path(__file__).parents[1] / "benchmarks" / "csp_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("csp_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lr_choice_prefers_the_best_val_auc_and_the_smaller_rate_on_ties():
    table = _script()
    assert table.choose_lr([{"lr": 1e-3, "val_AUC": 0.2}, {"lr": 5e-3, "val_AUC": 0.3}]) == 5e-3
    assert table.choose_lr([{"lr": 5e-3, "val_AUC": 0.3}, {"lr": 1e-3, "val_AUC": 0.3}]) == 1e-3
    assert table.mean_std([0.1, 0.3]) == pytest.approx((0.2, statistics.stdev([0.1, 0.3])))
    assert table.mean_std([0.4]) == (0.4, 0.0)


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
def test_protocol_records_the_lr_choice_and_reports_mean_and_std_over_seeds(tmp_path):
    world = tmp_path / "world"
    generate_shapes(world, n_train=0, n_val=0, n_test=0, image_size=32, n_czsl_per_pair=4, progress=False)
    out = tmp_path / "table"
    table = _script()
    result = table.main(["--out", str(out), "--split-name", CZSL_COLOUR_SPLIT, "--methods", "clip", "csp",
                         "--lrs", "1e-4", "5e-2", "--seeds", "0", "1", "--jobs", "2", "--probe-steps", "30", "--",
                         "model=tiny-test", "data=czsl", f"data.root={world / 'czsl'}", "train.epochs=2",
                         "train.batch_size=24", "train.eval_batch_size=64", "train.progress=false"])
    choice = json.loads((out / "csp" / "lr_choice.json").read_text())
    grid = {lr: json.loads((out / "csp" / f"lr{lr}-seed0" / "metrics.json").read_text())["best"]["AUC"]
            for lr in ("0.0001", "0.05")}
    assert choice["grid"] == {"0.0001": grid["0.0001"], "0.05": grid["0.05"]}
    best = max(sorted(grid, key=float), key=lambda k: grid[k])
    assert choice["chosen_lr"] == float(best)
    runs = result["runs"]["csp"]
    assert [(r["lr"], r["seed"]) for r in runs] == [(float(best), 0), (float(best), 1)]
    assert (out / "csp" / f"lr{best}-seed1" / "eval_test.json").is_file()
    aucs = [r["test"]["AUC"] for r in runs]
    assert result["summary"]["csp"]["AUC"] == pytest.approx([statistics.fmean(aucs), statistics.stdev(aucs)])
    assert result["summary"]["clip"]["AUC"][1] == 0.0 and 0.0 <= result["probe"]["probe_attr_acc"] <= 1.0
    md = (out / "table.md").read_text()
    assert "| CSP (2) |" in md and "| CLIP (1) |" in md and "±" in md and "Linear probe" in md
