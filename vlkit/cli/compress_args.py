"""The keys of `vlkit prune`, `vlkit sparsify` and `vlkit export` and their checks, all run before a model loads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlkit.compress.methods import METHODS
from vlkit.errors import CompressError

TOWERS = ("image", "text")
DEFAULT_MODEL = "cached:vlkit-tiny-shapes"



@dataclass
class PruneArgs:
    # a saved backbone folder, an open_clip name (random init unless pretrained=...), or cached:NAME
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    # optin (one-shot, calibrated) | magnitude (weight L1 norm) | random (a baseline)
    method: str = "optin"
    # FLOPs kept, a fraction in (0, 1] of the dense FLOPs: of each pruned tower's own (budget=tower), or of the
    # pruned towers' sum (budget=model: one image plus one caption; the split between the towers is the one
    # whose pruned model keeps the dense image-text relations best on split_calib held-out caption pairs)
    flops: float = 0.6
    budget: str = "tower"
    split_calib: int = 256
    # a folder of images, a COCO captions .json, or a data set root holding annotations/captions_<split>.json;
    # empty = a small shapes world in vlkit's cache (only optin uses calibration data)
    calib: str = ""
    # the images of calib=CAPTIONS.json when they are not at <root>/images/<split> or <root>/<split>
    calib_images: str = ""
    calib_split: str = "train"
    n_calib: int = 64
    # comma-separated towers to prune: image, text
    towers: str = "image,text"
    # output folder: the pruned backbone, prune_report.json, kept_units.png
    out: str = ""
    seed: int = 0
    # per-block units reserved before the global ranking (0 = a block may lose all its heads)
    min_heads: int = 0
    min_neurons: int = 0
    # calibration images and captions on which the pruned attentions' and MLPs' output projections are refit by
    # least squares to the unpruned model's (vlkit.compress.reconstruct; no training; 0 = off), and the
    # fit's ridge (relative to the mean diagonal of its Gram matrix)
    reconstruct: int = 256
    ridge: float = 1e-2
    # cpu | cuda | cuda:N (where the importance scores are computed)
    device: str = "cpu"
    # > 0: recover accuracy after pruning by distillation from the unpruned model (vlkit.compress.distill):
    # this many steps of the retrieval plugin's training on the shapes world (or recover_data=ROOT, any
    # COCO-captions layout), run in out.recover/ (resumable there with vlkit train ... resume=true); out/
    # then holds the recovered backbone
    recover_steps: int = 0
    recover_lr: float = 5e-4
    recover_batch: int = 128
    recover_data: str = ""
    # the ranking/contrastive loss on the data's captions beside distillation (0 = the teacher alone; 0.2 kept
    # 0.6-1.0 point more than 0 on each of three seeds, 1.0 less: README "Recovery by distillation")
    recover_task_weight: float = 0.2
    # layer-wise distillation: each transformer block's output pulled to the unpruned model's (0 = off)
    recover_blocks: float = 0.0
    # the model recovery distils from (empty = model, the unpruned one); name the original dense model when
    # pruning in stages (each stage's model= is the previous stage's output)
    recover_teacher: str = ""
    # further `vlkit train` overrides for the recovery run, space-separated (e.g. "retrieval.distill_feature=4
    # optim.weight_decay=0"); they come last, so they win
    recover_train: str = ""


@dataclass
class SparsifyArgs:
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    # fraction of the weights set to zero (unused with an N:M pattern, which fixes it at 1 - N/M)
    amount: float = 0.5
    # none (unstructured by magnitude) | N:M such as 2:4 (keep N of every M consecutive input weights)
    pattern: str = "none"
    # layer (each weight loses `amount`) | global (the smallest magnitudes over all weights)
    scope: str = "layer"
    towers: str = "image,text"
    # output folder: the sparse backbone (zeros folded into the weights) and sparsify_report.json
    out: str = ""


@dataclass
class ExportArgs:
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    format: str = "onnx"
    # none | int8 (dynamic INT8 weight quantization by onnxruntime, written beside the fp32 file)
    quantize: str = "none"
    towers: str = "image,text"
    # dynamo (torch.export, the current exporter) | torchscript (the legacy one, much faster to run)
    exporter: str = "dynamo"
    opset: int | None = None
    # batch size of the onnxruntime-vs-PyTorch check (different from the export example: dynamic axis)
    check_batch: int = 3
    # output folder: image_encoder.onnx, text_encoder.onnx (+ .int8.onnx), export_report.json
    out: str = ""


PRUNE_NOTE = """\
  method: optin | magnitude | random; flops: kept fraction of each tower's FLOPs, in (0, 1]
  budget=model: flops of both towers together, split between them on calibration captions (budget=tower: each)
  reconstruct=N (default 256, 0 = off): refit the pruned projections by least squares on N calibration samples
  calib (optin and reconstruct): a folder of images, a COCO captions .json, a data set root with
  annotations/captions_<calib_split>.json, or empty for a shapes world in vlkit's cache
  writes out/ (a backbone: load_backbone(out)), out/prune_report.json, out/kept_units.png
  recover_steps=N: then N steps of distillation from the unpruned model (run folder out.recover/)"""
SPARSIFY_NOTE = """\
  pattern: none (unstructured, `amount` of the weights by magnitude) | N:M such as 2:4; scope: layer | global
  writes out/ (a backbone with the zeros folded in) and out/sparsify_report.json"""
EXPORT_NOTE = """\
  format: onnx; quantize: none | int8; exporter: dynamo | torchscript
  writes out/image_encoder.onnx, out/text_encoder.onnx (+ .int8.onnx) and out/export_report.json"""


# ---- checks shared by the commands (all run before the model is loaded) -----------------------------
def _parse_towers(value: str) -> tuple[str, ...]:
    towers = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    bad = [t for t in towers if t not in TOWERS]
    if not towers or bad:
        raise CompressError(f"towers={value!r}: expected a comma-separated list of {', '.join(TOWERS)} "
                            f"(e.g. towers=image,text or towers=image)")
    return towers


def _check_out(out: str, verb: str, replaceable: bool = True) -> Path:
    """The output folder; one that a backbone save would replace must be new, empty or a saved backbone."""
    if not out:
        raise CompressError(f"vlkit {verb} needs out=DIR (the folder to write)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CompressError(f"out={out!r} is a file; pass a folder")
    if replaceable and path.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise CompressError(f"out={out!r} is the current folder or above it, which the save would replace; "
                            f"pass a sub-folder such as out=pruned")
    if replaceable and path.is_dir() and any(path.iterdir()) and not (path / "vlkit_backbone.json").is_file():
        raise CompressError(f"out={out!r} is a non-empty folder that is not a vlkit backbone; the backbone save "
                            f"replaces the whole folder, so choose a new or empty folder")
    return path


def check_prune(opts: PruneArgs) -> tuple[str, ...]:
    if opts.method not in METHODS:
        raise CompressError(f"method={opts.method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 < opts.flops <= 1.0:
        raise CompressError(f"flops={opts.flops} is out of range: it is the fraction of the dense FLOPs to keep, "
                            f"in (0, 1], e.g. flops=0.6")
    if opts.n_calib < 1:
        raise CompressError(f"n_calib={opts.n_calib}: need at least one calibration sample (64 is a good default)")
    if opts.budget not in ("tower", "model"):
        raise CompressError(f"budget={opts.budget!r} is not tower (each pruned tower keeps `flops` of its own "
                            f"FLOPs) or model (the pruned towers together)")
    if opts.budget == "model" and opts.split_calib < 2:
        raise CompressError(f"split_calib={opts.split_calib}: budget=model compares splits on image-caption pairs' "
                            f"similarity distributions, which needs at least 2 pairs (256 is the default)")
    if opts.min_heads < 0 or opts.min_neurons < 0:
        raise CompressError("min_heads and min_neurons must be >= 0")
    if opts.reconstruct < 0 or opts.ridge < 0:
        raise CompressError("reconstruct is a number of calibration samples (0 = no least-squares refit) and "
                            "ridge must be >= 0 (1e-2 is a good default)")
    if opts.recover_steps < 0 or opts.recover_batch < 1 or opts.recover_lr <= 0:
        raise CompressError("recover_steps must be >= 0 (0 = no recovery), recover_batch >= 1, recover_lr > 0")
    if opts.recover_steps and opts.pretrained:
        raise CompressError("recover_steps distils from the unpruned model, which must load by name alone: save "
                            "the pretrained model first (load_backbone(...).save(DIR)) and pass model=DIR")
    if opts.recover_data and not Path(opts.recover_data).is_dir():
        raise CompressError(f"recover_data={opts.recover_data!r} is not a folder: pass a data set root with "
                            "annotations/captions_<split>.json, or leave it empty for the shapes world")
    if opts.calib and not Path(opts.calib).exists():
        raise CompressError(f"calib={opts.calib!r} does not exist; pass a folder of images, a COCO captions "
                            f".json or a data set root (or leave calib empty for a generated shapes world)")
    _check_out(opts.out, "prune")
    return _parse_towers(opts.towers)


def check_sparsify(opts: SparsifyArgs) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
    pattern = None
    if opts.pattern not in ("", "none"):
        match = re.fullmatch(r"(\d+):(\d+)", opts.pattern)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise CompressError(f"pattern={opts.pattern!r}: expected none or N:M with 0 < N < M, e.g. pattern=2:4")
        pattern = (int(match[1]), int(match[2]))
    elif not 0.0 <= opts.amount < 1.0:
        raise CompressError(f"amount={opts.amount} is out of range: the fraction of weights zeroed, in [0, 1)")
    if opts.scope not in ("layer", "global"):
        raise CompressError(f"scope={opts.scope!r} is not one of layer, global")
    _check_out(opts.out, "sparsify")
    return pattern, _parse_towers(opts.towers)


def check_export(opts: ExportArgs) -> tuple[str, ...]:
    if opts.format != "onnx":
        raise CompressError(f"format={opts.format!r}: onnx is the one export format so far")
    if opts.quantize not in ("none", "int8"):
        raise CompressError(f"quantize={opts.quantize!r} is not one of none, int8")
    if opts.exporter not in ("dynamo", "torchscript"):
        raise CompressError(f"exporter={opts.exporter!r} is not one of dynamo, torchscript")
    if opts.check_batch < 1:
        raise CompressError(f"check_batch={opts.check_batch} must be >= 1")
    _check_out(opts.out, "export", replaceable=False)
    return _parse_towers(opts.towers)
