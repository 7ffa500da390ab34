"""The Gradio demo driven through its HTTP API (gradio_client): search, captions, segmentation, bad input."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from vlkit.backbone import load_backbone
from vlkit.demos.app import LoadedTab, build_app, load_tabs
from vlkit.demos.resources import open_index
from vlkit.demos.testing import make_tiny_demo, serve
from vlkit.index.retriever import Retriever

# Gradio's own pandas calls (its queue statistics) warn under pandas 3; nothing of ours
GRADIO_NOISE = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
                pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
pytestmark = GRADIO_NOISE

SCORED = re.compile(r"^(-?\d+\.\d{3}) · (\S+)$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tiny = make_tiny_demo(root)
    retriever = Retriever.load(tiny.index, progress=False)
    app = build_app(retriever, load_tabs(retriever.backbone), examples=tiny.examples)
    url = serve(app)
    try:
        yield tiny, Client(url, verbose=False), root, url
    finally:
        app.close()


def test_a_query_longer_than_the_text_context_is_searched_and_the_status_says_it_was_cut(demo):
    _, client, _, _ = demo
    gallery, status = client.predict("a red circle " * 40, 3, api_name="/search_text")
    _status_ok(status)
    assert len(gallery) == 3 and "only its beginning was used" in status
    _, status = client.predict("a red circle", 3, api_name="/search_text")
    assert "beginning" not in status


def _status_ok(status: str) -> None:
    assert not status.startswith("⚠️"), status


def test_search_text_returns_index_files_with_scores(demo):
    tiny, client, _, _ = demo
    gallery, status = client.predict("a red circle", 5, api_name="/search_text")
    _status_ok(status)
    assert 1 <= len(gallery) <= 5
    scores = []
    for item in gallery:
        score, name = SCORED.match(item["caption"]).groups()
        original = tiny.images / name  # the file the index points at, sent as a decoded (lossless) copy
        assert original.is_file()
        with Image.open(item["image"]) as shown, Image.open(original) as src:
            assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(src.convert("RGB")))
        scores.append(float(score))
    assert scores == sorted(scores, reverse=True)


def test_search_image_finds_itself_and_image_to_text_returns_captions(demo):
    tiny, client, _, _ = demo
    query = tiny.examples[0][0]
    gallery, status = client.predict(handle_file(query), 3, api_name="/search_image")
    _status_ok(status)
    best_score, best_name = SCORED.match(gallery[0]["caption"]).groups()
    assert best_name == Path(query).name and float(best_score) > 0.99

    table, status = client.predict(handle_file(query), 4, api_name="/image_to_text")
    _status_ok(status)
    captions = {a["caption"].strip() for a in json.loads(tiny.captions.read_text())["annotations"]}
    assert table["headers"] == ["score", "caption"] and len(table["data"]) == 4
    assert all(caption in captions for _, caption in table["data"])


def _overlay_size(client, image: Path, query: str = "red circle") -> tuple[tuple[int, int], str, list]:
    overlay, table, status = client.predict(handle_file(str(image)), query, 0.0, api_name="/segment")
    _status_ok(status)
    with Image.open(overlay) as im:
        return im.size, status, table["data"]


def test_segment_overlays_at_the_input_size(demo):
    tiny, client, root, _ = demo
    photo = root / "photo.png"  # photo-sized (>= 256 px a side): the overlay keeps the exact input size
    Image.open(tiny.examples[0][0]).resize((320, 256), Image.Resampling.NEAREST).save(photo)
    size, status, rows = _overlay_size(client, photo)
    assert size == (320, 256) and "instance(s) of “red circle”" in status
    assert all(0 <= r[2][0] <= r[2][2] <= 320 and 0 <= r[2][1] <= r[2][3] <= 256 for r in rows)
    # a 64 px shapes image is drawn at an integer scale (readable labels), aspect and pixels kept
    size, _, _ = _overlay_size(client, Path(tiny.examples[0][0]))
    assert size[0] == size[1] and size[0] % 64 == 0 and size[0] >= 256
    huge = root / "huge.jpg"
    Image.new("RGB", (4000, 3000), (30, 30, 30)).save(huge, quality=70)
    size, status, _ = _overlay_size(client, huge)
    assert size == (1024, 768) and "downscaled from 4000×3000" in status


def test_bad_input_gives_a_clear_message_and_the_server_keeps_serving(demo):
    tiny, client, root, _ = demo
    gallery, status = client.predict("   ", 5, api_name="/search_text")
    assert gallery == [] and "Type a text query first" in status
    notes = root / "notes.txt"
    notes.write_text("not a picture")
    for api in ("/search_image", "/image_to_text"):
        _, status = client.predict(handle_file(str(notes)), 3, api_name=api)
        assert "notes.txt is not an image file" in status
    overlay, _, status = client.predict(handle_file(str(notes)), "a star", 0.5, api_name="/segment")
    assert overlay is None and "notes.txt is not an image file" in status
    _, _, status = client.predict(handle_file(tiny.examples[0][0]), "", 0.5, api_name="/segment")
    assert "Type a text query first" in status
    gallery, status = client.predict("a blue star", 2, api_name="/search_text")  # still serving
    _status_ok(status)
    assert len(gallery) == 2


def _status_code(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serves_only_index_and_example_files(demo):
    tiny, _, root, url = demo
    (root / "secret.png").write_bytes((tiny.images / "000001.png").read_bytes())
    assert _status_code(f"{url}gradio_api/file={tiny.images / '000001.png'}") == 200
    for other in (root / "secret.png", tiny.captions, Path(__file__)):
        assert _status_code(f"{url}gradio_api/file={other}") == 403, other


def test_index_of_another_backbone_is_explained_and_a_ufo_head_segments(demo):
    from vlkit_ufo import Segmenter, UfoConfig
    from vlkit_ufo.demo_tab import SEGMENTATION, segment_tool
    from vlkit_ufo.segment import build_decoder

    tiny, _, _, _ = demo
    torch.manual_seed(1)
    other = load_backbone("vlkit-tiny-test")  # same architecture, other weights
    retriever, message = open_index(str(tiny.index), other)
    assert retriever is None and "does not match the loaded backbone" in message
    segmenter = Segmenter(other, build_decoder(UfoConfig(), other.embed_dim), UfoConfig())  # an untrained head
    app = build_app(None, [LoadedTab(SEGMENTATION, segment_tool(segmenter))], index_error=message,
                    examples=tiny.examples)
    try:
        client = Client(serve(app), verbose=False)
        gallery, status = client.predict("a red circle", 3, api_name="/search_text")
        assert gallery == [] and "does not match the loaded backbone" in status and "model=" in status
        overlay, _, status = client.predict(handle_file(tiny.examples[0][0]), "a ring", 0.0, api_name="/segment")
        _status_ok(status)  # segmentation does not need the index
        assert Path(overlay).is_file()
    finally:
        app.close()


def test_demo_command_is_registered_and_checks_its_keys(capsys):
    from vlkit.cli import main

    assert main(["demo", "--help"]) == 0
    assert "ufo (str)" in capsys.readouterr().out
    assert main(["demo", "port=0"]) == 2
    assert "port=0 is not a TCP port" in capsys.readouterr().err
    assert main(["demo", "prot=7860"]) == 2  # a typo is named before anything loads
    assert "prot" in capsys.readouterr().err


def test_a_crafted_index_exposes_no_other_file_and_foreign_hosts_are_refused(demo, tmp_path):
    import urllib.request

    tiny, _, _, url = demo
    retriever = Retriever.load(tiny.index, progress=False)
    bogus = retriever.embed_texts(["a red circle"])  # the best match for that query, pointing at other files
    retriever.add_vectors("images", torch.cat([bogus, bogus]), metadata=[{"path": "/etc/passwd"},
                                                                         {"path": str(tiny.captions)}])
    app = build_app(retriever, load_tabs(retriever.backbone), examples=tiny.examples)
    crafted = serve(app)
    try:
        gallery, status = Client(crafted, verbose=False).predict("a red circle", 5, api_name="/search_text")
        assert "2 indexed files no longer exist (or are not images)" in status
        assert all(SCORED.match(item["caption"]).group(2) not in ("passwd", tiny.captions.name) for item in gallery)
        for other in ("/etc/passwd", tiny.captions):
            assert _status_code(f"{crafted}gradio_api/file={other}") == 403
    finally:
        app.close()
    request = urllib.request.Request(url, headers={"Host": "attacker.example:7860"})
    with pytest.raises(urllib.error.HTTPError) as err:  # a DNS-rebinding page names its own host
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert _status_code(url.replace("127.0.0.1", "localhost")) == 200


def test_the_demo_binds_to_localhost_by_default():
    from vlkit.cli.demo import DemoArgs
    from vlkit.demos.testing import free_port

    assert DemoArgs().host == "127.0.0.1"
    app = build_app(None, (), index_error="no index in this test")
    app.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)  # no server_name given
    try:
        assert app.server_name == "127.0.0.1"
        assert _status_code(f"http://127.0.0.1:{app.server_port}/") == 200
    finally:
        app.close()
