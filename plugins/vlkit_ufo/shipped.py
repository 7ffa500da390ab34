"""The trained ufo head shipped inside the package, for the shipped default backbone.

``vlkit_ufo/weights/NAME/`` holds ``head.safetensors`` (the head's weights) and ``head.json`` (sealed: the
run's ``ufo`` settings, the backbone it was trained on with that backbone's identity, the weights'
sha256, the run's test metrics and the command that made it). ``Segmenter.shipped()``, ``segment()``
without a backbone, ``vlkit segment`` without ``checkpoint=`` and the demo's segmentation tab use it.
A shipped head is (re)built from a finished ``vlkit train plugin=ufo`` run by

    python -m vlkit_ufo.shipped runs/<ufo run> [--name shapes-head]

which takes the run's best checkpoint and refuses a run whose backbone weights were tuned (LoRA or a
fine-tuned image tower): only a head on the shipped backbone as it is can ship without a second backbone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError
from vlkit.io import atomic_directory, file_digests, read_json_file, seal, unseal, verify_digests

DEFAULT_HEAD = "shapes-head"  # the head shipped in vlkit_ufo/weights
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HEAD_WEIGHTS, HEAD_META = "head.safetensors", "head.json"
MAX_BYTES = 20 * 2**20
_FIX = "reinstall vlkit, or rebuild it: python -m vlkit_ufo.shipped RUN_DIR"


def run_threshold(run: Path, default: float = 0.5) -> float:
    """The F1-best score threshold on val of a ufo run (its latest ``eval_val.json``, else ``metrics.json``)."""
    for name, key in (("eval_val.json", None), ("metrics.json", "val")):
        try:
            data = json.loads((run / name).read_text())
        except (OSError, ValueError):
            continue
        metrics = data.get(key or "val", data) if isinstance(data, dict) else {}
        value = metrics.get("segm/F1_threshold") if isinstance(metrics, dict) else None
        if isinstance(value, int | float):
            return float(value)
    return default


def shipped_head(name: str = DEFAULT_HEAD, root: Path = WEIGHTS_DIR) -> tuple[dict[str, Any], Path]:
    """(metadata, weights path) of shipped head ``name``, after checking its seal and sha256."""
    folder = root / name
    if not (folder / HEAD_META).is_file():
        known = sorted(p.name for p in root.iterdir() if (p / HEAD_META).is_file()) if root.is_dir() else []
        raise VlkitError(f"no shipped ufo head {name!r}; shipped: {', '.join(known) or 'none'}")
    meta = unseal(read_json_file(folder / HEAD_META, VlkitError, _FIX), folder / HEAD_META, _FIX)
    verify_digests(folder, meta.get("files"), _FIX)
    return meta, folder / HEAD_WEIGHTS


def ship(run: str | Path, name: str = DEFAULT_HEAD, root: Path = WEIGHTS_DIR, prefer: str = "best",
         command: str = "") -> dict[str, Any]:
    """Write the head of ufo run ``run`` (its ``prefer`` checkpoint) as shipped head ``name``."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from vlkit.engine.checkpoint import WEIGHTS_FILE, find_checkpoint

    run = Path(run)
    cfg = OmegaConf.load(run / "config.yaml")
    if cfg.get("plugin") != "ufo" or cfg.ufo.method != "head":
        raise VlkitError(f"{run} is not a trained ufo head run (plugin=ufo, ufo.method=head)")
    checkpoint = find_checkpoint(run, prefer)
    state = load_file(str(checkpoint / WEIGHTS_FILE))
    if any(k.startswith("backbone.") for k in state):
        raise VlkitError(f"{run} tuned its backbone (LoRA or a fine-tuned image tower); only a head trained on "
                         f"the frozen shipped backbone can ship")
    head = {k[len("decoder."):]: v.contiguous() for k, v in state.items() if k.startswith("decoder.")}
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    for split in ("val", "test"):  # a later `vlkit eval checkpoint=RUN split=...` has the newest figures
        later = run / f"eval_{split}.json"
        if later.is_file():
            data = json.loads(later.read_text())
            metrics[split] = data.get(split, data)
    from vlkit.engine.run import load_model, set_seed

    set_seed(cfg.train.seed)  # as the run did: a randomly initialised backbone gets the run's weights
    identity = load_model(cfg.model).identity
    with atomic_directory(root / name) as tmp:
        save_file(head, str(tmp / HEAD_WEIGHTS))
        size = (tmp / HEAD_WEIGHTS).stat().st_size
        if size > MAX_BYTES:
            raise VlkitError(f"{name}: {size / 2**20:.1f} MiB is over the {MAX_BYTES // 2**20} MiB limit")
        meta = {
            "format": "vlkit-ufo-head", "version": 1,
            "ufo": OmegaConf.to_container(cfg.ufo, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "backbone_identity": identity,
            "seed": int(cfg.train.seed),
            "threshold": run_threshold(run),
            "bytes": size,
            "files": file_digests(tmp, [HEAD_WEIGHTS]),
            "metrics": {k: metrics[k] for k in ("test", "val", "best") if k in metrics},
            "checkpoint": f"{checkpoint.name} (step {_checkpoint_step(checkpoint)})",
            "command": command,
        }
        (tmp / HEAD_META).write_text(json.dumps(seal(meta), indent=2, sort_keys=True))
    return meta


def _checkpoint_step(checkpoint: Path) -> Any:
    state = checkpoint / "trainer_state.json"
    try:
        return json.loads(state.read_text()).get("step", "?")
    except (OSError, ValueError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ship a trained ufo run's head inside the package")
    ap.add_argument("run", help="a finished `vlkit train plugin=ufo` run folder")
    ap.add_argument("--name", default=DEFAULT_HEAD)
    ap.add_argument("--prefer", default="best", choices=["best", "last"])
    ap.add_argument("--command", default="", help="the training command, recorded in head.json")
    args = ap.parse_args(argv)
    meta = ship(args.run, args.name, prefer=args.prefer, command=args.command)
    print(f"shipped {args.name}: {meta['bytes'] / 2**20:.2f} MiB, sha256 {meta['files'][HEAD_WEIGHTS][:16]}..., "
          f"backbone {meta['backbone_identity']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
