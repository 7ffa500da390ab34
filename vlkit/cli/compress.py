"""`vlkit prune`, `vlkit sparsify` and `vlkit export` (registered with the CLI on import; torch and
vlkit.compress are imported inside the commands, so the CLI starts fast)."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlkit.cli.common import Command, kv_help, load_model_arg
from vlkit.cli.compress_args import (
    EXPORT_NOTE,
    PRUNE_NOTE,
    SPARSIFY_NOTE,
    TOWERS,
    ExportArgs,
    PruneArgs,
    SparsifyArgs,
    check_export,
    check_prune,
    check_sparsify,
)
from vlkit.config import parse_kv
from vlkit.errors import CompressError

if TYPE_CHECKING:  # torch and the backbone are imported inside the commands: the CLI starts fast
    from vlkit.backbone import Backbone


# ---- the backbone (loaded once the checks in vlkit.cli.compress_args pass) -------------------------------
def _load(name: str, pretrained: str | None, device: str = "cpu") -> Backbone:
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


# ---- vlkit prune --------------------------------------------------------------------------------------
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _print_prune(report: dict[str, Any], out: Path) -> None:
    whose = "the towers' summed" if report.get("budget") == "model" else "each tower's"
    print(f"pruned {report['model']} with {report['method']} to {report['flops_target']:.0%} of {whose} dense FLOPs")
    if "split" in report:
        tried = ", ".join(f"{'/'.join(f'{v:.2f}' for v in r['fractions'].values())}: {r['damage']:.4f}"
                          for r in report["split"]["tried"])
        print(f"split between {' / '.join(report['split']['fractions'])} (kept fractions) chosen on "
              f"{report['split']['n_pairs']} held-out caption pairs by relation KL to the dense model: {tried}")
    print(f"{'tower':6s} {'heads':>9s} {'neurons':>13s} {'FLOPs/input (counted)':>24s} {'ratio':>6s}")
    for tower, rep in report["towers"].items():
        heads = f"{sum(rep['kept_heads'])}/{sum(rep['total_heads'])}"
        neurons = f"{sum(rep['kept_neurons'])}/{sum(rep['total_neurons'])}"
        flops = f"{_si(rep['flops_before_counted'])} -> {_si(rep['flops_after_counted'])}"
        print(f"{tower:6s} {heads:>9s} {neurons:>13s} {flops:>24s} {rep['flops_ratio']:6.3f}")
    mf = report["model_flops"]
    print(f"all pruned towers: FLOPs {_si(mf['before_counted'])} -> {_si(mf['after_counted'])} ({mf['ratio']:.3f}); "
          f"params {_si(report['params_before'])} -> {_si(report['params_after'])}")
    refit = report.get("reconstruction")
    if isinstance(refit, str):
        print(f"least-squares refit {refit}")
    for tower, fits in (refit.get("fits", {}) if isinstance(refit, dict) else {}).items():
        errs = ", ".join(f"{'attn' if f['module'] == 'attention' else 'mlp'}{f['block']} "
                         f"{f['err_before']:.2f}->{f['err_after']:.2f}" for f in fits)
        print(f"least-squares refit, {tower} (relative error of each pruned module): {errs or 'nothing pruned'}")
    print(f"wrote the backbone to {out}/ (load_backbone('{out}')), prune_report.json and kept_units.png")


def _prune(args: list[str]) -> int:
    opts = parse_kv(args, PruneArgs)
    towers = check_prune(opts)
    bb = _load(opts.model, opts.pretrained, opts.device)
    if getattr(bb, "kind", "clip") == "mllm":
        if opts.budget != "tower":
            raise CompressError(f"budget={opts.budget} splits FLOPs between a CLIP model's image and text towers; "
                                f"{bb.name} is an MLLM: prune it with budget=tower")
        return _prune_mllm(bb, opts, towers)
    _check_towers_prunable(bb, towers)
    from vlkit.compress.calibration import Calibration, calibration_batch

    calib = Calibration(None, None, {"kind": "none", "note": f"{opts.method} uses no calibration data"})
    if opts.method == "optin":
        calib = calibration_batch(bb, opts.calib, opts.n_calib, split=opts.calib_split,
                                  images_dir=opts.calib_images, seed=opts.seed,
                                  need_texts="text" in towers).to(opts.device)
    refit = _reconstruction_inputs(bb, opts, towers)
    select = _split_inputs(bb, opts, towers)
    from vlkit.compress import plot_kept_units, prune_backbone

    try:
        bb.model, report = prune_backbone(bb.model, opts.method, opts.flops, calib.images, calib.texts,
                                          towers=towers, seed=opts.seed, min_heads=opts.min_heads,
                                          min_neurons=opts.min_neurons, inplace=True,
                                          reconstruct_on=refit.inputs if refit else None, ridge=opts.ridge,
                                          budget=opts.budget, select_on=select.inputs if select else None)
    except (ValueError, NotImplementedError) as exc:  # e.g. a budget below the tower's fixed FLOPs
        raise CompressError(f"cannot prune {opts.model!r}: {exc}") from None
    out = Path(opts.out)
    bb.save(out)
    if refit is not None and "reconstruction" in report:
        report["reconstruction"]["calibration"] = refit.source
    if select is not None and "split" in report:
        report["split"]["calibration"] = select.source
    report.update(model=opts.model, backbone=bb.name, calibration=calib.source,
                  min_heads=opts.min_heads, min_neurons=opts.min_neurons)
    from vlkit.io import atomic_write_json

    if opts.recover_steps:
        report["recovery"] = _recover(opts, out, bb)
    atomic_write_json(out / "prune_report.json", report)
    plot_kept_units(report, out / "kept_units.png")
    _print_prune(report, out)
    return 0


@dataclass
class _Sample:
    inputs: dict[str, Any]
    source: dict[str, Any]


# the held-out pairs that compare FLOP splits are drawn with another seed than the refit's and OPTIN's samples
SPLIT_SEED_OFFSET = 7919


def _split_inputs(bb: Backbone, opts: PruneArgs, towers: tuple[str, ...]) -> _Sample | None:
    """The image-caption pairs on which budget=model compares splits of the FLOPs between the towers, or None
    (budget=tower, or a single tower). Random tokens have no relation to the images: captions are required."""
    if opts.budget != "model" or len(towers) < 2:
        return None
    from vlkit.compress.calibration import calibration_batch

    pairs = calibration_batch(bb, opts.calib, opts.split_calib, split=opts.calib_split, images_dir=opts.calib_images,
                              seed=opts.seed + SPLIT_SEED_OFFSET, need_texts=True).to(opts.device)
    if pairs.source.get("texts") != "captions":
        raise CompressError(f"budget=model compares splits on images and their captions, and calib={opts.calib!r} "
                            f"has no captions: pass a COCO captions .json or a data set root (or budget=tower)")
    return _Sample({"image": pairs.images, "text": pairs.texts}, pairs.source)


def _reconstruction_inputs(bb: Backbone, opts: PruneArgs, towers: tuple[str, ...]) -> _Sample | None:
    """The calibration sample the least-squares refit runs on (``reconstruct`` images and captions), or None.
    A tower without real inputs (captions, for a folder of images) is left out: random tokens are no target."""
    if not opts.reconstruct:
        return None
    from vlkit.compress.calibration import calibration_batch

    calib = calibration_batch(bb, opts.calib, opts.reconstruct, split=opts.calib_split,
                              images_dir=opts.calib_images, seed=opts.seed,
                              need_texts="text" in towers).to(opts.device)
    inputs = {"image": calib.images}
    if calib.source.get("texts") == "captions":
        inputs["text"] = calib.texts
    return _Sample({t: inputs[t] for t in towers if t in inputs}, calib.source)


def _recover(opts: PruneArgs, out: Path, pruned: Backbone) -> dict[str, Any]:
    """Distil the pruned backbone saved in ``out`` from the unpruned ``opts.model`` through the training of the
    plugin that provides a recovery recipe (Accelerate engine, checkpoints, resume), then save the result over
    ``out``."""
    from vlkit.backbone import load_backbone
    from vlkit.cli.common import resolve_config
    from vlkit.engine.run import train
    from vlkit.plugins import plugin_with

    recipe = plugin_with("recovery", "recovery by distillation (recover_steps)")
    if getattr(pruned, "kind", "clip") not in recipe.backbones:
        raise CompressError(f"recover_steps trains with the {recipe.name} plugin, which does not run on "
                            f"{getattr(pruned, 'kind', 'clip')} backbones; recover through a task of your own "
                            f"(vlkit train plugin=... model.name=OUT)")
    run_dir = out.with_name(out.name + ".recover")
    overrides = [f"plugin={recipe.name}", f"model.name={out.absolute()}",
                 *recipe.recovery(opts.recover_teacher or opts.model, opts.recover_task_weight, opts.recover_blocks),
                 "train.epochs=0", f"train.max_steps={opts.recover_steps}", f"train.batch_size={opts.recover_batch}",
                 f"optim.lr={opts.recover_lr}", f"optim.warmup_steps={max(1, opts.recover_steps // 10)}",
                 f"train.seed={opts.seed}", f"run.dir={run_dir}"]
    if opts.recover_data:  # a shapes world (its own layout) or any COCO-captions root
        root = Path(opts.recover_data).absolute()
        shapes = (root / "annotations" / "captions_train.json").is_file()
        overrides += [f"data.root={root}"] if shapes else ["data=coco", f"data.root={root}"]
    overrides += shlex.split(opts.recover_train)
    print(f"recovering by distillation: vlkit train {' '.join(overrides)}")
    plugin, cfg = resolve_config(overrides)
    metrics = train(cfg, plugin)
    recovered = load_backbone(run_dir / "backbone")
    recovered.save(out)  # atomic: out holds the pruned or the recovered backbone, never a mix
    return {"steps": opts.recover_steps, "run_dir": str(run_dir), "command": "vlkit train " + " ".join(overrides),
            "val": metrics.get("val", {}), "test": metrics.get("test", {})}


def _prune_mllm(bb: Backbone, opts: PruneArgs, towers: tuple[str, ...]) -> int:
    """vlkit prune on an MLLM backbone: heads and neurons of its vision tower and language model."""
    from vlkit.compress import plot_kept_units
    from vlkit.compress.hf_prune import prune_mllm
    from vlkit.io import atomic_write_json

    try:
        report = prune_mllm(bb, opts.method, opts.flops, towers=towers, seed=opts.seed, min_heads=opts.min_heads,
                            min_neurons=opts.min_neurons)
    except (ValueError, NotImplementedError) as exc:
        raise CompressError(f"cannot prune {opts.model!r}: {exc}") from None
    if opts.reconstruct:
        report["reconstruction"] = "not run: it covers open_clip towers only (the MLLM is pruned as selected)"
    out = Path(opts.out)
    bb.save(out)
    report.update(model=opts.model, backbone=bb.name, calibration={"kind": "none", "note": "weights only"},
                  min_heads=opts.min_heads, min_neurons=opts.min_neurons)
    atomic_write_json(out / "prune_report.json", report)
    plot_kept_units(report, out / "kept_units.png")
    _print_prune(report, out)
    return 0


# ---- vlkit sparsify -----------------------------------------------------------------------------------
def _sparsify(args: list[str]) -> int:
    opts = parse_kv(args, SparsifyArgs)
    pattern, towers = check_sparsify(opts)
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


def _export(args: list[str]) -> int:
    opts = parse_kv(args, ExportArgs)
    towers = check_export(opts)
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


PRUNE = Command(_prune, "prune heads and MLP neurons to a FLOP budget", lambda a: kv_help("prune", PruneArgs, PRUNE_NOTE))
SPARSIFY = Command(_sparsify, "zero weights by magnitude or N:M pattern",
                   lambda a: kv_help("sparsify", SparsifyArgs, SPARSIFY_NOTE))
EXPORT = Command(_export, "export the encoders to ONNX (+ INT8)", lambda a: kv_help("export", ExportArgs, EXPORT_NOTE))
