"""VectorIndex: exact search vs numpy, save/load round trip, expect checks, atomic save, approximate recall."""

import json
import sys

import faiss
import numpy as np
import pytest
import torch

import vlkit.index as vindex
import vlkit.io as vio
from vlkit.index import IndexFormatError, IndexMismatchError, VectorIndex

DIM = 16


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # Tiny indexes: OpenMP threads only add contention on a shared machine (HNSW build got 15x slower).
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


@pytest.fixture
def filled() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = unit(rng, 300)
    ids = np.arange(300, dtype=np.int64) * 3 + 100
    index = VectorIndex(DIM, info={"backbone": "vlkit-tiny@abc", "embed_dim": DIM})
    index.add(x[:120], ids=ids[:120], metadata=[{"path": f"img{i}.jpg"} for i in ids[:120]])
    index.add(torch.from_numpy(x[120:]), ids=torch.from_numpy(ids[120:]))  # later adds: no metadata
    return index, x, ids


def test_flat_search_equals_numpy_brute_force(filled):
    index, x, ids = filled
    q = unit(np.random.default_rng(1), 7)
    scores, got = index.search(q, 10)
    ref_scores, ref_ids = brute_force(x, ids, q, 10)
    assert np.array_equal(got, ref_ids)
    assert np.allclose(scores, ref_scores, atol=1e-5)
    assert len(index) == 300 and np.array_equal(index.ids, ids)


def test_l2_metric_and_short_results():
    rng = np.random.default_rng(2)
    x, q = unit(rng, 5), unit(rng, 2)
    index = VectorIndex(DIM, metric="l2")
    assert np.array_equal(index.add(x), np.arange(5))
    scores, ids = index.search(q, 8)  # only 5 vectors: tail is id -1 with the worst (inf) distance
    d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    assert np.array_equal(ids[:, :5], np.argsort(d, axis=1)) and (ids[:, 5:] == -1).all()
    assert np.isinf(scores[:, 5:]).all() and np.allclose(scores[:, :5], np.sort(d, axis=1), atol=1e-5)
    assert [len(r) for r in index.search_records(q, 8)] == [5, 5]
    empty_scores, empty_ids = VectorIndex(DIM).search(q, 3)
    assert (empty_ids == -1).all() and np.isneginf(empty_scores).all()


def test_search_records_carry_metadata(filled):
    index, x, ids = filled
    records = index.search_records(x[[0, 200]], 1)
    assert records[0] == [
        {"id": 100, "score": pytest.approx(1.0, abs=1e-5), "metadata": {"path": "img100.jpg"}}
    ]
    assert records[1][0]["id"] == ids[200] and records[1][0]["metadata"] is None


def test_save_load_round_trip(filled, tmp_path):
    index, x, _ = filled
    q = unit(np.random.default_rng(3), 9)
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["dim"] == DIM and manifest["count"] == 300 and manifest["kind"] == "flat"
    assert (
        manifest["format_version"] == vindex.FORMAT_VERSION
        and manifest["info"]["backbone"] == "vlkit-tiny@abc"
    )
    loaded = VectorIndex.load(tmp_path / "idx", expect={"backbone": "vlkit-tiny@abc", "dim": DIM})
    for a, b in zip(index.search(q, 12), loaded.search(q, 12), strict=True):
        assert np.array_equal(a, b)
    assert loaded.search_records(q, 12) == index.search_records(q, 12)
    assert loaded.info == index.info and len(loaded) == 300
    # the loaded index keeps growing with fresh ids
    new_ids = loaded.add(x[:2])
    assert new_ids.min() > index.ids.max()


def test_load_with_mismatched_expect_explains_the_fix(filled, tmp_path):
    index, _, _ = filled
    index.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError) as err:
        VectorIndex.load(tmp_path / "idx", expect={"backbone": "ViT-B-32@def", "dim": 512})
    msg = str(err.value)
    assert "built with backbone='vlkit-tiny@abc', dim=16" in msg
    assert "loaded with backbone='ViT-B-32@def', dim=512" in msg
    assert "rebuild the index" in msg and "load the model it was built with" in msg
    with pytest.raises(IndexMismatchError, match=r"tokenizer=\(not recorded\)"):
        VectorIndex.load(tmp_path / "idx", expect={"tokenizer": "bpe"})


def test_missing_and_corrupt_directories(filled, tmp_path):
    index, _, _ = filled
    with pytest.raises(FileNotFoundError, match="no vector index at"):
        VectorIndex.load(tmp_path / "nope")
    index.save(tmp_path / "idx")
    blob = tmp_path / "idx" / "index.faiss"
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(IndexFormatError, match="index.faiss is 100 bytes"):
        VectorIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json is corrupt"):
        VectorIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("name", ["index.faiss", "ids.npy", "metadata.jsonl"])
def test_same_size_corruption_of_any_index_file_is_caught_by_its_checksum(filled, tmp_path, name):
    index, _, _ = filled
    index.save(tmp_path / "idx")
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one flipped bit near the end: a vector's value, an id, or a metadata character
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=f"{name} does not match the checksum in manifest.json"):
        VectorIndex.load(tmp_path / "idx")
    # an index saved before checksums existed still loads (its sizes are still checked)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest.pop("sha256")
    manifest.pop("sha256_self")  # nor its own seal
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    path.write_bytes(bytes(data))
    if name == "metadata.jsonl":
        return  # a flipped character may make the JSON unreadable: that is reported by its own check
    VectorIndex.load(tmp_path / "idx")


