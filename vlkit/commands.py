"""The commands beside train/eval/plugins: data generation, indexing, search, pruning, export, demo."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.cli import command
from vlkit.config import bounded, describe, parse_kv


@dataclass
class ShapesArgs:
    out: str = "data/shapes"
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    image_size: int = 64
    seed: int = 0


def _kv_help(verb: str, schema: type) -> str:
    return "\n".join([f"usage: vlkit {verb} key=value ...", "", "keys (type = default):", *describe(schema)])


@command("data", "write a data set: vlkit data shapes out=DIR [n_train=.. n_val=.. n_test=.. image_size=.. seed=..]",
         lambda a: _kv_help("data shapes", ShapesArgs))
def _data(args: list[str]) -> int:
    from vlkit.errors import VlkitError

    if not args or args[0] != "shapes":
        raise VlkitError("usage: vlkit data shapes out=DIR [...]; 'shapes' is the one generator so far")
    opts = parse_kv(args[1:], ShapesArgs)
    from vlkit.data.shapes import generate_shapes

    summary = generate_shapes(opts.out, n_train=opts.n_train, n_val=opts.n_val, n_test=opts.n_test,
                              image_size=opts.image_size, seed=opts.seed)
    print(summary)
    return 0


@dataclass
class IndexArgs:
    images: str = ""
    out: str = ""
    # a saved backbone folder, an open_clip name, or cached:NAME (a trained default from vlkit's cache)
    model: str = "cached:vlkit-tiny-shapes"
    pretrained: str | None = None
    # a COCO captions file whose captions become the text index (image -> text search)
    captions: str = ""
    # flat (exact) or a faiss factory string such as HNSW32 or IVF1024,PQ32
    kind: str = "flat"
    batch_size: int = bounded(64, 1)
    # image-decoding worker processes; -1 = one per two CPU cores (1 to 4), 0 = decode in the main process
    workers: int = -1
    # encode images with int8 linear layers (CPU only): 1.2-1.5x faster, embeddings at cosine ~0.9998 to fp32
    int8: bool = False
    progress: bool = True


@dataclass
class SearchArgs:
    index: str = ""
    text: str = ""
    image: str = ""
    k: int = bounded(5, 1)
    # images: text/image -> images; texts: image/text -> captions
    target: str = "images"


def load_model_arg(name: str, pretrained: str | None = None):
    from omegaconf import OmegaConf

    from vlkit.engine.run import load_model

    return load_model(OmegaConf.create({"name": name, "pretrained": pretrained}))


@command("index", "embed a folder of images into a search index: vlkit index images=DIR out=INDEX [model=...]",
         lambda a: _kv_help("index", IndexArgs))
def _index(args: list[str]) -> int:
    from vlkit.errors import VlkitError
    from vlkit.sharded import build_index

    opts = parse_kv(args, IndexArgs)
    if not opts.images or not opts.out:
        raise VlkitError("vlkit index needs images=DIR and out=INDEX_DIR")
    retriever, report = build_index(opts)
    if retriever is not None:
        print(f"indexed {len(retriever.indexes['images'])} images into {opts.out}; {report.summary()}")
    return 0


@command("search", "search an index: vlkit search index=DIR text=\"a red circle\" k=5 (or image=PATH)",
         lambda a: _kv_help("search", SearchArgs))
def _search(args: list[str]) -> int:
    from vlkit.retriever import Retriever, iter_hits

    opts = parse_kv(args, SearchArgs)
    retriever = Retriever.load(opts.index, progress=False)
    hits = retriever.search(text=opts.text or None, image=opts.image or None, k=opts.k, target=opts.target)
    for line in iter_hits(hits):
        print(line)
    return 0


@dataclass
class SegmentArgs:
    image: str = ""
    query: str = ""
    # a ufo run folder (or its checkpoints/best|last folder); empty: the head shipped with vlkit, on the
    # shipped backbone
    checkpoint: str = ""
    out: str = "overlay.png"
    # instances scoring above it are kept; < 0: the head's F1-best score threshold on val (0.5 training-free)
    threshold: float = -1.0


@command("segment", "segment a free-text query in an image: vlkit segment image=X query=\"red circle\" [checkpoint=RUN]",
         lambda a: _kv_help("segment", SegmentArgs))
def _segment(args: list[str]) -> int:
    from vlkit.errors import VlkitError
    from vlkit.plugins import get_plugin

    opts = parse_kv(args, SegmentArgs)
    if not opts.image or not opts.query.strip():
        raise VlkitError("vlkit segment needs image=PATH and a non-empty query=TEXT (checkpoint=RUN_DIR is optional: "
                         "without it the head shipped with vlkit runs on the shipped backbone)")
    threshold = opts.threshold if opts.threshold >= 0 else None
    get_plugin("ufo").demo(opts.image, opts.query, opts.checkpoint, out=opts.out, threshold=threshold)
    return 0


@dataclass
class CaptionArgs:
    # an image file, or a folder (every image in it is captioned)
    image: str = ""
    # an MLLM backbone: the shipped tiny LLaVA by default; a run's backbone folder, hf:FOLDER, ...
    model: str = "cached:vlkit-tiny-llava-shapes"
    max_new_tokens: int = bounded(40, 1)
    batch_size: int = bounded(32, 1)


@command("caption", "describe an image with an MLLM backbone: vlkit caption image=PATH [model=...]",
         lambda a: _kv_help("caption", CaptionArgs))
def _caption(args: list[str]) -> int:
    from pathlib import Path

    import torch

    from vlkit.data.images import find_images, load_image
    from vlkit.errors import VlkitError

    opts = parse_kv(args, CaptionArgs)
    if not opts.image:
        raise VlkitError("vlkit caption needs image=PATH (a file or a folder of images)")
    path = Path(opts.image)
    if not path.exists():
        raise VlkitError(f"image={opts.image!r} does not exist")
    files = find_images(path) if path.is_dir() else [path]
    if not files:
        raise VlkitError(f"{opts.image!r} holds no images (png, jpg, ...)")
    backbone = load_model_arg(opts.model)
    if getattr(backbone, "kind", "clip") != "mllm":
        raise VlkitError(f"model={opts.model!r} is a CLIP backbone, which cannot write text; caption needs an MLLM "
                         "(model=cached:vlkit-tiny-llava-shapes, a caption run's backbone folder, or hf:FOLDER)")
    backbone.eval()
    for i in range(0, len(files), opts.batch_size):
        chunk = files[i:i + opts.batch_size]
        images = torch.stack([backbone.preprocess(load_image(f)) for f in chunk])
        for f, text in zip(chunk, backbone.generate_captions(images, opts.max_new_tokens)):
            print(f"{f}\t{text}" if len(files) > 1 else text)
    return 0
