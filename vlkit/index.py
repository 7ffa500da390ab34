"""A persistent faiss vector index with ids, per-vector metadata and an atomic, versioned on-disk format."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from vlkit.errors import VlkitError
from vlkit.io import atomic_directory, fsync_path

__all__ = ["FORMAT_VERSION", "IndexFormatError", "IndexMismatchError", "VectorIndex"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.jsonl"
_CORE_KEYS = ("format_version", "dim", "kind", "metric", "count")
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Rows converted/added per faiss call: bounds the float32 copy made for non-float32 input (~64 MB).
_ADD_CHUNK_BYTES = 64 << 20
_MISSING = object()


class IndexFormatError(VlkitError, ValueError):
    """A saved index directory is incomplete, corrupt or from an unsupported format version."""


class IndexMismatchError(VlkitError, ValueError):
    """A saved index was built with a different model / configuration than the caller expects."""


def _faiss_msg(e: BaseException) -> str:
    # faiss prefixes errors with the C++ function and source line, which means nothing to a user.
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip())


def _make_faiss_index(dim: int, kind: str, metric: str) -> faiss.Index:
    if metric not in _METRICS:
        raise ValueError(
            f"metric must be one of {sorted(_METRICS)}, got {metric!r} (use 'ip' for cosine on unit vectors)"
        )
    if kind.strip().lower() == "flat":
        return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if "IDMap" in kind:
        raise ValueError(
            f"kind {kind!r}: drop the IDMap part, VectorIndex maps ids itself (pass ids= to add)"
        )
    try:
        return faiss.index_factory(dim, kind, _METRICS[metric])
    except RuntimeError as e:
        raise ValueError(
            f"faiss cannot build index kind {kind!r} for dim {dim}: {_faiss_msg(e)}. Use 'flat' or a faiss "
            f"index_factory string such as 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ32' or 'PQ64x4fs,RFlat' "
            f"(PQ<m> needs dim divisible by m)"
        ) from None


def _children(index: faiss.Index) -> Iterator[faiss.Index]:
    """The sub-indexes of composite faiss indexes (pre-transform, refine, HNSW storage)."""
    for attr in ("index", "base_index", "refine_index", "storage"):
        child = getattr(index, attr, None)
        if isinstance(child, faiss.Index):
            yield faiss.downcast_index(child)


def _min_train_size(index: faiss.Index) -> int:
    """Fewest training vectors faiss accepts: the largest number of centroids any part must learn."""
    idx = faiss.downcast_index(index)
    need = int(getattr(idx, "nlist", 1) or 1)
    pq = getattr(idx, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))
    for child in _children(idx):
        need = max(need, _min_train_size(child))
    return need


def _flat_storages(index: faiss.Index) -> Iterator[faiss.IndexFlatCodes]:
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexFlatCodes):
        yield idx
    for child in _children(idx):
        yield from _flat_storages(child)


def _tunable_names(index: faiss.Index) -> list[str]:
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    return [ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())]


def _to_numpy_rows(x: Any, dim: int, what: str) -> np.ndarray | torch.Tensor:
    """Validate a [N, dim] (or [dim]) array without copying it; conversion happens per chunk."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape [N, {dim}] (the index dim), got {tuple(x.shape)}")
    return x


