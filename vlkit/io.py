"""Atomic file and folder writes: a crash mid-write never leaves a half-written result in place."""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False when the OS or file system can't."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def install_directory(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``; afterwards ``tmp`` holds the previous target, if any.

    On Linux an existing target is swapped in one atomic exchange; elsewhere there is a short window with
    no target (never a half-written one), and the old folder waits at a ``.<name>.old-*`` sibling."""
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
            fsync_path(target.parent)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not _rename_exchange(tmp, target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        os.rename(old, tmp)
    fsync_path(target.parent)


_LEGACY_STALE_S = 3600.0  # temporaries named without a process id (older vlkit) count as stale after an hour


def _writer_alive(name: str, prefix: str) -> bool:
    """Whether the process that created the temporary ``name`` (``<prefix><pid>-<random>``) still runs."""
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes of ``target`` left beside it: ``.<name>.tmp-<pid>-*`` (and
    ``.<name>.old-*``) whose writing process is gone, and unnamed older ones after an hour. Returns them."""
    target = Path(target).absolute()
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.glob(glob.escape(prefix) + "*"):
            name = path.name
            legacy = not name[len(prefix):].split("-", 1)[0].isdigit()
            try:
                stale = (time.time() - path.lstat().st_mtime > _LEGACY_STALE_S) if legacy else \
                    not _writer_alive(name, prefix)
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else \
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block succeeds its files are fsynced and
    the folder replaces ``target`` (see ``install_directory``). On an exception the temporary folder is
    deleted and ``target`` is left exactly as it was."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        install_directory(tmp, target)
    finally:
        # after a successful exchange tmp holds the previous target; after a failure, partial files
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (weights and indexes can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- integrity: files vlkit writes carry checksums, and what reads them verifies them ------------------
SEAL_KEY = "sha256_self"


class IntegrityError(VlkitError, ValueError):
    """A file vlkit wrote was changed or damaged afterwards (its checksum no longer matches)."""


def _digest_of(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` plus a checksum of its own content (``sha256_self``), so a changed value is detected on read."""
    return {**obj, SEAL_KEY: _digest_of(obj)}


def unseal(obj: Any, path: str | Path, fix: str) -> dict[str, Any]:
    """``obj`` (a parsed JSON object) without its seal, after checking it; JSON written before seals
    existed (no ``sha256_self``) passes as it is. ``fix`` says what to do when the check fails."""
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path} is damaged (not a JSON object): {fix}")
    if SEAL_KEY in obj and obj[SEAL_KEY] != _digest_of(obj):
        raise IntegrityError(f"{path} was changed or damaged after vlkit wrote it (its checksum does not match): {fix}")
    return {k: v for k, v in obj.items() if k != SEAL_KEY}


def read_json_file(path: str | Path, error: type[Exception], fix: str) -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file raises ``error`` naming it and ``fix``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing: {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]}): {fix}") from None


def file_digests(folder: str | Path, names: Any) -> dict[str, str]:
    return {name: sha256_file(Path(folder) / name) for name in names}


def verify_digests(folder: str | Path, digests: Any, fix: str) -> None:
    """Every file named in ``digests`` exists in ``folder`` with that sha256; else IntegrityError."""
    if not isinstance(digests, dict):
        raise IntegrityError(f"the checksums recorded for {folder} are damaged: {fix}")
    for name, digest in digests.items():
        path = Path(folder) / str(name)
        if not path.is_file():
            raise IntegrityError(f"{path} is missing: {fix}")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{path} was changed or damaged after vlkit wrote it (sha256 mismatch): {fix}")
