"""Shared test setup: a private vlkit cache, small thread counts, the coco-mini location."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
REPO = TESTS.parent
COCO_MINI = Path(os.environ.get("VLKIT_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))

sys.path.insert(0, str(TESTS))
torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vlkit-cache")
    old = os.environ.get("VLKIT_CACHE")
    os.environ["VLKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("VLKIT_CACHE", None)
    else:
        os.environ["VLKIT_CACHE"] = old


@pytest.fixture
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations").is_dir():
        pytest.skip(f"coco-mini not found at {COCO_MINI} (set VLKIT_COCO_MINI to its folder)")
    return COCO_MINI


@pytest.fixture
def toy_plugin():
    import toy_plugin as tp

    import vlkit

    if "toy" not in vlkit.list_plugins():
        vlkit.register_plugin(tp.PLUGIN)
    return tp.PLUGIN
