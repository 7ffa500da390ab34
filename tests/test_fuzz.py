"""Fuzz-style damage to every kind of file vlkit reads: truncations, bit flips and deletions.

Files vlkit writes (index, retriever, backbone folder, checkpoint, CSP vocabulary) carry checksums, so
each damaged copy must give a VlkitError or exactly the original result: never a traceback of another
type, never a silent wrong answer. Data files written by others (COCO and CZSL annotations) cannot be
checked against anything: they must give a VlkitError or load; nothing else may escape.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlkit.backbone import load_backbone
from vlkit.data.coco import CocoCaptions, CocoInstances
from vlkit.data.czsl import CZSLDataset
from vlkit.data.shapes import generate_shapes
from vlkit.engine.checkpoint import TrainerState, load_checkpoint, read_state, save_checkpoint
from vlkit.errors import VlkitError
from vlkit.index import VectorIndex
from vlkit.index.retriever import Retriever
from vlkit_csp import PromptModel, SoftVocab

MUTATIONS = 12  # per file: truncations and bit flips at seeded random places, plus a deletion


def _damaged_copies(folder: Path, tmp: Path, seed: int = 0):
    """(description, damaged copy of ``folder``) for every file in it and every mutation."""
    rng = random.Random(seed)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files
    n = 0
    for file in files:
        data = file.read_bytes()
        rel = file.relative_to(folder)
        cases = [("deleted", None)]
        for _ in range(MUTATIONS):
            if rng.random() < 0.5 and len(data) > 0:
                cut = rng.randrange(len(data))
                cases.append((f"truncated to {cut} of {len(data)} bytes", data[:cut]))
            elif data:
                pos, bit = rng.randrange(len(data)), rng.randrange(8)
                flipped = bytearray(data)
                flipped[pos] ^= 1 << bit
                cases.append((f"bit {bit} of byte {pos} flipped", bytes(flipped)))
        for what, content in cases:
            n += 1
            copy = tmp / f"case{n}"
            shutil.copytree(folder, copy)
            if content is None:
                (copy / rel).unlink()
            else:
                (copy / rel).write_bytes(content)
            yield f"{rel}: {what}", copy


def _check(load, original, folder: Path, tmp: Path) -> int:
    """Every damaged copy: VlkitError, or a result equal to ``original`` (compared by the caller's
    ``load``, which returns something comparable with ==)."""
    errors = 0
    for what, copy in _damaged_copies(folder, tmp):
        try:
            got = load(copy)
        except VlkitError:
            errors += 1
            continue
        except Exception as exc:  # anything else is a bug: say which damage caused it
            raise AssertionError(f"{what}: {type(exc).__name__} escaped: {exc}") from exc
        assert got == original, f"{what}: loaded without an error but the result differs (a silent wrong answer)"
        shutil.rmtree(copy)
    assert errors > 0
    return errors


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return load_backbone("vlkit-tiny-test").eval()


def test_backbone_folder(bb, tmp_path):
    bb.save(tmp_path / "bb")
    probe = torch.randn(2, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))

    def load(folder):
        with torch.no_grad():
            return load_backbone(folder).eval().encode_image(probe).numpy().tobytes()

    _check(load, load(tmp_path / "bb"), tmp_path / "bb", tmp_path / "cases")


def _vectors(n: int = 12, dim: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_vector_index(tmp_path):
    x = _vectors()
    index = VectorIndex(8)
    index.add(x, ids=np.arange(100, 112), metadata=[{"path": f"img{i}.png"} for i in range(12)])
    index.save(tmp_path / "ix")

    def load(folder):
        loaded = VectorIndex.load(folder)
        scores, ids = loaded.search(x[:3], 4)
        return scores.tobytes(), ids.tobytes(), str(loaded.search_records(x[:1], 12))

    _check(load, load(tmp_path / "ix"), tmp_path / "ix", tmp_path / "cases")


def test_retriever_folder(bb, tmp_path):
    retriever = Retriever(bb, progress=False)
    texts = ["a red circle", "a blue star", "two squares", "a green ring"]
    retriever.add_texts(texts)
    retriever.save(tmp_path / "r")

    def load(folder):
        loaded = Retriever.load(folder, backbone=bb, progress=False)
        return [(h.id, round(h.score, 6), str(h.metadata)) for h in loaded.search(text="a red circle", k=4,
                                                                                   target="texts")]

    _check(load, load(tmp_path / "r"), tmp_path / "r", tmp_path / "cases")


def test_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    task = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(task.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        task(torch.randn(6, 4)).sum().backward()
        opt.step()
    state = TrainerState(step=2, epoch=1, batch_in_epoch=3, best_value=0.5, best_step=2, plugin="toy", model="m")
    save_checkpoint(tmp_path / "ck", task, opt, state)

    def load(folder):
        torch.manual_seed(1)
        fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        got = load_checkpoint(folder, fresh, fresh_opt, "toy", "m", restore_rng=False)
        weights = tuple(t.numpy().tobytes() for t in fresh.state_dict().values())
        moments = tuple(v.numpy().tobytes() for s in fresh_opt.state_dict()["state"].values()
                        for v in s.values() if torch.is_tensor(v))
        return got, weights, moments, read_state(folder)

    _check(load, load(tmp_path / "ck"), tmp_path / "ck", tmp_path / "cases")


def test_csp_vocabulary(bb, tmp_path):
    vocab = PromptModel(bb, ["striped", "dotted"], ["circle", "star"], method="csp").vocab()
    vocab.save(tmp_path / "v")

    def load(folder):
        got = SoftVocab.load(folder, bb)
        return got.attrs, got.objs, got.template, got.attr_emb.numpy().tobytes(), got.obj_emb.numpy().tobytes()

    _check(load, load(tmp_path / "v"), tmp_path / "v", tmp_path / "cases")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_shapes(out, n_train=3, n_val=0, n_test=0, image_size=32, n_czsl_per_pair=1, progress=False)
    return out


@pytest.mark.parametrize("kind", ["captions", "instances"])
def test_coco_annotations_give_a_clear_error_or_load(world, tmp_path, kind):
    """Annotation files written by others carry no checksum: damage must end in a VlkitError or a load."""
    src = tmp_path / "ann"
    src.mkdir()
    shutil.copy(world / "annotations" / f"{kind}_train.json", src / "a.json")
    reader = CocoCaptions if kind == "captions" else CocoInstances
    for what, copy in _damaged_copies(src, tmp_path / "cases", seed=1):
        try:
            data = reader(world / "images" / "train", copy / "a.json", on_error="skip")
            for i in range(len(data)):
                data[i]
        except VlkitError:
            pass
        except Exception as exc:
            raise AssertionError(f"{kind} {what}: {type(exc).__name__} escaped: {exc}") from exc


def test_czsl_files_give_a_clear_error_or_load(world, tmp_path):
    root = tmp_path / "czsl"
    shutil.copytree(world / "czsl", root, ignore=shutil.ignore_patterns("images"))
    (root / "images").symlink_to(world / "czsl" / "images")
    for what, copy in _damaged_copies(root, tmp_path / "cases", seed=2):
        try:
            for split in ("train", "val", "test"):
                data = CZSLDataset(copy, split)
                if len(data):
                    data[0]
        except VlkitError:
            pass
        except Exception as exc:
            raise AssertionError(f"czsl {what}: {type(exc).__name__} escaped: {exc}") from exc


def test_mllm_backbone_folder(tmp_path):
    bb = load_backbone("vlkit-tiny-llava-test").eval()
    bb.save(tmp_path / "bb")
    probe = torch.randn(1, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))

    def load(folder):
        loaded = load_backbone(folder).eval()
        with torch.no_grad():
            return (loaded.encode_image(probe).numpy().tobytes(),
                    loaded.encode_text(loaded.tokenize(["a red circle"])).numpy().tobytes())

    _check(load, load(tmp_path / "bb"), tmp_path / "bb", tmp_path / "cases")