def _assert_is_original(path, index, q) -> None:
    loaded = VectorIndex.load(path)
    assert len(loaded) == len(index)
    for a, b in zip(index.search(q, 5), loaded.search(q, 5), strict=True):
        assert np.array_equal(a, b)


def test_crash_mid_save_keeps_previous_index(filled, tmp_path, monkeypatch):
    index, x, _ = filled
    q = unit(np.random.default_rng(4), 3)
    target = tmp_path / "idx"
    index.save(target)
    other = VectorIndex(DIM)
    other.add(x[:10])

    def crash(idx, path):  # writes part of the file, then dies like a full disk would
        with open(path, "wb") as f:
            f.write(b"IxF2partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError, match="No space left"):
        other.save(target)
    _assert_is_original(target, index, q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dir left behind


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_overwrite_replaces_whole_index(filled, tmp_path, monkeypatch, exchange):
    index, x, _ = filled
    target = tmp_path / "idx"
    index.save(target)
    used: list[bool] = []
    real = vio._rename_exchange

    def exchange_spy(a, b) -> bool:  # records which install path ran; False forces the fallback
        used.append(real(a, b) if exchange else False)
        return used[-1]

    monkeypatch.setattr(vio, "_rename_exchange", exchange_spy)
    small = VectorIndex(DIM)
    small.add(x[:10])
    small.save(target)
    assert len(VectorIndex.load(target)) == 10
    assert not (target / "metadata.jsonl").exists()  # nothing of the old index is mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert used == [exchange] or not sys.platform.startswith("linux")


def test_unserializable_metadata_fails_save_and_keeps_target(filled, tmp_path):
    index, x, _ = filled
    index.save(tmp_path / "idx")
    bad = VectorIndex(DIM)
    bad.add(x[:1], metadata=[{"when": object()}])
    with pytest.raises(TypeError, match="metadata of id 0 is not JSON-serializable"):
        bad.save(tmp_path / "idx")
    _assert_is_original(tmp_path / "idx", index, x[:3])


def test_refuses_to_overwrite_unrelated_directory(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        VectorIndex(DIM).save(tmp_path / "photos")


def clustered(rng: np.random.Generator, n: int, n_clusters: int = 20) -> np.ndarray:
    centers = unit(rng, n_clusters)
    x = centers[rng.integers(0, n_clusters, n)] + 0.15 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "kind,params", [("HNSW32", {"efSearch": 64}), ("IVF16,Flat", {"nprobe": 4})], ids=["hnsw", "ivf"]
)
def test_approximate_kind_reaches_high_recall(kind, params, tmp_path):
    rng = np.random.default_rng(5)
    x, q = clustered(rng, 3000), clustered(rng, 50)
    exact, approx = VectorIndex(DIM), VectorIndex(DIM, kind=kind, **params)
    exact.add(x)
    approx.add(x[:2000])  # IVF trains on this first add
    approx.add(x[2000:])
    _, want = exact.search(q, 10)
    _, got = approx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert recall >= 0.9, recall
    approx.save(tmp_path / "a")
    assert np.array_equal(VectorIndex.load(tmp_path / "a").search(q, 10)[1], got)


def test_training_needs_enough_vectors_and_errors_are_clear():
    rng = np.random.default_rng(6)
    ivf = VectorIndex(DIM, kind="IVF64,Flat")
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        ivf.add(unit(rng, 10))
    assert len(ivf) == 0
    with pytest.raises(ValueError, match="no search parameter 'nprobe'"):
        VectorIndex(DIM, nprobe=8)
    with pytest.raises(ValueError, match="cannot build index kind 'IVFoo'"):
        VectorIndex(DIM, kind="IVFoo")
    flat = VectorIndex(DIM)
    flat.add(unit(rng, 3), ids=[5, 6, 7])
    with pytest.raises(ValueError, match=r"already in the index: \[6\]"):
        flat.add(unit(rng, 2), ids=[6, 8])
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        flat.add(np.zeros((2, 8), np.float32))


def test_reserve_keeps_contents_and_results():
    rng = np.random.default_rng(7)
    x, q = unit(rng, 50), unit(rng, 4)
    plain, reserved = VectorIndex(DIM), VectorIndex(DIM)
    reserved.reserve(1000)
    assert len(reserved) == 0
    for chunk in np.array_split(x, 5):
        plain.add(chunk)
        reserved.add(chunk)
    for a, b in zip(plain.search(q, 5), reserved.search(q, 5), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_query_batch_takes_the_blas_path_with_the_same_results_as_one_query_at_a_time(metric):
    from vlkit.index.faiss_ops import BLAS_MIN_QUERIES

    rng = np.random.default_rng(3)
    x, q = unit(rng, 500), unit(rng, 3 * BLAS_MIN_QUERIES)
    index = VectorIndex(DIM, metric=metric)
    index.add(x)
    threshold = faiss.cvar.distance_compute_blas_threshold
    batch_scores, batch_ids = index.search(q, 5)
    assert faiss.cvar.distance_compute_blas_threshold == threshold  # faiss's global switch is restored
    one = [index.search(q[i:i + 1], 5) for i in range(len(q))]
    assert np.array_equal(batch_ids, np.concatenate([ids for _, ids in one]))
    np.testing.assert_allclose(batch_scores, np.concatenate([s for s, _ in one]), rtol=1e-5, atol=1e-5)
    # and both are the brute-force answer
    dist = q @ x.T if metric == "ip" else -((q[:, None] - x[None]) ** 2).sum(-1)
    assert np.array_equal(batch_ids, np.argsort(-dist, axis=1, kind="stable")[:, :5])
