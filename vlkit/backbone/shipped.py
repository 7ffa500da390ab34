"""Trained backbones shipped inside the package: a saved backbone folder (fp16 safetensors + vlkit's JSON)
under ``vlkit/backbone/weights/NAME/``, listed with its sha256 in ``weights/shipped.json``.

``model.name=cached:NAME`` resolves to a shipped backbone first (no training, no network), its weights'
sha256 checked on every load. A shipped folder is (re)built from a trained backbone by

    python -m vlkit.backbone.shipped runs/<retrieval run>/backbone --name vlkit-tiny-shapes

which stores fp16 weights when the embeddings stay within ``FP16_MIN_COSINE`` of fp32 (fp32 otherwise),
and records the hash, the tolerance measured and the run's metrics in the manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from vlkit.backbone.core import SAVED_WEIGHTS, Backbone, BackboneError, load_backbone
from vlkit.io import atomic_write_json, sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "shipped.json"
# fp16 is kept when every probe embedding has at least this cosine to the fp32 one
FP16_MIN_COSINE = 0.9995
MAX_BYTES = 20 * 2**20


sha256_of = sha256_file


def manifest(root: Path = WEIGHTS_DIR) -> dict[str, dict[str, Any]]:
    """name -> record (sha256, dtype, bytes, metrics, command) of every shipped backbone."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BackboneError(f"{path} is not valid JSON ({e}): reinstall vlkit") from e


def shipped_names(root: Path = WEIGHTS_DIR) -> list[str]:
    return sorted(manifest(root))


def shipped_backbone(name: str, root: Path = WEIGHTS_DIR) -> Path:
    """The folder of shipped backbone ``name`` after checking its weights against the recorded sha256."""
    records = manifest(root)
    if name not in records:
        raise BackboneError(f"no shipped backbone {name!r}; shipped: {', '.join(sorted(records)) or 'none'}")
    folder = root / name
    weights = folder / SAVED_WEIGHTS
    if not weights.is_file():
        raise BackboneError(f"the shipped backbone {name!r} has no {weights}: reinstall vlkit")
    digest = sha256_of(weights)
    if digest != records[name]["sha256"]:
        raise BackboneError(
            f"{weights} has sha256 {digest[:16]}..., not the shipped {records[name]['sha256'][:16]}...: the file "
            f"was changed or damaged; reinstall vlkit (or rebuild it: python -m vlkit.backbone.shipped RUN/backbone)"
        )
    return folder


def _probe(backbone: Backbone, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of fixed random inputs: enough to see what a cast does to the outputs."""
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    words = ["a", "red", "blue", "circle", "square", "star", "to", "the", "left", "of", "two", "shapes"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g)) for _ in range(n)]
    with torch.no_grad():
        return backbone.encode_image(images), backbone.encode_text(backbone.tokenize(texts))


def ship(source: str | Path, name: str, root: Path = WEIGHTS_DIR, metrics: dict[str, Any] | None = None,
         command: str = "") -> dict[str, Any]:
    """Write backbone ``source`` (a saved folder) as shipped backbone ``name`` under ``root`` and record it."""
    backbone = load_backbone(source)
    backbone.eval()
    ref = _probe(backbone)
    half = load_backbone(source)
    half.eval()
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(p.half().float())
    cosine = min(float(torch.nn.functional.cosine_similarity(a, b).min()) for a, b in zip(ref, _probe(half)))
    dtype = torch.float16 if cosine >= FP16_MIN_COSINE else None
    folder = backbone.save(root / name, dtype=dtype)
    size = (folder / SAVED_WEIGHTS).stat().st_size
    if size > MAX_BYTES:
        raise BackboneError(f"{name}: {size / 2**20:.1f} MiB of weights is over the {MAX_BYTES // 2**20} MiB limit")
    records = manifest(root)
    records[name] = {
        "sha256": sha256_of(folder / SAVED_WEIGHTS),
        "dtype": "float16" if dtype else "float32",
        "bytes": size,
        "min_cosine_to_fp32": round(cosine, 6),
        "identity": load_backbone(folder).identity,
        "metrics": metrics or {},
        "command": command,
    }
    atomic_write_json(root / MANIFEST, records)
    return records[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="store a trained backbone as a shipped vlkit backbone")
    ap.add_argument("backbone", help="a saved backbone folder (runs/<retrieval run>/backbone)")
    ap.add_argument("--name", default="vlkit-tiny-shapes")
    ap.add_argument("--root", default=str(WEIGHTS_DIR), help="where shipped backbones live (the package)")
    ap.add_argument("--command", default="vlkit train plugin=retrieval", help="the command that trained it")
    args = ap.parse_args(argv)
    run_metrics = Path(args.backbone).parent / "metrics.json"
    metrics = json.loads(run_metrics.read_text()) if run_metrics.is_file() else {}
    keep = {split: {k: v for k, v in metrics.get(split, {}).items() if not k.startswith("n_")}
            for split in ("val", "test") if split in metrics}
    record = ship(args.backbone, args.name, Path(args.root), keep, args.command)
    print(json.dumps({args.name: record}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
