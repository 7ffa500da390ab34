"""`vlkit prune`, `vlkit sparsify` and `vlkit export` (registered with the CLI on import; torch and
vlkit.compress are imported inside the commands, so the CLI starts fast)."""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.cli import command
from vlkit.config import describe, parse_kv
from vlkit.errors import VlkitError

if TYPE_CHECKING:  # torch and the backbone are imported inside the commands: the CLI starts fast
    import torch

    from vlkit.backbone import Backbone

METHODS = ("optin", "magnitude", "random")  # = vlkit.compress.prune.METHODS (importing it imports torch)
TOWERS = ("image", "text")
DEFAULT_MODEL = "cached:vlkit-tiny-shapes"


class CompressError(VlkitError, ValueError):
    """Bad input to a compression command (a key's value, a calibration source, an output folder)."""


@dataclass
class PruneArgs:
    # a saved backbone folder, an open_clip name (random init unless pretrained=...), or cached:NAME
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    # optin (one-shot, calibrated) | magnitude (weight L1 norm) | random (a baseline)
    method: str = "optin"
    # FLOPs kept, as a fraction of each pruned tower's dense FLOPs, in (0, 1]
    flops: float = 0.6
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
    # cpu | cuda | cuda:N (where the importance scores are computed)
    device: str = "cpu"


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
  calib (optin only): a folder of images, a COCO captions .json, a data set root with
  annotations/captions_<calib_split>.json, or empty for a shapes world in vlkit's cache
  writes out/ (a backbone: load_backbone(out)), out/prune_report.json, out/kept_units.png"""
SPARSIFY_NOTE = """\
  pattern: none (unstructured, `amount` of the weights by magnitude) | N:M such as 2:4; scope: layer | global
  writes out/ (a backbone with the zeros folded in) and out/sparsify_report.json"""
EXPORT_NOTE = """\
  format: onnx; quantize: none | int8; exporter: dynamo | torchscript
  writes out/image_encoder.onnx, out/text_encoder.onnx (+ .int8.onnx) and out/export_report.json"""


def _help(verb: str, schema: type, note: str = "") -> str:
    lines = [f"usage: vlkit {verb} key=value ...", *([note] if note else []), "", "keys (type = default):"]
    return "\n".join(lines + describe(schema))


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


def _check_prune(opts: PruneArgs) -> tuple[str, ...]:
    if opts.method not in METHODS:
        raise CompressError(f"method={opts.method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 < opts.flops <= 1.0:
        raise CompressError(f"flops={opts.flops} is out of range: it is the fraction of the dense FLOPs to keep, "
                            f"in (0, 1], e.g. flops=0.6")
    if opts.n_calib < 1:
        raise CompressError(f"n_calib={opts.n_calib}: need at least one calibration sample (64 is a good default)")
    if opts.min_heads < 0 or opts.min_neurons < 0:
        raise CompressError("min_heads and min_neurons must be >= 0")
    if opts.calib and not Path(opts.calib).exists():
        raise CompressError(f"calib={opts.calib!r} does not exist; pass a folder of images, a COCO captions "
                            f".json or a data set root (or leave calib empty for a generated shapes world)")
    _check_out(opts.out, "prune")
    return _parse_towers(opts.towers)


def _load(name: str, pretrained: str | None, device: str = "cpu") -> Backbone:
    from vlkit.commands import load_model_arg

    bb = load_model_arg(name, pretrained)
    bb.model.eval()
    if device != "cpu":
        import torch

        try:
            bb.model.to(torch.device(device))
        except (RuntimeError, AssertionError) as exc:
            raise CompressError(f"device={device!r} is not usable here ({exc}); use device=cpu") from None
    return bb


def _check_towers_prunable(bb: Backbone, towers: tuple[str, ...]) -> None:
    from vlkit.backbone.blocks import available_towers

    have = available_towers(bb.model)
    missing = [t for t in towers if t not in have]
    if missing:
        raise CompressError(f"the {', '.join(missing)} tower of {bb.name!r} is not an open_clip transformer, which "
                            f"prune needs; prunable towers here: {', '.join(have) or 'none'} (towers=...)")


# ---- calibration data -----------------------------------------------------------------------------
@dataclass
class Calibration:
    """Preprocessed images [n, 3, S, S] and token ids [n, L] for OPTIN, and where they came from."""

    images: torch.Tensor | None
    texts: torch.Tensor | None
    source: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str) -> Calibration:
        images = self.images.to(device) if self.images is not None else None
        texts = self.texts.to(device) if self.texts is not None else None
        return Calibration(images, texts, self.source)


def default_calibration_root(n: int) -> Path:
    """A shapes world to calibrate on: the cached training world if there is one, else a small one made now."""
    from omegaconf import OmegaConf

    from vlkit.cache import cache_root, shapes_dir
    from vlkit.config import DataConfig

    trained = shapes_dir(OmegaConf.structured(DataConfig))
    if (trained / "annotations" / "captions_train.json").is_file():
        return trained
    root = cache_root() / "data" / f"shapes-calib-{n}-px64-seed0"
    if not (root / "annotations" / "captions_train.json").is_file():
        from vlkit.data.shapes import generate_shapes
        from vlkit.io import atomic_directory

        print(f"calib is empty: generating a shapes world of {n} images into {root} (once)", flush=True)
        with atomic_directory(root) as tmp:
            generate_shapes(tmp, n_train=n, n_val=0, n_test=0, image_size=64, seed=0, n_czsl_per_pair=0,
                            progress=False, workers=1)
    return root


def _sample(total: int, n: int, seed: int, what: str) -> list[int]:
    if total == 0:
        raise CompressError(f"calibration source has no {what}")
    if total < n:
        print(f"calibration: only {total} {what} available (n_calib={n}); using all of them", flush=True)
    return sorted(random.Random(seed).sample(range(total), min(n, total)))


def _guess_images_dir(ann: Path) -> Path:
    """COCO / shapes layout: <root>/annotations/captions_<split>.json with images in <root>/images/<split>
    (shapes) or <root>/<split> (COCO's train2017/)."""
    split = ann.stem[len("captions_"):] if ann.stem.startswith("captions_") else ann.stem
    root = ann.parent.parent if ann.parent.name == "annotations" else ann.parent
    candidates = [root / "images" / split, root / split]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise CompressError(f"no images folder found for {ann} (looked at {', '.join(map(str, candidates))}); "
                        f"pass calib_images=DIR")


def _from_captions(bb: Backbone, ann: Path, images_dir: Path, n: int, seed: int) -> Calibration:
    import torch

    from vlkit.data.coco import CocoCaptions

    try:
        ds = CocoCaptions(images_dir, ann, transform=bb.preprocess)
        images = torch.stack([ds.load(i) for i in _sample(len(ds), n, seed, "images")])
    except (FileNotFoundError, ValueError) as exc:  # unreadable json or image: the reader's message says which
        raise CompressError(f"calibration data: {exc}") from None
    texts = [ds.captions[i] for i in _sample(len(ds.captions), n, seed + 1, "captions")]
    source = {"kind": "coco-captions", "captions": str(ann), "images_dir": str(images_dir),
              "n_images": len(images), "n_texts": len(texts), "texts": "captions"}
    return Calibration(images, bb.tokenize(texts), source)


def random_tokens(bb: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    """Random token ids with an end-of-text token (the highest id, found by argmax pooling) at a random place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab, length = int(bb.model.vocab_size), bb.context_length
    tokens = torch.randint(1, vocab - 1, (n, length), generator=gen)
    for i, eot in enumerate(torch.randint(2, length, (n,), generator=gen).tolist()):
        tokens[i, eot], tokens[i, eot + 1:] = vocab - 1, 0
    return tokens


def _from_folder(bb: Backbone, folder: Path, n: int, seed: int, need_texts: bool) -> Calibration:
    import torch

    from vlkit.data.images import ImageLoadError, find_images, load_image

    files = find_images(folder)
    try:
        images = torch.stack([bb.preprocess(load_image(files[i])) for i in _sample(len(files), n, seed, "images")])
    except ImageLoadError as exc:
        raise CompressError(f"calibration data: {exc}") from None
    source = {"kind": "image-folder", "images_dir": str(folder), "n_images": len(images), "n_texts": 0,
              "texts": "none"}
    texts = None
    if need_texts:
        print(f"warning: calib={folder} holds images only, so the text tower is calibrated on random token ids "
              f"(its OPTIN ranking is then close to arbitrary); pass a COCO captions .json or towers=image",
              flush=True)
        texts = random_tokens(bb, n, seed)
        source.update(n_texts=n, texts="random tokens")
    return Calibration(images, texts, source)


def calibration_batch(bb: Backbone, calib: str = "", n: int = 64, *, split: str = "train", images_dir: str = "",
                      seed: int = 0, need_texts: bool = True) -> Calibration:
    """``n`` preprocessed images and ``n`` tokenized captions (a seeded sample) from ``calib``.

    ``calib``: a COCO captions .json (images beside it or ``images_dir``), a data set root with
    annotations/captions_<split>.json, a plain folder of images (texts are then random tokens, with a
    warning), or empty for the shapes world (the cached training world, else a small generated one)."""
    if not calib:
        calib = str(default_calibration_root(n))
        print(f"calibrating on the shapes world at {calib} (pass calib=... for a model trained on other data)",
              flush=True)
    path = Path(calib)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise CompressError(f"calib={calib!r} is a file but not a COCO captions .json")
        return _from_captions(bb, path, Path(images_dir) if images_dir else _guess_images_dir(path), n, seed)
    ann = path / "annotations" / f"captions_{split}.json"
    if ann.is_file():
        return _from_captions(bb, ann, Path(images_dir) if images_dir else _guess_images_dir(ann), n, seed)
    if ann.parent.is_dir():  # a data set root without this split: a typo rather than a folder of images
        splits = sorted(p.stem[len("captions_"):] for p in ann.parent.glob("captions_*.json"))
        raise CompressError(f"calib={calib!r} has no {ann.name}; splits there: {', '.join(splits) or 'none'} "
                            f"(calib_split=...)")
    if not path.is_dir():
        raise CompressError(f"calib={calib!r} does not exist")
    return _from_folder(bb, path, n, seed, need_texts)


# ---- vlkit prune --------------------------------------------------------------------------------------
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _print_prune(report: dict[str, Any], out: Path) -> None:
    print(f"pruned {report['model']} with {report['method']} to {report['flops_target']:.0%} of the dense FLOPs")
    print(f"{'tower':6s} {'heads':>9s} {'neurons':>13s} {'FLOPs/input (counted)':>24s} {'ratio':>6s}")
    for tower, rep in report["towers"].items():
        heads = f"{sum(rep['kept_heads'])}/{sum(rep['total_heads'])}"
        neurons = f"{sum(rep['kept_neurons'])}/{sum(rep['total_neurons'])}"
        flops = f"{_si(rep['flops_before_counted'])} -> {_si(rep['flops_after_counted'])}"
        print(f"{tower:6s} {heads:>9s} {neurons:>13s} {flops:>24s} {rep['flops_ratio']:6.3f}")
    print(f"params {_si(report['params_before'])} -> {_si(report['params_after'])}")
    print(f"wrote the backbone to {out}/ (load_backbone('{out}')), prune_report.json and kept_units.png")


@command("prune", "prune heads and MLP neurons to a FLOP budget: vlkit prune model=... method=optin flops=0.6 "
                  "out=DIR", lambda a: _help("prune", PruneArgs, PRUNE_NOTE))
def _prune(args: list[str]) -> int:
    opts = parse_kv(args, PruneArgs)
    towers = _check_prune(opts)
    bb = _load(opts.model, opts.pretrained, opts.device)
    _check_towers_prunable(bb, towers)
    calib = Calibration(None, None, {"kind": "none", "note": f"{opts.method} uses no calibration data"})
    if opts.method == "optin":
        calib = calibration_batch(bb, opts.calib, opts.n_calib, split=opts.calib_split,
                                  images_dir=opts.calib_images, seed=opts.seed,
                                  need_texts="text" in towers).to(opts.device)
    from vlkit.compress import plot_kept_units, prune_backbone

    try:
        bb.model, report = prune_backbone(bb.model, opts.method, opts.flops, calib.images, calib.texts,
                                          towers=towers, seed=opts.seed, min_heads=opts.min_heads,
                                          min_neurons=opts.min_neurons, inplace=True)
    except (ValueError, NotImplementedError) as exc:  # e.g. a budget below the tower's fixed FLOPs
        raise CompressError(f"cannot prune {opts.model!r}: {exc}") from None
    out = Path(opts.out)
    bb.save(out)
    report.update(model=opts.model, backbone=bb.name, calibration=calib.source,
                  min_heads=opts.min_heads, min_neurons=opts.min_neurons)
    from vlkit.io import atomic_write_json

    atomic_write_json(out / "prune_report.json", report)
    plot_kept_units(report, out / "kept_units.png")
    _print_prune(report, out)
    return 0


# ---- vlkit sparsify -----------------------------------------------------------------------------------
def _check_sparsify(opts: SparsifyArgs) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
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


@command("sparsify", "zero weights by magnitude or N:M pattern: vlkit sparsify model=... pattern=2:4 out=DIR",
         lambda a: _help("sparsify", SparsifyArgs, SPARSIFY_NOTE))
def _sparsify(args: list[str]) -> int:
    opts = parse_kv(args, SparsifyArgs)
    pattern, towers = _check_sparsify(opts)
    bb = _load(opts.model, opts.pretrained)
    from vlkit.compress import apply_sparsity, make_permanent

    try:
        stats = apply_sparsity(bb.model, opts.amount, scope=opts.scope, towers=towers,
                               pattern=f"{pattern[0]}:{pattern[1]}" if pattern else None)
    except ValueError as exc:
        raise CompressError(f"cannot sparsify {opts.model!r}: {exc}") from None
    folded = make_permanent(bb.model)  # masks become plain zeros, so the weights save and reload as they are
    out = Path(opts.out)
    bb.save(out)
    report = {"model": opts.model, "backbone": bb.name, "pattern": opts.pattern if pattern else None,
              "amount": 1 - pattern[0] / pattern[1] if pattern else opts.amount, "scope": opts.scope,
              "towers": list(towers), "masks_folded": folded, **stats}
    from vlkit.io import atomic_write_json

    atomic_write_json(out / "sparsify_report.json", report)
    rates = [v["sparsity"] for v in stats["layers"].values()]
    print(f"sparsified {opts.model}: {stats['sparsity']:.1%} of {_si(stats['numel'])} weights are zero over "
          f"{len(rates)} weight matrices (per matrix {min(rates):.1%} .. {max(rates):.1%})")
    if stats["skipped"]:
        print(f"left dense (input size not a multiple of M): {', '.join(stats['skipped'])}")
    print(f"wrote the backbone to {out}/ and sparsify_report.json (dense storage: zeros save no memory or time "
          f"until a sparse kernel runs them)")
    return 0


# ---- vlkit export -------------------------------------------------------------------------------------
def _check_export(opts: ExportArgs) -> tuple[str, ...]:
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


def _print_export(report: dict[str, Any], out: Path) -> None:
    print(f"{'file':28s} {'size':>10s} {'max |onnx - torch|':>19s}")
    for tower in TOWERS:
        entry = report.get(tower)
        if entry is None:
            continue
        rows = [("path", "bytes", "max_abs_diff")] + ([("int8_path", "int8_bytes", "int8_max_abs_diff")]
                                                       if "int8_path" in entry else [])
        for path, size, diff in rows:
            print(f"{Path(entry[path]).name:28s} {entry[size] / 2**20:7.2f} MB {entry[diff]:19.2e}")
    print(f"wrote {out}/export_report.json (exporter: "
          f"{', '.join(sorted({report[t]['exporter'] for t in TOWERS if t in report}))})")


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    # onnxruntime's quantizer advises shape-inference pre-processing on every call (root logger, WARNING);
    # dynamic weight-only INT8 does not need it, and the line reads like a failure
    return not record.getMessage().startswith("Please consider to run pre-processing")


@command("export", "export the encoders to ONNX (+ INT8): vlkit export model=... quantize=int8 out=DIR",
         lambda a: _help("export", ExportArgs, EXPORT_NOTE))
def _export(args: list[str]) -> int:
    opts = parse_kv(args, ExportArgs)
    towers = _check_export(opts)
    bb = _load(opts.model, opts.pretrained)
    from vlkit.compress import export_onnx

    out = Path(opts.out)
    root_log = logging.getLogger()
    root_log.addFilter(_quiet_quantizer)
    try:
        report = export_onnx(bb.model, out, quantize=None if opts.quantize == "none" else opts.quantize,
                             dynamo=opts.exporter == "dynamo", opset=opts.opset, check_batch=opts.check_batch,
                             towers=towers)
    except (ImportError, ValueError) as exc:  # onnx missing; sizes that do not fit the model
        raise CompressError(f"cannot export {opts.model!r}: {exc}") from None
    finally:
        root_log.removeFilter(_quiet_quantizer)
    import open_clip

    report.update(model=opts.model, backbone=bb.name, inputs={
        "image_size": bb.image_size, "context_length": bb.context_length, "normalized_outputs": True,
        "mean": list(bb.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(bb.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))})
    from vlkit.io import atomic_write_json

    atomic_write_json(out / "export_report.json", report)
    _print_export(report, out)
    return 0
