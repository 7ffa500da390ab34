"""The Python retrieval API: embed images and texts with a backbone, search a persistent vector index.

>>> r = Retriever(load_backbone("my_backbone_dir"))
>>> report = r.add_images("photos/")              # parallel decoding, skipped files reported
>>> r.add_texts(["a red circle", "a blue star"])  # optional: enables image -> text search
>>> r.search(text="a red circle", k=5)            # [Hit(id, score, metadata), ...]
>>> r.save("my_index"); Retriever.load("my_index")
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlkit.backbone import Backbone, load_backbone
from vlkit.data.images import ImageLoadError, SkipReport, find_images, load_image
from vlkit.errors import VlkitError
from vlkit.index.store import IndexMismatchError
from vlkit.index.vectors import VectorIndex
from vlkit.io import atomic_directory, read_json_file, seal, unseal
from vlkit.progress import progress as progress_bar

MANIFEST = "retriever.json"
TARGETS = ("images", "texts")


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    metadata: dict[str, Any] | None


class _ImageFiles(Dataset):
    """Decodes and preprocesses images in DataLoader workers; an unreadable file yields its error."""

    def __init__(self, items: Sequence[str | Path | Image.Image], transform) -> None:
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        item = self.items[i]
        try:
            image = item if isinstance(item, Image.Image) else load_image(item)
            return i, self.transform(image.convert("RGB")), ""
        except ImageLoadError as exc:
            return i, None, exc.reason


def _collate(rows):
    return rows


class _EncodedBatches(Dataset):
    """Item ``b`` = batch ``slices[b]`` decoded, preprocessed and encoded inside a DataLoader worker:
    ``(positions kept, embeddings or None, [(position, reason) of unreadable files]``. DataLoader workers run
    one torch thread each, so N of them keep N cores busy with no barrier between cores inside every matrix
    product, and each overlaps its own decoding with the others' encoding."""

    def __init__(self, items: Sequence[str | Path], transform, encode, slices: list[range]) -> None:
        self.files = _ImageFiles(items, transform)
        self.encode, self.slices = encode, slices

    def __len__(self) -> int:
        return len(self.slices)

    @torch.no_grad()
    def __getitem__(self, b: int) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        rows = [self.files[i] for i in self.slices[b]]
        good = [(i, x) for i, x, _ in rows if x is not None]
        emb = self.encode(torch.stack([x for _, x in good])) if good else None
        return [i for i, _ in good], emb, [(i, reason) for i, x, reason in rows if x is None]


# Decoding workers run this much below the encoding process (nice levels): on a machine whose cores the
# encoder's threads already fill, a worker at equal priority preempts them in the middle of a parallel
# matrix product, and every other thread then waits for the preempted one. Decoding is ~10% of the
# work, so the workers still keep ahead of the encoder from the gaps between its operations.
WORKER_NICENESS = 10


def _lower_priority(_: int) -> None:
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)


