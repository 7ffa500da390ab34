"""The on-disk format of a saved VectorIndex: a versioned manifest, the faiss index, ids and metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from vlkit.errors import VlkitError
from vlkit.index.faiss_ops import faiss_msg
from vlkit.io import atomic_directory, fsync_path, seal, sha256_file, unseal

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.jsonl"
_CORE_KEYS = ("format_version", "dim", "kind", "metric", "count")
_MISSING = object()
_REBUILD = "re-save it or rebuild the index"


class IndexFormatError(VlkitError, ValueError):
    """A saved index directory is incomplete, corrupt or from an unsupported format version."""


class IndexMismatchError(VlkitError, ValueError):
    """A saved index was built with a different model / configuration than the caller expects."""


def write_index_dir(
    target: Path,
    index: faiss.Index,
    ids: np.ndarray,
    metadata: list[dict[str, Any] | None] | None,
    header: Mapping[str, Any],
) -> None:
    """Write a VectorIndex's parts to directory ``target``, replacing it atomically.

    ``header`` is the manifest's account of the index (dim, kind, metric, count, search_params, info).
    """
    _check_overwritable(target)
    with atomic_directory(target) as root:
        files: dict[str, int] = {}
        faiss.write_index(index, str(root / INDEX_FILE))
        fsync_path(root / INDEX_FILE)
        with open(root / IDS_FILE, "wb") as f:
            np.save(f, ids, allow_pickle=False)
            _flush(f)
        if metadata is not None:
            _write_metadata(root / METADATA_FILE, metadata, ids)
        digests: dict[str, str] = {}
        for name in (INDEX_FILE, IDS_FILE, METADATA_FILE):
            if (root / name).exists():
                files[name] = (root / name).stat().st_size
                digests[name] = sha256_file(root / name)
        manifest = {
            "format_version": FORMAT_VERSION,
            **header,
            "files": files,
            "sha256": digests,
            "faiss_version": faiss.__version__,
        }
        with open(root / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(seal(manifest), f, indent=2, sort_keys=True)
            _flush(f)


def _write_metadata(path: Path, metadata: list[dict[str, Any] | None], ids: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for pos, m in enumerate(metadata):
            try:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"metadata of id {int(ids[pos])} is not JSON-serializable ({e}): keep metadata to "
                    f"str/int/float/bool/None/list/dict values"
                ) from None
        _flush(f)


def read_index_dir(
    root: Path, expect: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], faiss.Index, np.ndarray, list[dict[str, Any] | None] | None]:
    """The manifest, faiss index, ids and metadata saved at ``root``, each checked against the manifest.

    ``expect`` is checked first: a difference raises ``IndexMismatchError`` before the index data is read.
    """
    manifest = _read_manifest(root)
    _check_expect(root, manifest, expect or {})
    _check_files(root, manifest)
    try:
        index = faiss.read_index(str(root / INDEX_FILE))
    except RuntimeError as e:
        raise IndexFormatError(
            f"{root / INDEX_FILE} is not a readable faiss index ({faiss_msg(e)}); {_REBUILD}"
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
    return manifest, index, ids, metadata


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
    manifest = unseal(manifest, root / MANIFEST, _REBUILD)  # indexes saved before seals existed pass as they are
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
    # indexes saved before checksums were recorded have none: their sizes were checked above
    for name, digest in manifest.get("sha256", {}).items():
        if name in manifest["files"] and sha256_file(root / name) != digest:
            raise IndexFormatError(
                f"index at {root} is corrupt: {name} does not match the checksum in {MANIFEST} (changed or "
                f"damaged on disk); {_REBUILD}"
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
