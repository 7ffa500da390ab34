"""The vlkit Gradio demo: search an index by text or image, plus the tabs plugins contribute (segmentation
by a free-text query, ...)."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlkit.backbone import TextTruncatedWarning
from vlkit.data.images import ImageLoadError
from vlkit.errors import VlkitError
from vlkit.index.retriever import Hit, Retriever

log = logging.getLogger(__name__)

SEARCH_MAX_SIDE = 2048  # the backbone sees a few hundred pixels: decoding more only costs memory
MAX_UPLOAD = "25mb"
MAX_K = 100
DEFAULT_QUERIES = ("a red circle", "two squares", "a blue star to the left of a green ring")
# Gradio 6 hides an endpoint with api_visibility and takes the theme in launch(); Gradio 5 differs in both.
_GRADIO_6 = int(gr.__version__.split(".")[0]) >= 6
PRIVATE: dict[str, Any] = {"api_visibility": "private"} if _GRADIO_6 else {"api_name": False}
_THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                        font_mono=["ui-monospace", "monospace"])  # system fonts: nothing fetched from the web
_CSS = """
#backbone-info p { margin: 0.1em 0; }
#segment-overlay img { image-rendering: pixelated; }
"""


class DemoInputError(VlkitError):
    """A request the demo cannot serve (empty query, unreadable upload, no index): shown in the page."""


# ---- images ---------------------------------------------------------------------------------------
def open_image(path: str | Path | None, max_side: int) -> tuple[Image.Image, str]:
    """An upload as RGB with its longer side <= ``max_side``, and a note when it was downscaled."""
    if path is None or str(path) == "":
        raise DemoInputError("Upload an image first (or pick one of the examples).")
    name = Path(path).name
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at a reduced scale: cheap on huge photos
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError:
        raise DemoInputError(f"{name} is too large to decode safely; upload a smaller image.") from None
    except UnidentifiedImageError:
        raise DemoInputError(f"{name} is not an image file; upload a PNG, JPEG, WebP, GIF, BMP or TIFF.") from None
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for truncated or corrupt data
        raise DemoInputError(f"{name} could not be decoded (truncated or corrupt image: {exc}).") from None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    note = "" if max(size) <= max_side else f" (downscaled from {size[0]}×{size[1]} to {rgb.width}×{rgb.height})"
    return rgb, note


def check_query(text: str | None) -> str:
    """A non-empty, stripped text query (else a DemoInputError the page shows)."""
    if not text or not text.strip():
        raise DemoInputError("Type a text query first, e.g. “a red circle”.")
    return text.strip()


def image_input(**kwargs: Any) -> gr.Image:
    """A filepath gr.Image that hands a file PIL cannot open on to the handler, which explains the problem
    in the page, instead of failing in Gradio's preprocessing with a bare error."""
    # image_mode=None: Gradio hands over the uploaded file as is; open_image decodes (and downscales) it once
    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], **kwargs)
    preprocess = image.preprocess

    def tolerant(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return str(payload.path)

    # per instance: a gr.Image subclass would make Gradio write a .pyi stub beside this module
    image.preprocess = tolerant  # type: ignore[method-assign]
    return image


# ---- plugin tabs ----------------------------------------------------------------------------------
@dataclass
class Page:
    """What the demo offers a plugin's tab (``DemoTab.build(state, page)``): the example (image, query) pairs,
    tolerant image inputs and decoding, query checking, and the failure guard every handler should wear."""

    examples: Sequence[tuple[str, str]] = ()
    private: dict[str, Any] = field(default_factory=lambda: dict(PRIVATE))  # hide an endpoint from the API page

    @staticmethod
    def image_input(**kwargs: Any) -> gr.Image:
        return image_input(**kwargs)

    @staticmethod
    def open_image(path: str | Path | None, max_side: int) -> tuple[Image.Image, str]:
        return open_image(path, max_side)

    @staticmethod
    def query(text: str | None) -> str:
        return check_query(text)

    @staticmethod
    def guarded(fn: Callable[..., tuple], empty: Callable[[], tuple]) -> Callable[..., tuple]:
        return guarded(fn, empty)


@dataclass
class LoadedTab:
    """A plugin's ``DemoTab`` with the state its ``load`` returned, or the error that kept it from loading
    (the tab then explains it; the rest of the demo works)."""

    tab: Any
    state: Any = None
    error: str = ""


def load_tabs(backbone: Any, runs: dict[str, str] | None = None) -> list[LoadedTab]:
    """Every installed plugin's demo tab, loaded on ``backbone`` (``runs[tab.key]``: a trained run for it)."""
    from vlkit.plugins import plugins_with

    loaded = []
    for plugin in plugins_with("demo_tab"):
        tab = plugin.demo_tab
        run = (runs or {}).get(tab.key, "")
        try:
            loaded.append(LoadedTab(tab, tab.load(backbone, run)))
        except VlkitError as exc:
            if run:  # a run the user named must load: say why it does not, before serving anything
                raise
            loaded.append(LoadedTab(tab, error=str(exc)))
    return loaded


# ---- the model panel ------------------------------------------------------------------------------
def _si(n: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def describe_backbone(bb: Any) -> str:
    """One line: name, source, parameters, FLOPs per image/text, pruned or not, fraction of zero weights."""
    from vlkit.compress import count_flops, flop_model, sparsity_report
    from vlkit.compress.flops import dummy_inputs

    try:
        flops = count_flops(bb.model, *dummy_inputs(bb.model))
    except Exception:  # an architecture the counter cannot run: the analytic model still answers
        flops = {tower: t.dense for tower, t in flop_model(bb.model).items()}
    spec = bb.pruned_spec()
    pruned = f"pruned ({len(spec.get('blocks', []))} blocks reduced)" if spec else "not pruned"
    zeros = sparsity_report(bb.model)["sparsity"]
    sparse = f"sparse: {zeros:.1%} zero weights" if zeros >= 0.01 else f"dense ({zeros:.1%} zero weights)"
    per = ", ".join(f"{_si(v, 'FLOPs')} per {tower}" for tower, v in flops.items())
    return (f"**`{bb.name}`** from `{bb.source}` · {_si(bb.num_parameters(), '').strip()} parameters · {per} · "
            f"{pruned} · {sparse}")


def describe_setup(retriever: Retriever | None, tabs: Sequence[LoadedTab], index_error: str) -> str:
    lines = []
    search_bb = retriever.backbone if retriever is not None else None
    if search_bb is not None:
        lines.append(f"**Search backbone:** {describe_backbone(search_bb)}")
        counts = {t: len(ix) for t, ix in retriever.indexes.items()}
        lines.append(f"**Index:** {counts.get('images', 0)} images, {counts.get('texts', 0)} captions")
    else:
        lines.append(f"**Search:** unavailable. {index_error}")
    for loaded in tabs:
        if loaded.error:
            lines.append(f"**{loaded.tab.title}:** unavailable. {loaded.error}")
            continue
        backbone = getattr(loaded.state, "backbone", None)
        if backbone is not None and backbone is not search_bb:
            lines.append(f"**{loaded.tab.title} backbone:** {describe_backbone(backbone)}")
        lines.append(loaded.tab.describe(loaded.state))
    return "\n\n".join(lines)


# ---- request handlers -----------------------------------------------------------------------------
def guarded(fn: Callable[..., tuple], empty: Callable[[], tuple]) -> Callable[..., tuple]:
    """Turn any failure into a warning toast plus a status message, so one bad request never takes
    the page (or the server) down; the last output of every handler is its status Markdown."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> tuple:
        try:
            return fn(*args)
        except (ImageLoadError, VlkitError) as exc:  # DemoInputError included
            message = str(exc)
        except Exception as exc:  # a bug must not kill the server: log it, tell the user
            log.exception("demo request failed")
            message = f"Something went wrong ({type(exc).__name__}: {exc}); the server log has the details."
        gr.Warning(message)
        return (*empty(), f"⚠️ {message}")

    return wrapper


GALLERY_SIDE = 256


def _gallery(hits: Sequence[Hit]) -> tuple[list[tuple[Image.Image, str]], int]:
    """Decoded thumbnails of the hits: the page gets copies of the pixels, never a path the server would
    then serve, so an index whose metadata names another file (``/etc/passwd``) exposes nothing."""
    items, missing = [], 0
    for h in hits:
        path = (h.metadata or {}).get("path")
        try:
            if not path:
                raise DemoInputError("no path")
            thumb, _ = open_image(path, GALLERY_SIDE)
            items.append((thumb, f"{h.score:.3f} · {Path(path).name}"))
        except (DemoInputError, OSError):  # gone, unreadable or not an image: say so, show no broken tile
            missing += 1
    return items, missing


class Handlers:
    """The demo's endpoints, independent of the page layout (so they are easy to read and test)."""

    def __init__(self, retriever: Retriever | None, index_error: str) -> None:
        self.retriever = retriever
        self.index_error = index_error or "No index is loaded."

    def _index(self, target: str) -> Retriever:
        if self.retriever is None:
            raise DemoInputError(self.index_error)
        if target not in self.retriever.indexes:
            raise DemoInputError("This index has no captions: rebuild it with "
                                 "`vlkit index images=... out=... captions=CAPTIONS.json` for image → text search.")
        return self.retriever

    @staticmethod
    def _k(k: float | None) -> int:
        return min(max(int(k or 1), 1), MAX_K)

    @torch.no_grad()
    def search_text(self, query: str, k: float) -> tuple[list, str]:
        query = check_query(query)
        with warnings.catch_warnings():  # the status says it instead
            warnings.simplefilter("ignore", TextTruncatedWarning)
            items, missing = _gallery(self._index("images").search(text=query, k=self._k(k), target="images"))
        return items, self._status(f"{len(items)} images for “{query}”", missing) + self._cut_note(query)

    def _cut_note(self, query: str) -> str:
        bb = self.retriever.backbone
        if not bb.truncated([query]):
            return ""
        return (f"; the query is longer than the model's {bb.context_length}-token text context, so only its "
                f"beginning was used")

    @torch.no_grad()
    def search_image(self, image: str | None, k: float) -> tuple[list, str]:
        pil, note = open_image(image, SEARCH_MAX_SIDE)
        items, missing = _gallery(self._index("images").search(image=pil, k=self._k(k), target="images"))
        return items, self._status(f"{len(items)} images similar to the query image{note}", missing)

    @torch.no_grad()
    def image_to_text(self, image: str | None, k: float) -> tuple[list[list], str]:
        pil, note = open_image(image, SEARCH_MAX_SIDE)
        hits = self._index("texts").search(image=pil, k=self._k(k), target="texts")
        rows = [[round(h.score, 4), (h.metadata or {}).get("text", f"caption {h.id}")] for h in hits]
        return rows, f"{len(rows)} captions for the query image{note}"

    @staticmethod
    def _status(text: str, missing: int) -> str:
        return text + (f"; {missing} indexed files no longer exist (or are not images) and were left out"
                       if missing else "")


# ---- the page -------------------------------------------------------------------------------------
class DemoBlocks(gr.Blocks):
    """gr.Blocks whose launch() defaults to the demo's safe settings: bound to 127.0.0.1, serving files only
    from the example images' folders (search results are sent as decoded thumbnails), answering only requests
    whose Host header names this machine (no DNS rebinding), uploads capped, system fonts."""

    def __init__(self, allowed_paths: Sequence[str | Path], **kwargs: Any) -> None:
        if not _GRADIO_6:
            kwargs.update(theme=_THEME, css=_CSS)
        super().__init__(**kwargs)
        self.demo_allowed_paths = sorted({str(Path(p).resolve()) for p in allowed_paths})

    def launch(self, *args: Any, allowed_hosts: Sequence[str] = (), **kwargs: Any) -> Any:
        """``allowed_hosts``: Host names accepted besides 127.0.0.1 and localhost (and the bound address);
        a server bound to every interface (0.0.0.0, ::) accepts any Host."""
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        kwargs.setdefault("server_name", "127.0.0.1")
        bound = str(kwargs["server_name"])
        hosts = ["*"] if bound in ("0.0.0.0", "::", "") else sorted({"127.0.0.1", "localhost", bound, *allowed_hosts})
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                    Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
        kwargs["app_kwargs"] = app_kwargs
        kwargs.setdefault("allowed_paths", list(self.demo_allowed_paths))
        kwargs.setdefault("max_file_size", MAX_UPLOAD)
        if _GRADIO_6:
            kwargs.setdefault("theme", _THEME)
            kwargs.setdefault("css", _CSS)
        return super().launch(*args, **kwargs)


def _search_tab(h: Handlers, k: int, queries: Sequence[str], images: Sequence[str]) -> None:
    with gr.Row(equal_height=True):
        query = gr.Textbox(label="Text query", placeholder=queries[0] if queries else "a red circle",
                           elem_id="search-query", scale=4)
        topk = gr.Slider(1, MAX_K, value=k, step=1, label="How many", elem_id="search-k", scale=1)
        text_btn = gr.Button("Search images", variant="primary", elem_id="search-button", scale=1)
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input(label="Query image", elem_id="search-image", height=240)
            with gr.Row():
                image_btn = gr.Button("Similar images", elem_id="search-image-button")
                caption_btn = gr.Button("Matching captions", elem_id="image-to-text-button")
        with gr.Column(scale=3):
            status = gr.Markdown("Type a query or upload an image.", label="Status", elem_id="search-status")
            gallery = gr.Gallery(label="Results", columns=4, object_fit="contain", elem_id="search-results",
                                 height="auto", format="png")  # lossless copies of the thumbnails
            captions = gr.Dataframe(headers=["score", "caption"], label="Captions", elem_id="caption-results",
                                    interactive=False, wrap=True)
    if queries:
        gr.Examples([[q] for q in queries], inputs=[query], label="Example queries")
    if images:
        gr.Examples([[p] for p in images], inputs=[image], label="Example images")
    no_gallery, no_rows = (lambda: ([],)), (lambda: ([],))
    text_fn = guarded(h.search_text, no_gallery)
    text_btn.click(text_fn, [query, topk], [gallery, status], api_name="search_text")
    query.submit(text_fn, [query, topk], [gallery, status], **PRIVATE)
    image_btn.click(guarded(h.search_image, no_gallery), [image, topk], [gallery, status], api_name="search_image")
    caption_btn.click(guarded(h.image_to_text, no_rows), [image, topk], [captions, status], api_name="image_to_text")


def build_app(retriever: Retriever | None, tabs: Sequence[LoadedTab] = (), *, index_error: str = "",
              examples: Sequence[tuple[str | Path, str]] = (), queries: Sequence[str] = DEFAULT_QUERIES,
              k: int = 12, title: str = "vlkit demo") -> DemoBlocks:
    """The demo page: the Search tab (``retriever`` None shows ``index_error`` there), then one tab per loaded
    plugin tab (``load_tabs``). ``examples`` are (image, query) pairs offered in every tab."""
    handlers = Handlers(retriever, index_error)
    images = [str(Path(p).resolve()) for p, _ in examples]
    allowed = sorted({Path(p).parent for p in images})  # the example images; results go out as thumbnails
    page = Page(examples=[(p, q) for p, (_, q) in zip(images, examples)])
    with DemoBlocks(allowed, title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {title}\nSearch an image index by text or by image"
                    + "".join(f", {t.tab.title.lower()}" for t in tabs) + ", with one shared backbone.")
        gr.Markdown(describe_setup(retriever, tabs, index_error), elem_id="backbone-info")
        with gr.Tabs():
            with gr.Tab("Search", id="search", elem_id="tab-search"):
                _search_tab(handlers, k, queries, images)
            for loaded in tabs:
                slug = loaded.tab.key
                with gr.Tab(loaded.tab.title, id=slug, elem_id=f"tab-{slug}"):
                    if loaded.error:
                        gr.Markdown(f"⚠️ {loaded.tab.title} is unavailable: {loaded.error}")
                    else:
                        loaded.tab.build(loaded.state, page)
    return app
