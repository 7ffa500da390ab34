"""Image file helpers: load one image as RGB with a clear error, list image files, report skipped ones."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlkit.errors import DataNotFoundError, VlkitError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

log = logging.getLogger(__name__)


def max_pixels() -> int:
    """The largest image (width x height) vlkit decodes: VLKIT_MAX_IMAGE_PIXELS, default 50 million (an
    8000 x 6000 photo). Larger files, decompression bombs among them, are refused as bad images before
    any pixel is decoded."""
    value = os.environ.get("VLKIT_MAX_IMAGE_PIXELS", "")
    try:
        return int(value) if value else 50_000_000
    except ValueError:
        raise VlkitError(f"VLKIT_MAX_IMAGE_PIXELS={value!r} is not a whole number of pixels") from None


class ImageLoadError(VlkitError, ValueError):
    """An image file is missing, is not an image, or is truncated/corrupt. ``path`` names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_image(path: str | Path) -> Image.Image:
    """Read ``path`` fully (so truncation is caught here, not later in a worker) and return it as RGB."""
    p = Path(path)
    if not p.is_file():
        hint = "it is a directory" if p.is_dir() else "no such file"
        raise ImageLoadError(p, f"{hint}; check the images directory and the file names in the annotations")
    limit = max_pixels()
    try:
        with Image.open(p) as im:
            if im.width * im.height > limit:
                raise ImageLoadError(p, f"{im.width} x {im.height} pixels is over the limit of {limit:,} "
                                        "(VLKIT_MAX_IMAGE_PIXELS raises it); skipped as a bad image")
            im.load()
            return im.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(p, f"refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(p, "not an image file (unknown format); replace it or remove it from the "
                                "annotations, or use on_error='skip'") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated/corrupt data
        raise ImageLoadError(p, f"truncated or corrupt image data ({e}); re-download or regenerate the "
                                "file, or use on_error='skip'") from e


def find_images(directory: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """All files under ``directory`` (recursively) whose extension is in ``extensions`` (case-insensitive),
    sorted by path so the order is the same on every machine."""
    d = Path(directory)
    if not d.is_dir():
        raise DataNotFoundError(f"find_images: {d} is not a directory; pass the folder that holds the images")
    exts = {e.lower() for e in extensions}
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in exts and p.is_file())


@dataclass
class SkipReport:
    """Files skipped in skip-with-report mode, with the reason for each; never a silent drop."""

    what: str = "images"
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.skipped.append((Path(path), reason))

    @property
    def count(self) -> int:
        return len(self.skipped)

    @property
    def names(self) -> list[str]:
        return [p.name for p, _ in self.skipped]

    def __bool__(self) -> bool:
        return bool(self.skipped)

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self, max_names: int = 10) -> str:
        """One line: how many were skipped, and which (first ``max_names``), e.g. for a log or an error."""
        if not self.skipped:
            return f"skipped 0 {self.what}"
        shown = ", ".join(f"{p.name} ({why})" for p, why in self.skipped[:max_names])
        more = f" and {self.count - max_names} more" if self.count > max_names else ""
        return f"skipped {self.count} {self.what}: {shown}{more}"

    def log(self, logger: logging.Logger | None = None) -> None:
        """Warn once with the summary when something was skipped."""
        if self.skipped:
            (logger or log).warning(self.summary())