def batch_slices(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """Batches of a fixed composition, dealt round-robin to processes: every image is encoded in the
    same batch whatever the process count, so a sharded run gives bit-identical embeddings."""
    return [range(s, min(s + batch_size, n)) for b, s in enumerate(range(0, n, batch_size)) if b % world == rank]


def default_workers() -> int:
    """Decoding workers beside the encoder: one per two cores (decoding is ~10% of the work), 1 to 4."""
    return min(4, max(1, (os.cpu_count() or 2) // 2))


def default_encoders(world: int = 1) -> int:
    """Encoding processes on a CPU: one per core this process may use (its share when ``world`` processes run)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world))


def int8_image_encoder(backbone: Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """A CPU image encoder whose linear layers run in int8 (weights quantized per tensor ahead of time,
    activations at run time): 1.2-1.5x the fp32 speed for ViT-B-32 on two AVX2 cores (benchmarks/embed.py),
    embeddings at cosine >= 0.9998 to fp32 there (tests/test_retrieval_plugin.py asserts > 0.99 on the tiny
    model). The backbone itself is left untouched."""
    import copy
    import warnings

    if getattr(backbone, "kind", "clip") != "clip":
        raise VlkitError(f"int8=True quantizes a CLIP image tower; {backbone.name} is an {backbone.kind} backbone: "
                         "index it in its own precision (int8=False)")
    if backbone.device.type != "cpu":
        raise VlkitError("int8=True quantizes for the CPU; on a GPU index in the backbone's own precision")
    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        visual = quantize_dynamic(copy.deepcopy(backbone.model.visual).eval(), {torch.nn.Linear}, dtype=torch.qint8)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(visual(images), dim=-1)

    return encode


class Retriever:
    """Image and text embeddings of one backbone in faiss indexes, with ids and metadata.

    On a CPU, image files are embedded by ``encoders`` processes that each decode and encode whole batches on
    one thread (default: one per core; ViT-B-32 on two cores: 21 images/s, 1.8-2.1x a plain one-image loop, 5-9%
    above one process encoding on both cores: ``benchmarks/embed.py``). ``encoders=1`` (or a GPU, or PIL
    images) encodes in this process, with ``num_workers`` processes decoding beside it (default: one per two
    cores). ``int8`` encodes images with int8 linear layers on the CPU (faster, approximate; see
    ``int8_image_encoder``)."""

    def __init__(self, backbone: Backbone, kind: str = "flat", batch_size: int = 64, num_workers: int | None = None,
                 progress: bool = True, int8: bool = False, encoders: int | None = None) -> None:
        self.backbone = backbone.eval()
        self.kind, self.batch_size, self.progress = kind, batch_size, progress
        self.num_workers = default_workers() if num_workers is None else num_workers
        if encoders is not None and encoders < 1:
            raise VlkitError(f"encoders={encoders}: at least one encoding process (1 = encode in this process)")
        self.encoders = encoders
        self.int8 = int8
        self._encode_images = int8_image_encoder(backbone) if int8 else self.backbone.encode_image
        self.indexes: dict[str, VectorIndex] = {}
        self._identity = backbone.identity

    # ---- embedding ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = [self.backbone.encode_text(self.backbone.tokenize(list(texts[i:i + self.batch_size])))
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.backbone.embed_dim)

    @torch.no_grad()
    def embed_images(self, images: Sequence[str | Path | Image.Image], rank: int = 0, world: int = 1,
                     report: SkipReport | None = None) -> tuple[list[int], torch.Tensor]:
        """Embeddings of the readable images among ``images`` (this process's batches), with their
        positions in ``images``; unreadable ones go to ``report``."""
        slices = batch_slices(len(images), self.batch_size, rank, world)
        encoders = default_encoders(world) if self.encoders is None else self.encoders
        encoders = min(encoders, len(slices))
        if encoders > 1 and self.backbone.device.type == "cpu" and not any(isinstance(x, Image.Image) for x in images):
            return self._embed_in_workers(images, slices, encoders, report)
        data = _ImageFiles(images, self.backbone.preprocess)
        workers = self.num_workers if not any(isinstance(x, Image.Image) for x in images) else 0
        loader = DataLoader(data, batch_sampler=slices, num_workers=workers, collate_fn=_collate,
                            worker_init_fn=_lower_priority if workers else None)
        kept, embs = [], []
        for rows in progress_bar(loader, "embed images", self.progress, unit="batch"):
            good = [(i, x) for i, x, _ in rows if x is not None]
            for i, x, reason in rows:
                if x is None and report is not None:
                    report.add(Path(str(images[i])), reason)
            if good:
                kept += [i for i, _ in good]
                embs.append(self._encode_images(torch.stack([x for _, x in good])))
        return kept, (torch.cat(embs) if embs else torch.empty(0, self.backbone.embed_dim))

    def _embed_in_workers(self, images: Sequence[str | Path], slices: list[range], encoders: int,
                          report: SkipReport | None) -> tuple[list[int], torch.Tensor]:
        data = _EncodedBatches(images, self.backbone.preprocess, self._encode_images, slices)
        # fork: the workers share the model's weights with this process (copy-on-write, never written)
        context = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        loader = DataLoader(data, batch_size=None, num_workers=encoders, collate_fn=_collate,
                            multiprocessing_context=context)
        kept, embs = [], []
        for positions, emb, skipped in progress_bar(loader, "embed images", self.progress, unit="batch"):
            for i, reason in skipped:
                if report is not None:
                    report.add(Path(str(images[i])), reason)
            if emb is not None:
                kept += positions
                embs.append(emb)
        return kept, (torch.cat(embs) if embs else torch.empty(0, self.backbone.embed_dim))

    # ---- building ---------------------------------------------------------------------------------
    def _index(self, target: str, create: bool = False) -> VectorIndex:
        if target not in TARGETS:
            raise VlkitError(f"target must be one of {TARGETS}, got {target!r}")
        if target not in self.indexes:
            if not create:
                raise VlkitError(f"this retriever has no {target} yet: add some with add_{target}()")
            self.indexes[target] = VectorIndex(self.backbone.embed_dim, kind=self.kind,
                                               info={"backbone": self._identity})
        return self.indexes[target]

    def add_images(self, images: str | Path | Sequence[str | Path | Image.Image],
                   ids: Sequence[int] | None = None, metadata: Sequence[dict] | None = None) -> SkipReport:
        """Embed and index images (a folder, paths or PIL images). Returns the report of skipped files."""
        items = find_images(images) if isinstance(images, (str, Path)) else list(images)
        if isinstance(images, (str, Path)) and not items:
            raise VlkitError(f"no image files found under {images}")
        report = SkipReport()
        kept, emb = self.embed_images(items, report=report)
        if items and not kept:
            raise VlkitError(f"none of the {len(items)} images could be read, so nothing was indexed: "
                             f"{report.summary()}")
        self.add_vectors("images", emb, *self._select(items, kept, ids, metadata))
        report.log()
        return report

    def add_texts(self, texts: Sequence[str], ids: Sequence[int] | None = None,
                  metadata: Sequence[dict] | None = None) -> None:
        meta = list(metadata) if metadata is not None else [{"text": t} for t in texts]
        self.add_vectors("texts", self.embed_texts(texts), ids, meta)

    def add_vectors(self, target: str, vectors: torch.Tensor, ids=None, metadata=None) -> None:
        index = self._index(target, create=True)
        index.reserve(len(index) + len(vectors))  # one allocation, not faiss's doubling (peak memory)
        index.add(vectors.float().cpu().numpy(), ids=ids, metadata=metadata)

    @staticmethod
    def _select(items, kept: list[int], ids, metadata):
        sel_ids = [ids[i] for i in kept] if ids is not None else None
        if metadata is not None:
            sel_meta = [metadata[i] for i in kept]
        else:
            sel_meta = [{"path": str(items[i])} if not isinstance(items[i], Image.Image) else {} for i in kept]
        return sel_ids, sel_meta

    # ---- searching --------------------------------------------------------------------------------
    def query_vector(self, text: str | None = None, image: str | Path | Image.Image | None = None) -> np.ndarray:
        if (text is None) == (image is None):
            raise VlkitError("give exactly one of text= or image=")
        if text is not None:
            if not text.strip():
                raise VlkitError("the text query is empty")
            return self.embed_texts([text]).numpy()
        kept, emb = self.embed_images([image])
        if not kept:
            load_image(image)  # raises the clear error naming the file
        return emb.numpy()

    def search(self, text: str | None = None, image: str | Path | Image.Image | None = None,
               vector: np.ndarray | torch.Tensor | None = None, k: int = 10, target: str = "images") -> list[Hit]:
        """Top-k hits in the ``images`` (default) or ``texts`` index for one query."""
        if vector is None:
            vector = self.query_vector(text, image)
        vec = np.asarray(vector.cpu() if torch.is_tensor(vector) else vector, dtype=np.float32).reshape(1, -1)
        records = self._index(target).search_records(vec, k)[0]
        return [Hit(r["id"], float(r["score"]), r["metadata"]) for r in records]

    def __len__(self) -> int:
        return sum(len(ix) for ix in self.indexes.values())

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write every index and a manifest naming the backbone, atomically."""
        with atomic_directory(directory) as tmp:
            for target, index in self.indexes.items():
                index.save(tmp / target)
            manifest = {"backbone": self._identity, "backbone_source": self.backbone.source,
                        "embed_dim": self.backbone.embed_dim, "kind": self.kind, "targets": sorted(self.indexes),
                        "int8": self.int8}
            (tmp / MANIFEST).write_text(json.dumps(seal(manifest), indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, backbone: Backbone | None = None, **kwargs) -> Retriever:
        """Load a saved retriever; with no backbone, the one recorded in the manifest is loaded."""
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise VlkitError(f"{directory} is not a vlkit index (no {MANIFEST}); build one with `vlkit index`")
        fix = f"rebuild the index with `vlkit index images=... out={directory}`"
        manifest = unseal(read_json_file(directory / MANIFEST, VlkitError, fix), directory / MANIFEST, fix)
        types = {"backbone": str, "backbone_source": str, "embed_dim": int, "kind": str, "targets": list}
        bad = [k for k, t in types.items() if not isinstance(manifest.get(k), t)]
        if bad or not all(isinstance(t, str) and t and "/" not in t and not t.startswith(".")
                          for t in manifest["targets"]):
            raise VlkitError(f"{directory / MANIFEST} is damaged ({', '.join(bad) or 'targets'} missing or "
                             f"malformed): {fix}")
        if backbone is None:
            backbone = load_backbone(manifest["backbone_source"])
        if backbone.identity != manifest["backbone"]:
            raise IndexMismatchError(
                f"index {directory} was built with backbone {manifest['backbone']} (dim {manifest['embed_dim']}) "
                f"but the loaded backbone is {backbone.identity} (dim {backbone.embed_dim}): rebuild it with "
                f"`vlkit index images=... out={directory} model=...` or load the matching model"
            )
        kwargs.setdefault("int8", bool(manifest.get("int8", False)))  # image queries encoded as the index was
        retriever = cls(backbone, kind=manifest["kind"], **kwargs)
        for target in manifest["targets"]:
            retriever.indexes[target] = VectorIndex.load(directory / target, expect={"backbone": manifest["backbone"]})
        return retriever


def iter_hits(hits: list[Hit]) -> Iterator[str]:
    for rank, h in enumerate(hits, 1):
        yield f"{rank:3d}  {h.score:.4f}  id={h.id}  {json.dumps(h.metadata) if h.metadata else ''}"
