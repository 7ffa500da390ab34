"""`vlkit prune`, `vlkit sparsify` and `vlkit export` end to end, in-process, on the vlkit-tiny-test backbone."""

from __future__ import annotations

import json

import pytest
import torch

from vlkit.backbone import load_backbone
from vlkit.cli import main
from vlkit.compress.testing import single_thread

TOWER_KEYS = {"kept_heads", "total_heads", "kept_neurons", "total_neurons", "flops_before_analytic",
              "flops_after_analytic", "flops_before_counted", "flops_after_counted", "flops_ratio", "budget_met"}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():  # tiny models on a shared machine run fastest on one thread
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "tiny"
    load_backbone("vlkit-tiny-test").save(path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlkit.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=6, n_val=0, n_test=0, image_size=32, n_czsl_per_pair=0, progress=False)
    return root


@pytest.fixture(scope="module")
def pruned(saved, shapes, tmp_path_factory):
    """An OPTIN-pruned copy of the tiny backbone, made through the CLI, and its report."""
    out = tmp_path_factory.mktemp("pruned") / "bb"
    with single_thread():
        rc = main(["prune", f"model={saved}", "method=optin", "flops=0.6", f"calib={shapes}", "n_calib=4",
                   f"out={out}"])
    assert rc == 0
    return out, json.loads((out / "prune_report.json").read_text())


def test_prune_writes_a_backbone_that_reloads_and_meets_the_budget(pruned):
    out, report = pruned
    bb = load_backbone(out)
    assert bb.pruned_spec() == report["spec"] is not None
    with torch.no_grad():
        assert bb.encode_image(torch.randn(2, 3, bb.image_size, bb.image_size)).shape == (2, bb.embed_dim)
        assert bb.encode_text(bb.tokenize(["a red circle", "two stars"])).shape == (2, bb.embed_dim)
    for tower in ("image", "text"):
        rep = report["towers"][tower]
        assert set(rep) == TOWER_KEYS
        assert rep["budget_met"] and rep["flops_after_counted"] <= 0.6 * rep["flops_before_counted"]
        assert rep["flops_after_counted"] == rep["flops_after_analytic"]
        assert len(rep["kept_heads"]) == len(rep["total_heads"]) == 2
    assert bb.num_parameters() == report["params_after"] < report["params_before"]
    assert (out / "kept_units.png").stat().st_size > 0


def test_prune_report_records_the_run(pruned, shapes):
    _, report = pruned
    assert report["method"] == "optin" and report["flops_target"] == 0.6 and report["backbone"] == "vlkit-tiny-test"
    calib = report["calibration"]
    assert calib["kind"] == "coco-captions" and calib["n_images"] == 4 and calib["n_texts"] == 4
    assert calib["images_dir"] == str(shapes / "images" / "train")
    assert set(report["selection"]) == {"image", "text"}


