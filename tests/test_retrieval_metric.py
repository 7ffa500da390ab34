"""Recall@K against a hand-worked multi-caption example, a naive reference, and its error cases."""

import numpy as np
import pytest
import torch

from vlkit.metrics.retrieval import Positives, positives_from_index, recall_at_k, similarity_in_chunks

# 3 images x 2 captions: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
CAPTION_IMAGE = [0, 0, 1, 1, 2, 2]
SIM = [
    # img0  img1  img2      t2i rank of the positive image (negatives scoring >= it)
    [0.55, 0.10, 0.20],  # 0
    [0.30, 0.50, 0.10],  # 1 (img1 beats it)
    [0.20, 0.80, 0.40],  # 0
    [0.60, 0.60, 0.10],  # 1: tied with negative img0 -> pessimistic, counts against
    [0.70, 0.20, 0.30],  # 1 (img0 beats it)
    [0.10, 0.20, 0.25],  # 0
]
# i2t, column by column (best positive text vs negative texts):
#   img0: positives .55 (t0), .30 (t1); negatives >= .55: t3 .60, t4 .70  -> rank 2
#   img1: positives .80 (t2), .60 (t3); none >= .80                       -> rank 0
#   img2: positives .30 (t4), .25 (t5); negatives >= .30: t2 .40          -> rank 1
EXPECTED = {
    "t2i_R@1": 50.0,  # 3 of 6 at rank 0
    "t2i_R@2": 100.0,
    "t2i_R@5": 100.0,
    "i2t_R@1": 100.0 / 3,
    "i2t_R@2": 200.0 / 3,
    "i2t_R@5": 100.0,
}


def test_hand_worked_example_all_positive_formats():
    dense = torch.zeros(6, 3, dtype=torch.bool)
    dense[torch.arange(6), torch.tensor(CAPTION_IMAGE)] = True
    for sim, pos in [
        (torch.tensor(SIM), torch.tensor(CAPTION_IMAGE)),
        (np.array(SIM, dtype=np.float32), positives_from_index(CAPTION_IMAGE)),
        (torch.tensor(SIM, dtype=torch.float16), dense),
        (np.array(SIM), dense.numpy()),
    ]:
        got = recall_at_k(sim, pos, ks=(1, 2, 5), chunk_size=2)
        assert set(got) == set(EXPECTED) | {"rsum"}
        for key, value in EXPECTED.items():
            assert got[key] == pytest.approx(value), key
        assert got["rsum"] == pytest.approx(450.0)


def test_constant_scores_never_count_as_hits():
    # Pessimistic ties: a model that scores everything the same ranks last, not first.
    got = recall_at_k(torch.zeros(6, 3), CAPTION_IMAGE, ks=(1, 2, 3))
    assert got["t2i_R@1"] == got["t2i_R@2"] == 0.0 and got["t2i_R@3"] == 100.0  # only 2 negatives
    assert got["i2t_R@1"] == 0.0


def naive_recall(sim: np.ndarray, pos: np.ndarray, ks: list[int]) -> dict[str, float]:
    out = {}
    for name, s, p in (("t2i", sim, pos), ("i2t", sim.T, pos.T)):
        ranks = []
        for row, prow in zip(s, p, strict=True):
            best = row[prow].max()
            ranks.append(sum(1 for v, is_pos in zip(row, prow, strict=True) if not is_pos and v >= best))
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean([r < k for r in ranks])
    return out


def test_chunked_equals_unchunked_and_naive_with_multi_positives_and_ties():
    rng = np.random.default_rng(0)
    n_t, n_i = 53, 17
    sim = np.round(rng.standard_normal((n_t, n_i)), 1).astype(np.float32)  # rounding makes many ties
    pos = rng.random((n_t, n_i)) < 0.08
    pos[np.arange(n_t), rng.integers(0, n_i, n_t)] = True  # every text has >= 1 image ...
    pos[rng.integers(0, n_t, n_i), np.arange(n_i)] = True  # ... and every image >= 1 text
    ks = [1, 3, 5, 10]
    full = recall_at_k(sim, pos, ks=ks, chunk_size=10_000)
    for chunk in (1, 4, 7, 16):  # 53 and 17 leave a remainder for each
        assert recall_at_k(sim, pos, ks=ks, chunk_size=chunk) == full
    ref = naive_recall(sim, pos, ks)
    for key, value in ref.items():
        assert full[key] == pytest.approx(value), key
    pairs = Positives.from_pairs(*np.nonzero(pos), n_texts=n_t, n_images=n_i)
    assert recall_at_k(torch.from_numpy(sim), pairs, ks=ks, chunk_size=5) == full


def test_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match=r"1 text\(s\) have no positive image \(indices 2\)"):
        pos = torch.tensor([[True, False], [False, True], [False, False]])
        recall_at_k(torch.rand(3, 2), pos)
    with pytest.raises(ValueError, match=r"image\(s\) have no positive text \(indices 2\)"):
        recall_at_k(torch.rand(2, 3), positives_from_index([0, 1], n_images=3))


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="positives have shape"):
        recall_at_k(torch.rand(6, 4), torch.ones(6, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        recall_at_k(torch.rand(2, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(torch.rand(2, 2), torch.tensor([0, 1]), ks=(0,))


def test_similarity_in_chunks_matches_matmul():
    torch.manual_seed(0)
    t, i = torch.randn(11, 8), torch.randn(5, 8)
    assert torch.allclose(similarity_in_chunks(t, i, chunk_size=3), t @ i.T)
