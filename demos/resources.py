"""What `vlkit demo` loads before it serves: the backbone, the index (a cached default one when none is
given), the segmenter and the example images."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlkit.backbone import Backbone, load_backbone
from vlkit.data.coco import caption_texts
from vlkit.data.images import find_images
from vlkit.errors import VlkitError
from vlkit.index import IndexMismatchError
from vlkit.index.retriever import MANIFEST, Retriever

DEFAULT_MODEL = "cached:vlkit-tiny-shapes"
SHARED_COCO_MINI = Path("/work/shared/data/coco-mini")  # the team's shared copy; VLKIT_COCO_MINI overrides
COCO_SPLITS = ("val2017", "train2017")
N_EXAMPLES = 4


def coco_mini_root(value: str = "") -> Path | None:
    """``coco=`` of the command: a folder, ``none``, or empty for VLKIT_COCO_MINI / the shared copy if present."""
    if value.lower() == "none":
        return None
    root = Path(value or os.environ.get("VLKIT_COCO_MINI", "") or SHARED_COCO_MINI)
    if (root / "annotations").is_dir():
        return root
    if value:
        raise VlkitError(f"coco={value}: no COCO folder there (expected annotations/ and train2017/, val2017/)")
    return None


def demo_world() -> Path:
    """The shapes world whose test split the default index holds: the default world when it is already
    cached (training the default backbone makes it), else a test-split-only world made once (seconds)."""
    from omegaconf import OmegaConf

    from vlkit.cache import WORLD_VERSION, cache_root, shapes_dir
    from vlkit.config import DataConfig
    from vlkit.data.shapes import generate_shapes
    from vlkit.io import atomic_directory

    default = shapes_dir(OmegaConf.structured(DataConfig))
    if (default / "annotations").is_dir():
        return default
    root = cache_root() / "demo" / f"{WORLD_VERSION}-test-px64-seed0"
    if not (root / "annotations").is_dir():
        print(f"generating the demo's shapes images into {root} (once) ...", flush=True)
        with atomic_directory(root) as tmp:  # per-image RNG: the same images as the default world's test split
            generate_shapes(tmp, n_train=0, n_val=0, n_test=1000, n_czsl_per_pair=0, progress=False)
    return root


def _collections(world: Path, coco: Path | None) -> list[tuple[str, list[Path], list[str]]]:
    """(name, image files, captions) of every collection the default index holds."""
    out = [("shapes", [p.resolve() for p in find_images(world / "images" / "test")],
            caption_texts(world / "annotations" / "captions_test.json"))]
    for split in COCO_SPLITS if coco is not None else ():
        captions = coco / "annotations" / f"captions_{split}.json"
        if (coco / split).is_dir() and captions.is_file():
            out.append((f"coco-{split}", [p.resolve() for p in find_images(coco / split)], caption_texts(captions)))
    return out


def default_index(backbone: Backbone, world: Path, coco: Path | None) -> Retriever:
    """The shapes test split (and coco-mini) embedded with ``backbone``, built once per backbone under
    ``$VLKIT_CACHE/demo/``, with their captions as the text index."""
    from vlkit.cache import cache_root

    tag = backbone.identity.rsplit(":", 1)[-1] + ("-coco" if coco is not None else "")
    out = cache_root() / "demo" / f"index-{tag}"
    if (out / MANIFEST).is_file():
        try:
            return Retriever.load(out, backbone=backbone, progress=False)
        except (VlkitError, IndexMismatchError, ValueError) as exc:  # a stale or damaged cache: rebuild it
            print(f"rebuilding the demo index {out}: {exc}", flush=True)
    print(f"building the demo index {out} (once) ...", flush=True)
    retriever = Retriever(backbone, num_workers=0)
    for name, files, captions in _collections(world, coco):
        retriever.add_images(files)
        retriever.add_texts(captions, metadata=[{"text": c, "source": name} for c in captions])
    retriever.save(out)
    return retriever


def open_index(index: str, backbone: Backbone) -> tuple[Retriever | None, str]:
    """Load ``index`` for ``backbone``; an index built with another backbone gives (None, the reason) so
    the page can say so while segmentation keeps working. Anything else that is wrong fails here."""
    try:
        return Retriever.load(index, backbone=backbone, progress=False), ""
    except IndexMismatchError as exc:
        return None, (f"The index does not match the loaded backbone. {exc}. Start the demo with the model "
                      f"the index was built with (model=...), or leave model= out to use the index's own.")


def index_backbone(index: str) -> Backbone:
    """The backbone an index records in its manifest (the default model when ``index=`` is given)."""
    manifest = Path(index) / MANIFEST
    if not manifest.is_file():
        raise VlkitError(f"index={index} is not a vlkit index (no {MANIFEST}); build one with `vlkit index`")
    source = json.loads(manifest.read_text()).get("backbone_source", "")
    try:
        return load_backbone(source)
    except VlkitError as exc:
        raise VlkitError(f"the backbone recorded in {manifest} ({source!r}) cannot be loaded ({exc}); "
                         "pass model=... (the one the index was built with)") from exc


def shapes_examples(world: Path, n: int = N_EXAMPLES) -> list[tuple[str, str]]:
    """The first test images of a shapes world, each with the colour and shape of its first object."""
    data = json.loads((world / "annotations" / "instances_test.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    first: dict[int, dict[str, Any]] = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a)
    out = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        a = first.get(img["id"])
        if a is not None:
            query = f"{a.get('color', '')} {names[a['category_id']]}".strip()
            out.append((str((world / "images" / "test" / img["file_name"]).resolve()), query))
    return out[:n]


def coco_examples(coco: Path, n: int = 2, split: str = "val2017") -> list[tuple[str, str]]:
    """The first ``n`` images of a COCO split, each with the category of its largest object."""
    ann = coco / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        return []
    data = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    largest: dict[int, dict[str, Any]] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd") and a["area"] > largest.get(a["image_id"], {"area": 0})["area"]:
            largest[a["image_id"]] = a
    out = [(str((coco / split / img["file_name"]).resolve()), names[largest[img["id"]]["category_id"]])
           for img in sorted(data["images"], key=lambda i: i["id"]) if img["id"] in largest]
    return [e for e in out if Path(e[0]).is_file()][:n]


def example_queries(world: Path, coco: Path | None) -> list[str]:
    """A few real captions to try: three from the shapes world, two from coco-mini when present."""
    queries = caption_texts(world / "annotations" / "captions_test.json")[:15:5]
    if coco is not None and (coco / "annotations" / "captions_val2017.json").is_file():
        queries += caption_texts(coco / "annotations" / "captions_val2017.json")[:10:5]
    return queries


def prepare_app(opts: Any, runs: dict[str, str] | None = None) -> Any:
    """Everything `vlkit demo` needs, loaded (or built once and cached), as an unlaunched app. ``runs``: trained
    runs for plugin tabs by their key (``vlkit demo ufo=RUN``)."""
    from vlkit.cli.common import load_model_arg
    from vlkit.demos.app import build_app, load_tabs

    coco = coco_mini_root(opts.coco)
    if opts.model:
        backbone = load_model_arg(opts.model, opts.pretrained)
    else:
        backbone = index_backbone(opts.index) if opts.index else load_model_arg(DEFAULT_MODEL)
    world = demo_world()
    if opts.index:
        retriever, index_error = open_index(opts.index, backbone)
    else:
        retriever, index_error = default_index(backbone, world, coco), ""
    examples = shapes_examples(world) + (coco_examples(coco) if coco is not None else [])
    return build_app(retriever, load_tabs(backbone, runs), index_error=index_error, examples=examples,
                     queries=example_queries(world, coco), k=opts.k)