def test_prune_one_tower_with_magnitude_and_no_calibration(saved, tmp_path, capsys):
    assert main(["prune", f"model={saved}", "method=magnitude", "flops=0.5", "towers=image",
                 f"out={tmp_path / 'out'}"]) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert list(report["towers"]) == ["image"] and report["calibration"]["kind"] == "none"
    spec = load_backbone(tmp_path / "out").pruned_spec()
    assert {b["tower"] for b in spec["blocks"]} == {"image"}
    assert "image" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["flops=1.5"], "flops=1.5 is out of range"),
    (["flops=0"], "in (0, 1]"),
    (["method=l2"], "method='l2' is not one of optin, magnitude, random"),
    (["towers=image,audio"], "towers='image,audio'"),
    (["calib=/no/such/folder"], "does not exist"),
    (["flop=0.5"], "unknown config key 'flop'"),
    (["flops=much"], "flops"),
])
def test_bad_prune_input_fails_with_exit_code_2(saved, tmp_path, capsys, args, message):
    assert main(["prune", f"model={saved}", f"out={tmp_path / 'out'}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlkit prune: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_prune_with_a_model_budget_splits_the_flops_between_the_towers(saved, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", f"model={saved}", "method=magnitude", "flops=0.5", "budget=model", f"calib={shapes}",
                 "split_calib=4", "reconstruct=4", f"out={out}"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    split = report["split"]
    assert report["budget"] == "model" and split["n_pairs"] == 4 and split["calibration"]["texts"] == "captions"
    assert split["fractions"] == min(split["tried"], key=lambda r: r["damage"])["fractions"]
    assert report["model_flops"]["after_counted"] <= 0.5 * report["model_flops"]["before_counted"]
    assert "towers' summed dense FLOPs" in capsys.readouterr().out
    assert load_backbone(out).pruned_spec() == report["spec"]


def test_a_model_budget_needs_captions_to_compare_splits(saved, shapes, tmp_path, capsys):
    args = ["prune", f"model={saved}", "method=magnitude", "budget=model", f"out={tmp_path / 'out'}"]
    assert main([*args, f"calib={shapes / 'images' / 'train'}"]) == 2
    assert "has no captions" in capsys.readouterr().err
    assert main([*args[:-2], "budget=both", f"out={tmp_path / 'out'}"]) == 2
    assert "budget='both' is not tower" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_refuses_to_replace_a_folder_that_is_not_a_backbone(saved, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["prune", f"model={saved}", "method=random", f"out={tmp_path}"]) == 2
    assert "not a vlkit backbone" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert main(["prune", f"model={saved}", "method=random", "out=."]) == 2
    assert "current folder" in capsys.readouterr().err


def test_calibration_from_a_folder_of_images_uses_random_texts_with_a_warning(saved, shapes, capsys):
    from vlkit.compress.calibration import calibration_batch
    from vlkit.errors import CompressError

    bb = load_backbone(saved)
    calib = calibration_batch(bb, str(shapes / "images" / "train"), n=3)
    assert calib.images.shape == (3, 3, bb.image_size, bb.image_size)
    assert calib.texts.shape == (3, bb.context_length) and calib.source["texts"] == "random tokens"
    assert "warning" in capsys.readouterr().out
    captions = calibration_batch(bb, str(shapes / "annotations" / "captions_train.json"), n=10)
    assert captions.images.shape[0] == 6 and captions.texts.shape[0] == 10  # 6 images, 30 captions
    with pytest.raises(CompressError, match="splits there: test, train, val"):
        calibration_batch(bb, str(shapes), n=3, split="tran")


def test_export_of_a_pruned_backbone_matches_pytorch_and_int8_runs(pruned, tmp_path, capsys):
    out, _ = pruned
    assert main(["export", f"model={out}", "quantize=int8", "exporter=torchscript", f"out={tmp_path}"]) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    for tower in ("image", "text"):
        entry = report[tower]
        assert entry["max_abs_diff"] < 1e-4, entry
        assert entry["int8_max_abs_diff"] < 0.1, entry  # normalised embeddings: components in [-1, 1]
        assert (tmp_path / f"{tower}_encoder.onnx").stat().st_size == entry["bytes"]
        assert (tmp_path / f"{tower}_encoder.int8.onnx").stat().st_size == entry["int8_bytes"]
    assert report["inputs"]["image_size"] == 32 and report["inputs"]["context_length"] == 16
    assert "image_encoder.int8.onnx" in capsys.readouterr().out


def test_bad_export_input_fails_with_exit_code_2(saved, tmp_path, capsys):
    assert main(["export", f"model={saved}", "quantize=int4", f"out={tmp_path}"]) == 2
    assert "quantize='int4' is not one of none, int8" in capsys.readouterr().err


def test_sparsify_2_4_zeroes_exactly_half_of_every_eligible_layer(saved, tmp_path):
    from vlkit.compress import sparsity_report

    out = tmp_path / "sparse"
    assert main(["sparsify", f"model={saved}", "pattern=2:4", f"out={out}"]) == 0
    report = json.loads((out / "sparsify_report.json").read_text())
    assert report["skipped"] == [] and report["masks_folded"] == len(report["layers"]) > 0
    assert all(layer["sparsity"] == 0.5 for layer in report["layers"].values())
    reloaded = sparsity_report(load_backbone(out).model)  # the zeros are in the saved weights
    assert reloaded["layers"].keys() == report["layers"].keys()
    assert all(layer["sparsity"] == 0.5 for layer in reloaded["layers"].values())


def test_sparsify_global_amount_and_bad_pattern(saved, tmp_path, capsys):
    assert main(["sparsify", f"model={saved}", "amount=0.3", "scope=global", "towers=text",
                 f"out={tmp_path / 'g'}"]) == 0
    report = json.loads((tmp_path / "g" / "sparsify_report.json").read_text())
    assert abs(report["sparsity"] - 0.3) < 1e-3 and not any(k.startswith("visual.") for k in report["layers"])
    assert main(["sparsify", f"model={saved}", "pattern=4:2", f"out={tmp_path / 'b'}"]) == 2
    assert "pattern='4:2'" in capsys.readouterr().err
