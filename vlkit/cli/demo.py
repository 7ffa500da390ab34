"""`vlkit demo`: the Gradio page for search and the plugins' tabs (the app itself lives in vlkit.demos).

Each plugin tab adds one key, its ``DemoTab.key`` (``ufo=RUN_DIR`` for the ufo plugin's segmentation tab)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from vlkit.cli.common import Command, kv_help
from vlkit.config import parse_kv
from vlkit.errors import VlkitError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class DemoArgs:
    # a saved backbone folder, an open_clip name, or cached:NAME; empty: the index's own backbone when
    # index= is given, else cached:vlkit-tiny-shapes (shipped with vlkit)
    model: str = ""
    pretrained: str | None = None
    # an index written by `vlkit index`; empty: a default one (shapes world test split, coco-mini when
    # present), built once per backbone under $VLKIT_CACHE/demo/
    index: str = ""
    # coco-mini for the default index and the examples: a folder, none, or empty for VLKIT_COCO_MINI /
    # the shared copy when present
    coco: str = ""
    host: str = "127.0.0.1"
    # Host header names the server answers besides 127.0.0.1, localhost and host (comma-separated), e.g. a
    # reverse proxy's name; requests naming any other host are refused (DNS rebinding)
    allowed_hosts: str = ""
    port: int = 7860
    # a public *.gradio.live link (needs internet; anyone with the link can use the demo)
    share: bool = False
    k: int = 12


def demo_schema() -> type:
    """DemoArgs plus one ``<key>: str`` per installed plugin's demo tab (a trained run for that tab)."""
    from vlkit.plugins import plugins_with

    keys = sorted({p.demo_tab.key for p in plugins_with("demo_tab")} - {f.name for f in dataclasses.fields(DemoArgs)})
    return dataclasses.make_dataclass("DemoArgs", [(k, str, dataclasses.field(default="")) for k in keys],
                                      bases=(DemoArgs,))


def _demo(args: list[str]) -> int:
    schema = demo_schema()
    opts = parse_kv(args, schema)
    runs = {f.name: getattr(opts, f.name) for f in dataclasses.fields(schema) if f.name not in _BASE_KEYS}
    if not 0 < opts.port < 65536:
        raise VlkitError(f"port={opts.port} is not a TCP port (1-65535)")
    from vlkit.demos.resources import prepare_app

    app = prepare_app(opts, runs)
    if opts.host not in LOCAL_HOSTS:
        print(f"vlkit demo: serving on {opts.host}: other machines on the network can reach it", file=sys.stderr)
    if opts.share:
        print("vlkit demo: share=true makes a public link; anyone who has it can use the demo", file=sys.stderr)
    try:
        hosts = [h.strip() for h in opts.allowed_hosts.split(",") if h.strip()]
        app.launch(server_name=opts.host, server_port=opts.port, share=opts.share, allowed_hosts=hosts)
    except OSError as exc:  # Gradio's message for a busy port names a range; say what to do instead
        raise VlkitError(f"cannot serve on {opts.host}:{opts.port} ({exc}); pick another port=...") from exc
    return 0


_BASE_KEYS = {f.name for f in dataclasses.fields(DemoArgs)}


def _help(_: list[str]) -> str:
    note = "plugin tab keys (a trained run for the tab; empty: its default): " + ", ".join(
        f"{f.name}=RUN_DIR" for f in dataclasses.fields(demo_schema()) if f.name not in _BASE_KEYS)
    return kv_help("demo", demo_schema(), note=note,
                   usage="[model=...] [index=DIR] [<tab>=RUN_DIR] [host=127.0.0.1] [port=7860] [share=false]")


DEMO = Command(_demo, "a web page to search an index, with the plugins' tabs (segmentation, ...)", _help)
