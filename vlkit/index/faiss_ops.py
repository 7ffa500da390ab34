"""The faiss side of a VectorIndex: kinds built from factory strings, their training needs, float32 input."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
import torch

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def faiss_msg(e: BaseException) -> str:
    """A faiss error's message for users: without the C++ function and source line faiss prefixes it with."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(e).strip())


# From this many queries, exact (flat) search takes faiss's BLAS path: one matrix product over the batch instead
# of a scan per query. faiss itself switches only for far larger batches (its distance_compute_blas_threshold),
# so 100 queries of dim 512 were scanned one by one, bound by memory bandwidth (benchmarks/search.py).
BLAS_MIN_QUERIES = 8
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def exact_search_path(n_queries: int) -> Iterator[None]:
    """Inside, a flat search of ``n_queries`` queries uses faiss's BLAS path when the batch is large enough
    (faiss's switch is a process-wide setting: changed under a lock and restored)."""
    if n_queries < BLAS_MIN_QUERIES:
        yield
        return
    with _BLAS_LOCK:
        old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 0
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_threshold = old


def make_faiss_index(dim: int, kind: str, metric: str) -> faiss.Index:
    """An empty faiss index of ``kind`` ("flat" or an index_factory string) and ``metric`` ("ip" or "l2")."""
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
            f"faiss cannot build index kind {kind!r} for dim {dim}: {faiss_msg(e)}. Use 'flat' or a faiss "
            f"index_factory string such as 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ32' or 'PQ64x4fs,RFlat' "
            f"(PQ<m> needs dim divisible by m)"
        ) from None


def _children(index: faiss.Index) -> Iterator[faiss.Index]:
    """The sub-indexes of composite faiss indexes (pre-transform, refine, HNSW storage)."""
    for attr in ("index", "base_index", "refine_index", "storage"):
        child = getattr(index, attr, None)
        if isinstance(child, faiss.Index):
            yield faiss.downcast_index(child)


def min_train_size(index: faiss.Index) -> int:
    """Fewest training vectors faiss accepts: the largest number of centroids any part must learn."""
    idx = faiss.downcast_index(index)
    need = int(getattr(idx, "nlist", 1) or 1)
    pq = getattr(idx, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))
    for child in _children(idx):
        need = max(need, min_train_size(child))
    return need


def flat_storages(index: faiss.Index) -> Iterator[faiss.IndexFlatCodes]:
    """Every flat code storage in ``index`` and its sub-indexes (the index itself when it is one)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexFlatCodes):
        yield idx
    for child in _children(idx):
        yield from flat_storages(child)


def tunable_names(index: faiss.Index) -> list[str]:
    """The names of the search parameters faiss's ParameterSpace can set on ``index`` (nprobe, efSearch, ...)."""
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    return [ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())]


def to_numpy_rows(x: Any, dim: int, what: str) -> np.ndarray | torch.Tensor:
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


def float32_block(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy block; no copy when ``x`` already is one (CPU tensors included)."""
    if isinstance(x, torch.Tensor):
        x = x.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)
