"""Progress bars that iterate what they show exactly once.

Handed an iterable, tqdm.auto's class (the asyncio one) calls ``iter()`` on it in its constructor and again to
loop: for a DataLoader with worker processes that is two passes, each starting its own workers, the first one
decoding (or encoding) for nothing. ``progress`` loops once and moves a bar by hand."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, show: bool = True, total: int | None = None,
             **bar: Any) -> Iterator[T]:
    """Yield the items of ``iterable`` (one pass) while a bar counts them; ``show=False`` shows nothing."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, disable=not show, **bar) as counter:
        for item in iterable:
            yield item
            counter.update(1)
