"""ONNX export of both encoders matches PyTorch (fp32 within 1e-4, INT8 within a looser bound)."""

from __future__ import annotations

import pytest
import torch

from vlkit.compress.materialize import materialize
from vlkit.compress.testing import single_thread, tiny_clip, tiny_inputs

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_export_matches_pytorch_and_int8_runs(tmp_path):
    from vlkit.compress.export import export_onnx

    model = tiny_clip(layers=2)
    images, tokens = tiny_inputs(model, batch=3)
    report = export_onnx(model, tmp_path, quantize="int8", dynamo=False, image_inputs=images, text_inputs=tokens)
    for tower in ("image", "text"):
        entry = report[tower]
        assert entry["exporter"] == "torchscript"
        assert entry["max_abs_diff"] < 1e-4, entry
        assert entry["int8_max_abs_diff"] < 0.1, entry  # normalised embeddings: components are in [-1, 1]
        assert 0 < entry["int8_bytes"] < entry["bytes"]
        assert (tmp_path / f"{tower}_encoder.onnx").stat().st_size == entry["bytes"]


def test_dynamo_export_of_a_pruned_model_with_an_empty_block(tmp_path):
    from vlkit.compress.export import export_onnx

    model = tiny_clip(layers=2)
    heads = {("image", 0): torch.tensor([1.0, 0, 0, 1]), ("text", 1): torch.zeros(4)}
    neurons = {("text", 0): torch.arange(256).lt(32).float()}
    small = materialize(model, heads, neurons)
    images, tokens = tiny_inputs(small, batch=3)
    report = export_onnx(small, tmp_path, towers=["text"], text_inputs=tokens)  # dynamo is slow: one tower
    assert report["text"]["exporter"] == "dynamo" and report["text"]["max_abs_diff"] < 1e-4
    assert "image" not in report and "int8_path" not in report["text"]
    report = export_onnx(small, tmp_path, dynamo=False, image_inputs=images, text_inputs=tokens)
    assert report["image"]["max_abs_diff"] < 1e-4 and report["text"]["max_abs_diff"] < 1e-4


def test_bad_quantize_option_is_rejected(tmp_path):
    from vlkit.compress.export import export_onnx

    with pytest.raises(ValueError, match="int8"):
        export_onnx(tiny_clip(layers=1), tmp_path, quantize="int4")