def _float32_block(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy block; no copy when ``x`` already is one (CPU tensors included)."""
    if isinstance(x, torch.Tensor):
        x = x.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


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
        self._setup(_make_faiss_index(dim, kind, metric), kind, metric, _IdBuffer(), None, info)
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
                valid = ", ".join(_tunable_names(self._index)) or "none (exact search has nothing to tune)"
                raise ValueError(
                    f"index kind {self.kind!r} has no search parameter {name!r}; its parameters: {valid}"
                ) from None
            self.search_params[name] = value

    def train(self, vectors: np.ndarray | torch.Tensor) -> None:
        """Train an approximate index on a representative sample (no-op for kinds that need none)."""
        if self._index.is_trained:
            if _min_train_size(self._index) > 1:  # learned centroids are fixed once set
                raise ValueError(f"this {self.kind!r} index is already trained: build a new one to retrain")
            return
        x = _to_numpy_rows(vectors, self.dim, "training vectors")
        need = _min_train_size(self._index)
        if len(x) < need:
            raise ValueError(
                f"index kind {self.kind!r} needs at least {need} training vectors (about {39 * need} for "
                f"stable clustering), got {len(x)}: train on a larger sample, or use kind='flat' for small data"
            )
        try:
            self._index.train(_float32_block(x))
        except RuntimeError as e:
            raise ValueError(f"training the {self.kind!r} index failed: {_faiss_msg(e)}") from None

    def reserve(self, n_total: int) -> None:
        """Pre-allocate room for ``n_total`` vectors in the full-precision storage.

        Growing storage by doubling copies it, so without this the peak memory while adding can
        reach about twice the final size; with it, adding in chunks peaks near the final size.
        """
        for flat in _flat_storages(self._index):
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
        x = _to_numpy_rows(vectors, self.dim, "vectors")
        n = len(x)
        new_ids = self._check_new_ids(ids, n)
        meta = self._check_metadata(metadata, n)
        if n == 0:
            return new_ids
        if not self._index.is_trained:
            # faiss k-means subsamples to 256 points per centroid anyway; PQ/SQ want a decent sample.
            self.train(x[: max(256 * _min_train_size(self._index), 65536)])
        if self._metadata is None and meta is not None:
            self._metadata = [None] * len(self)
        rows = max(1, _ADD_CHUNK_BYTES // (4 * self.dim))
        for start in range(0, n, rows):
            end = min(start + rows, n)
            try:
                self._index.add(_float32_block(x[start:end]))
            except RuntimeError as e:
                raise ValueError(f"adding to the {self.kind!r} index failed: {_faiss_msg(e)}") from None
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
        q = _float32_block(_to_numpy_rows(queries, self.dim, "queries"))
        if len(self) == 0:
            return np.full((len(q), k), self._worst_score, np.float32), np.full((len(q), k), -1, np.int64)
        try:
            return self._index.search(q, k)
        except RuntimeError as e:
            raise ValueError(f"search in the {self.kind!r} index failed: {_faiss_msg(e)}") from None

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
        _check_overwritable(target)
        with atomic_directory(target) as tmp:
            self._write_files(tmp)
        return target

    def _write_files(self, root: Path) -> None:
        files: dict[str, int] = {}
        faiss.write_index(self._index, str(root / INDEX_FILE))
        fsync_path(root / INDEX_FILE)
        with open(root / IDS_FILE, "wb") as f:
            np.save(f, self._ids.view(), allow_pickle=False)
            _flush(f)
        if self._metadata is not None:
            self._write_metadata(root / METADATA_FILE)
        for name in (INDEX_FILE, IDS_FILE, METADATA_FILE):
            if (root / name).exists():
                files[name] = (root / name).stat().st_size
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "kind": self.kind,
            "metric": self.metric,
            "count": len(self),
            "search_params": self.search_params,
            "info": self.info,
            "files": files,
            "faiss_version": faiss.__version__,
        }
        with open(root / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            _flush(f)

    def _write_metadata(self, path: Path) -> None:
        assert self._metadata is not None
        ids = self._ids.view()
        with open(path, "w", encoding="utf-8") as f:
            for pos, m in enumerate(self._metadata):
                try:
                    f.write(json.dumps(m, ensure_ascii=False) + "\n")
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"metadata of id {int(ids[pos])} is not JSON-serializable ({e}): keep metadata to "
                        f"str/int/float/bool/None/list/dict values"
                    ) from None
            _flush(f)

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
        root = Path(path)
        manifest = _read_manifest(root)
        _check_expect(root, manifest, expect or {})
        _check_files(root, manifest)
        try:
            index = faiss.read_index(str(root / INDEX_FILE))
        except RuntimeError as e:
            raise IndexFormatError(
                f"{root / INDEX_FILE} is not a readable faiss index ({_faiss_msg(e)}); {_REBUILD}"
            ) from None
        if index.d != manifest["dim"] or index.ntotal != manifest["count"]:
            raise IndexFormatError(
                f"{root / INDEX_FILE} holds {index.ntotal} vectors of dim {index.d} but the manifest says "
                f"{manifest['count']} of dim {manifest['dim']}; {_REBUILD}"
            )
        ids = _read_ids(root / IDS_FILE, manifest["count"])
        metadata = (
            _read_metadata(root / METADATA_FILE, manifest["count"])
            if METADATA_FILE in manifest["files"]
            else None
        )
        obj = cls.__new__(cls)
        obj._setup(index, manifest["kind"], manifest["metric"], _IdBuffer(ids), metadata, manifest["info"])
        obj.set_search_params(**{**manifest["search_params"], **dict(search_params or {})})
        return obj


_REBUILD = "re-save it or rebuild the index"


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _check_overwritable(target: Path) -> None:
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: choose another path for the index")
    if any(target.iterdir()) and not (target / MANIFEST).exists():
        raise FileExistsError(
            f"{target} is a non-empty directory without {MANIFEST}, so not a saved VectorIndex; refusing to "
            f"overwrite it: choose another path or remove it"
        )


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        leftovers = (
            sorted(p.name for p in root.parent.glob(f".{root.name}.old-*")) if root.parent.is_dir() else []
        )
        hint = (
            f" (an interrupted save left the previous index at {leftovers[0]}: rename it back)"
            if leftovers
            else ""
        )
        raise FileNotFoundError(
            f"no vector index at {root}: expected a directory written by VectorIndex.save{hint}; build one first "
            f"(VectorIndex(...).add(...).save(path) or `vlkit index ...`)"
        )
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(
            f"{root} has no {MANIFEST}, so it is not a saved VectorIndex; {_REBUILD}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{root / MANIFEST} is corrupt ({e}); {_REBUILD}") from None
    missing = [k for k in (*_CORE_KEYS, "files", "info", "search_params") if k not in manifest]
    if missing:
        raise IndexFormatError(f"{root / MANIFEST} lacks {missing}; {_REBUILD}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexFormatError(
            f"{root} uses index format {manifest['format_version']} but this vlkit reads up to {FORMAT_VERSION}: "
            f"upgrade vlkit"
        )
    return manifest


def _check_expect(root: Path, manifest: dict[str, Any], expect: Mapping[str, Any]) -> None:
    built, wanted = [], []
    for key, want in expect.items():
        have = manifest[key] if key in _CORE_KEYS else manifest["info"].get(key, _MISSING)
        want = json.loads(json.dumps(want))  # compare as stored: tuples become lists, etc.
        if have != want:
            built.append(f"{key}={'(not recorded)' if have is _MISSING else repr(have)}")
            wanted.append(f"{key}={want!r}")
    if built:
        raise IndexMismatchError(
            f"index at {root} was built with {', '.join(built)} but is loaded with {', '.join(wanted)}: "
            f"rebuild the index with the current model (e.g. `vlkit index ...`) or load the model it was built with"
        )


def _check_files(root: Path, manifest: dict[str, Any]) -> None:
    if INDEX_FILE not in manifest["files"] or IDS_FILE not in manifest["files"]:
        raise IndexFormatError(f"{root / MANIFEST} does not list {INDEX_FILE} and {IDS_FILE}; {_REBUILD}")
    for name, size in manifest["files"].items():
        p = root / name
        if not p.is_file():
            raise IndexFormatError(f"index at {root} is incomplete: {name} is missing; {_REBUILD}")
        if p.stat().st_size != size:
            raise IndexFormatError(
                f"index at {root} is corrupt: {name} is {p.stat().st_size} bytes, the manifest says {size}; {_REBUILD}"
            )


def _read_ids(path: Path, count: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise IndexFormatError(f"{path} is not a valid id array ({e}); {_REBUILD}") from None
    if ids.shape != (count,) or ids.dtype != np.int64:
        raise IndexFormatError(f"{path} holds {ids.dtype} {ids.shape}, expected int64 ({count},); {_REBUILD}")
    return ids


def _read_metadata(path: Path, count: int) -> list[dict[str, Any] | None]:
    with open(path, encoding="utf-8") as f:
        try:
            meta = [json.loads(line) for line in f]
        except json.JSONDecodeError as e:
            raise IndexFormatError(f"{path} is corrupt ({e}); {_REBUILD}") from None
    if len(meta) != count:
        raise IndexFormatError(f"{path} has {len(meta)} records for {count} vectors; {_REBUILD}")
    return meta
