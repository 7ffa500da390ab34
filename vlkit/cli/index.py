"""`vlkit index` (embed a folder of images, sharded under torchrun) and `vlkit search`."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.cli.common import Command, kv_help
from vlkit.config import bounded, parse_kv
from vlkit.errors import VlkitError


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
    # on a CPU: processes that each decode and encode whole batches on one thread; -1 = one per core (the fastest
    # here), 1 = encode in the main process with `workers` decoding beside it
    encoders: int = -1
    # image-decoding worker processes beside a single encoder; -1 = one per two CPU cores (1 to 4), 0 = decode
    # in the main process
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


def _index(args: list[str]) -> int:
    from vlkit.index.sharded import build_index

    opts = parse_kv(args, IndexArgs)
    if not opts.images or not opts.out:
        raise VlkitError("vlkit index needs images=DIR and out=INDEX_DIR")
    retriever, report = build_index(opts)
    if retriever is not None:
        print(f"indexed {len(retriever.indexes['images'])} images into {opts.out}; {report.summary()}")
    return 0


def _search(args: list[str]) -> int:
    from vlkit.index.retriever import Retriever, iter_hits

    opts = parse_kv(args, SearchArgs)
    retriever = Retriever.load(opts.index, progress=False)
    hits = retriever.search(text=opts.text or None, image=opts.image or None, k=opts.k, target=opts.target)
    for line in iter_hits(hits):
        print(line)
    return 0




INDEX = Command(_index, "embed a folder of images into a search index", lambda a: kv_help("index", IndexArgs))
SEARCH = Command(_search, "search an index", lambda a: kv_help("search", SearchArgs))
