"""Vector search: ``VectorIndex`` (faiss, exact or approximate, persistent with ids and metadata), the
``Retriever`` that embeds images and texts with a backbone into such indexes, and ``build_index`` (`vlkit index`,
sharded over processes under torchrun).

Modules: ``vectors`` (VectorIndex), ``faiss_ops`` (faiss index construction and the exact-search path),
``store`` (the on-disk format, written atomically), ``retriever``, ``sharded``."""

from vlkit.index.retriever import Hit, Retriever, iter_hits
from vlkit.index.sharded import build_index
from vlkit.index.store import FORMAT_VERSION, IndexFormatError, IndexMismatchError
from vlkit.index.vectors import VectorIndex

__all__ = ["FORMAT_VERSION", "Hit", "IndexFormatError", "IndexMismatchError", "Retriever", "VectorIndex",
           "build_index", "iter_hits"]
