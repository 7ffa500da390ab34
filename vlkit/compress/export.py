"""ONNX export of the image and text encoders, an onnxruntime parity check, and optional INT8 quantization."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlkit.compress.flops import dummy_inputs


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
                          "pip install vlkit[export]") from exc
    return onnx, onnxruntime


class ImageEncoder(nn.Module):
    """images [B, 3, S, S] -> model.encode_image (normalised by default)."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=self.normalize)


class TextEncoder(nn.Module):
    """token ids [N, L] -> model.encode_text (normalised by default)."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=self.normalize)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamo: bool,
            opset: int | None) -> str:
    """Export with batch as a dynamic axis; the dynamo exporter first, the TorchScript one as fallback."""
    # names are prefixed so they cannot collide with node names the exporter derives from the graph
    output_name = input_name.replace("input_", "") + "_embedding"
    kwargs = dict(input_names=[input_name], output_names=[output_name], opset_version=opset)
    if dynamo:
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any exporter failure falls back to the legacy path
            warnings.warn(f"dynamo ONNX export failed ({type(exc).__name__}: {exc}); trying the TorchScript "
                          "exporter", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks inside torch's own MHA
        # argmax pooling indexes with non-negative indices only, the case this warning says is exported right
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(module, (example,), str(path), dynamo=False,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **kwargs)
    return "torchscript"


def _max_diff(path: Path, module: nn.Module, inputs: torch.Tensor) -> float:
    _, ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs.cpu().numpy()})
    with torch.no_grad():
        want = module(inputs).cpu().numpy()
    return float(np.abs(got - want).max())


def _quantize(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def export_onnx(model: nn.Module, out_dir: str | Path, image_size: int | None = None,
                context_length: int | None = None, quantize: str | None = None, *, normalize: bool = True,
                dynamo: bool = True, opset: int | None = None, check_batch: int = 3,
                towers: Sequence[str] = ("image", "text"), image_inputs: torch.Tensor | None = None,
                text_inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` (dynamic batch) to ``out_dir`` and check them.

    ``dynamo=True`` uses torch.export (the default exporter of torch >= 2.9; falls back to the deprecated
    TorchScript exporter if it fails, see ``exporter`` in the report); ``dynamo=False`` goes straight to
    the TorchScript exporter (much faster to run, same graphs for these encoders).

    Each encoder is run by onnxruntime on a batch of ``check_batch`` (a different size than exported, so the
    dynamic axis is exercised) and compared to PyTorch: ``max_abs_diff``. ``quantize="int8"`` adds dynamic
    INT8 weight quantization (``*.int8.onnx``) with its own diff. Returns paths, file sizes and diffs."""
    _require_onnx()
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, tokens = _check_inputs(model, image_size, context_length, check_batch, image_inputs, text_inputs)
    was_training = model.training
    model.eval()
    report: dict[str, Any] = {"quantize": quantize}
    try:
        for name, module, inputs in (("image", ImageEncoder(model, normalize).eval(), images),
                                     ("text", TextEncoder(model, normalize).eval(), tokens)):
            if name in towers:
                report[name] = _export_checked(module, inputs, out_dir / f"{name}_encoder.onnx", f"input_{name}",
                                               dynamo, opset, quantize)
    finally:
        model.train(was_training)
    return report


def _check_inputs(model: nn.Module, image_size: int | None, context_length: int | None, batch: int,
                  images: torch.Tensor | None, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids (EOT mid-sequence) at the model's sizes unless given."""
    dummy_images, dummy_tokens = dummy_inputs(model, batch)
    length, vocab = dummy_tokens.shape[1], int(dummy_tokens.max()) + 1
    if context_length is not None and context_length != length:
        raise ValueError(f"context_length {context_length} differs from the model's {length}")
    if image_size is not None and image_size != dummy_images.shape[-1]:
        raise ValueError(f"image_size {image_size} differs from the model's {dummy_images.shape[-1]}")
    gen = torch.Generator().manual_seed(0)
    if images is None:
        images = torch.randn(dummy_images.shape, generator=gen).to(dummy_images.device)
    if tokens is None:
        tokens = torch.randint(1, vocab - 1, (batch, length), generator=gen).to(dummy_tokens.device)
        tokens[:, length // 2] = vocab - 1
        tokens[:, length // 2 + 1:] = 0
    return images, tokens


def _export_checked(module: nn.Module, inputs: torch.Tensor, path: Path, input_name: str, dynamo: bool,
                    opset: int | None, quantize: str | None) -> dict[str, Any]:
    exporter = _export(module, inputs[:2], path, input_name, dynamo, opset)
    entry = {"path": str(path), "bytes": path.stat().st_size, "exporter": exporter,
             "max_abs_diff": _max_diff(path, module, inputs)}
    if quantize == "int8":
        qpath = _quantize(path)
        entry.update(int8_path=str(qpath), int8_bytes=qpath.stat().st_size,
                     int8_max_abs_diff=_max_diff(qpath, module, inputs))
    return entry
