"""A persistent faiss vector index with ids, per-vector metadata and an atomic, versioned on-disk format."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from vlkit.index.faiss_ops import (
    exact_search_path,
    faiss_msg,
    flat_storages,
    float32_block,
    make_faiss_index,
    min_train_size,
    to_numpy_rows,
    tunable_names,
)
from vlkit.index.store import (
    FORMAT_VERSION,
    IndexFormatError,
    IndexMismatchError,
    read_index_dir,
    write_index_dir,
)

__all__ = ["FORMAT_VERSION", "IndexFormatError", "IndexMismatchError", "VectorIndex"]

# Rows converted/added per faiss call: bounds the float32 copy made for non-float32 input (~64 MB).
_ADD_CHUNK_BYTES = 64 << 20


class _IdBuffer:
    """A growable int64 array (amortised appends) mapping faiss positions to caller ids."""

    def __init__(self, data: np.ndarray | None = None) -> None:
        self._buf = np.empty(0, np.int64) if data is None else np.ascontiguousarray(data, dtype=np.int64)
        self._n = len(self._buf)

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def reserve(self, n: int) -> None:
        if n > len(self._buf):
            buf = np.empty(n, np.int64)
            buf[: self._n] = self.view()
            self._buf = buf

    def extend(self, ids: np.ndarray) -> None:
        need = self._n + len(ids)
        if need > len(self._buf):
            self.reserve(max(need, 2 * len(self._buf)))
        self._buf[self._n : need] = ids
        self._n = need


class VectorIndex:
    """Vectors with integer ids and optional metadata dicts, searchable with faiss and saved atomically.

    ``kind`` is ``"flat"`` (exact) or any faiss ``index_factory`` string, e.g. ``"HNSW32"``,
    ``"IVF1024,Flat"``, ``"IVF1024,PQ32"`` or ``"PQ128x4fs,RFlat"`` (fast-scan PQ re-ranked exactly).
    ``metric`` is ``"ip"`` (inner product: higher is better; cosine on unit vectors) or ``"l2"``
    (squared distance: lower is better). Kinds that must be trained train on the first ``add``.
    ``nprobe`` (IVF), ``efSearch`` (HNSW) and any other faiss search parameter in ``search_params``
    (e.g. ``{"k_factor_rf": 64}``) are applied now and saved with the index. ``info`` is free-form
    JSON written to the manifest (the Retriever records the backbone identity there) and checked by
    ``load(..., expect=...)``. faiss's OpenMP thread count is left as the caller set it
    (``faiss.omp_set_num_threads``).
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        metric: str = "ip",
        nprobe: int | None = None,
        efSearch: int | None = None,  # faiss's own name, kept so kwargs match faiss docs
        search_params: Mapping[str, float] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self._setup(make_faiss_index(dim, kind, metric), kind, metric, _IdBuffer(), None, info)
        self.set_search_params(nprobe=nprobe, efSearch=efSearch, **dict(search_params or {}))

    def _setup(
        self,
        index: faiss.Index,
        kind: str,
        metric: str,
        ids: _IdBuffer,
        metadata: list[dict[str, Any] | None] | None,
        info: Mapping[str, Any] | None,
    ) -> None:
        self._index = index
        self.kind = kind
        self.metric = metric
        self._ids = ids
        self._metadata = metadata
        self._next_id = int(ids.view().max()) + 1 if len(ids) else 0
        self.search_params: dict[str, float] = {}
        self.info: dict[str, Any] = dict(info or {})
        try:
            json.dumps(self.info)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"info must be JSON-serializable (str/int/float/bool/list/dict), got: {e}"
            ) from None

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def ids(self) -> np.ndarray:
        """The ids in insertion order (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, kind={self.kind!r}, metric={self.metric!r}, count={len(self)})"

    def set_search_params(self, **params: float | None) -> None:
        """Set faiss search parameters by name (``nprobe``, ``efSearch``, ``k_factor_rf``, ...); None is skipped."""
        ps = faiss.ParameterSpace()
        for name, value in params.items():
            if value is None:
                continue
            try:
                ps.set_index_parameter(self._index, name, float(value))
            except RuntimeError:
                valid = ", ".join(tunable_names(self._index)) or "none (exact search has nothing to tune)"
                raise ValueError(
                    f"index kind {self.kind!r} has no search parameter {name!r}; its parameters: {valid}"
                ) from None
            self.search_params[name] = value

    def train(self, vectors: np.ndarray | torch.Tensor) -> None:
        """Train an approximate index on a representative sample (no-op for kinds that need none)."""
        if self._index.is_trained:
            if min_train_size(self._index) > 1:  # learned centroids are fixed once set
                raise ValueError(f"this {self.kind!r} index is already trained: build a new one to retrain")
            return
        x = to_numpy_rows(vectors, self.dim, "training vectors")
        need = min_train_size(self._index)
        if len(x) < need:
            raise ValueError(
                f"index kind {self.kind!r} needs at least {need} training vectors (about {39 * need} for "
                f"stable clustering), got {len(x)}: train on a larger sample, or use kind='flat' for small data"
            )
        try:
            self._index.train(float32_block(x))
        except RuntimeError as e:
            raise ValueError(f"training the {self.kind!r} index failed: {faiss_msg(e)}") from None

    def reserve(self, n_total: int) -> None:
        """Pre-allocate room for ``n_total`` vectors in the full-precision storage.

        Growing storage by doubling copies it, so without this the peak memory while adding can
        reach about twice the final size; with it, adding in chunks peaks near the final size.
        """
        for flat in flat_storages(self._index):
            codes = flat.codes
            size, want = codes.size(), int(n_total) * int(flat.code_size)
            if codes.is_owned and want > size:
                # std::vector keeps its capacity when shrunk, so grow-then-shrink reserves.
                codes.resize(want)
                codes.resize(size)
        self._ids.reserve(int(n_total))

    def add(
        self,
        vectors: np.ndarray | torch.Tensor,
        ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> np.ndarray:
        """Append vectors [N, dim]; returns their ids (``ids`` if given, else the next free integers).

        Vectors go to faiss in chunks, converted to float32 one chunk at a time, so no full second
        copy is made. ``metadata`` is one JSON-serializable dict (or None) per vector. An untrained
        approximate index is trained on (a sample of) the first add.
        """
        x = to_numpy_rows(vectors, self.dim, "vectors")
        n = len(x)
        new_ids = self._check_new_ids(ids, n)
        meta = self._check_metadata(metadata, n)
        if n == 0:
            return new_ids
        if not self._index.is_trained:
            # faiss k-means subsamples to 256 points per centroid anyway; PQ/SQ want a decent sample.
            self.train(x[: max(256 * min_train_size(self._index), 65536)])
        if self._metadata is None and meta is not None:
            self._metadata = [None] * len(self)
        rows = max(1, _ADD_CHUNK_BYTES // (4 * self.dim))
        for start in range(0, n, rows):
            end = min(start + rows, n)
            try:
                self._index.add(float32_block(x[start:end]))
            except RuntimeError as e:
                raise ValueError(f"adding to the {self.kind!r} index failed: {faiss_msg(e)}") from None
            # Book-keeping per chunk keeps ids/metadata aligned with faiss even if a later chunk fails.
            self._ids.extend(new_ids[start:end])
            if self._metadata is not None:
                self._metadata.extend(meta[start:end] if meta is not None else [None] * (end - start))
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def _check_new_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            return np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.shape != (n,) or (n and arr.dtype.kind not in "iu"):
            raise ValueError(
                f"ids must be {n} integers (one per vector), got dtype {arr.dtype} shape {arr.shape}"
            )
        arr = arr.astype(np.int64)
        if n and arr.min() < 0:
            raise ValueError("ids must be >= 0 (-1 marks 'no result' in search output)")
        if len(np.unique(arr)) != n:
            raise ValueError("ids contain duplicates: each vector needs its own id")
        clash = arr[np.isin(arr, self._ids.view())]
        if clash.size:
            raise ValueError(
                f"ids already in the index: {clash[:10].tolist()}; ids must be unique across adds"
            )
        return arr

    @staticmethod
    def _check_metadata(metadata: Any, n: int) -> list[dict[str, Any] | None] | None:
        if metadata is None:
            return None
        meta = list(metadata)
        if len(meta) != n:
            raise ValueError(f"metadata must have one entry per vector: got {len(meta)} for {n} vectors")
        for i, m in enumerate(meta):
            if m is not None and not isinstance(m, Mapping):
                raise TypeError(f"metadata[{i}] must be a dict or None, got {type(m).__name__}")
        return [dict(m) if m is not None else None for m in meta]

    def _search_positions(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = float32_block(to_numpy_rows(queries, self.dim, "queries"))
        if len(self) == 0:
            return np.full((len(q), k), self._worst_score, np.float32), np.full((len(q), k), -1, np.int64)
        try:
            if self.kind.strip().lower() == "flat":
                with exact_search_path(len(q)):
                    return self._index.search(q, k)
            return self._index.search(q, k)
        except RuntimeError as e:
            raise ValueError(f"search in the {self.kind!r} index failed: {faiss_msg(e)}") from None

    @property
    def _worst_score(self) -> float:
        return float("-inf") if self.metric == "ip" else float("inf")

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` for each query: (scores float32 [Q, k], ids int64 [Q, k]), best first.

        When fewer than ``k`` results exist the tail has id -1 and the worst score (-inf for ip,
        +inf for l2).
        """
        scores, pos = self._search_positions(queries, k)
        missing = pos < 0
        ids = self._ids.view()[np.where(missing, 0, pos)] if len(self) else pos
        if missing.any():
            ids[missing] = -1
            scores[missing] = self._worst_score
        return scores, ids

    def _metadata_at(self, pos: int) -> dict[str, Any] | None:
        m = self._metadata[pos] if self._metadata is not None else None
        return dict(m) if m is not None else None  # a copy: callers must not edit the index by accident

    def search_records(self, queries: np.ndarray | torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-``k`` per query as ``[{"id": int, "score": float, "metadata": dict | None}, ...]``."""
        scores, pos = self._search_positions(queries, k)
        ids = self._ids.view()
        out: list[list[dict[str, Any]]] = []
        for row_s, row_p in zip(scores.tolist(), pos.tolist(), strict=True):
            out.append(
                [
                    {
                        "id": int(ids[p]),
                        "score": s,
                        "metadata": self._metadata_at(p),
                    }
                    for s, p in zip(row_s, row_p, strict=True)
                    if p >= 0
                ]
            )
        return out

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to directory ``path`` atomically; returns the path.

        Everything is written and fsynced in a temporary sibling directory that then replaces
        ``path`` in one rename (an atomic exchange on Linux when ``path`` already holds an index),
        so a crash never leaves a half-written index at ``path`` and an existing one stays loadable.
        """
        target = Path(path).absolute()
        write_index_dir(
            target,
            self._index,
            self._ids.view(),
            self._metadata,
            {
                "dim": self.dim,
                "kind": self.kind,
                "metric": self.metric,
                "count": len(self),
                "search_params": self.search_params,
                "info": self.info,
            },
        )
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expect: Mapping[str, Any] | None = None,
        search_params: Mapping[str, float] | None = None,
    ) -> VectorIndex:
        """Load an index written by ``save``.

        ``expect`` maps manifest keys (``dim``, ``kind``, ``metric``, ``count``) or ``info`` keys to
        required values; any difference raises ``IndexMismatchError`` before the index data is read.
        ``search_params`` override the saved ones (e.g. a larger ``nprobe``).
        """
        manifest, index, ids, metadata = read_index_dir(Path(path), expect)
        obj = cls.__new__(cls)
        obj._setup(index, manifest["kind"], manifest["metric"], _IdBuffer(ids), metadata, manifest["info"])
        obj.set_search_params(**{**manifest["search_params"], **dict(search_params or {})})
        return obj
