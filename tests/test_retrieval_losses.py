"""Retrieval losses checked against values worked out by hand on 2-3 item batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlkit_retrieval.losses import (
    LOSSES,
    combined_loss,
    contrastive_loss,
    positive_mask,
    ranking_loss,
)

# Similarity matrix S[i, t] = s(image i, text t); img = I and txt = S^T make img @ txt.T == S exactly.
S3 = [[0.9, 0.5, 0.6], [0.8, 0.3, 0.1], [0.2, 0.4, 0.7]]


def embed(sim: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(sim, dtype=torch.float64)
    return torch.eye(s.shape[0], dtype=torch.float64), s.T.clone()


def test_ranking_sum_over_negatives_matches_hand_values():
    img, txt = embed(S3)
    pos = torch.eye(3, dtype=torch.bool)
    # margin 0.2, hinge [0.2 - s(i,i) + s_neg]_+ per positive (i,i):
    #   (0,0) s=.9: captions .5,.6 -> 0, 0;   images .8,.2 -> .1, 0
    #   (1,1) s=.3: captions .8,.1 -> .7, 0;  images .5,.4 -> .4, .3
    #   (2,2) s=.7: captions .2,.4 -> 0, 0;   images .6,.1 -> .1, 0
    loss = ranking_loss(img, txt, pos, margin=0.2, max_violation=False, reduction="sum")
    assert loss.item() == pytest.approx(0.1 + 0.7 + 0.4 + 0.3 + 0.1)
    mean = ranking_loss(img, txt, pos, margin=0.2, max_violation=False, reduction="mean")
    assert mean.item() == pytest.approx(1.6 / 3)


def test_ranking_max_violation_keeps_only_hardest_negative():
    img, txt = embed(S3)
    pos = torch.eye(3, dtype=torch.bool)
    # hardest per direction: (0,0): 0 + .1; (1,1): .7 + max(.4, .3); (2,2): 0 + .1
    loss = ranking_loss(img, txt, pos, margin=0.2, max_violation=True, reduction="sum")
    assert loss.item() == pytest.approx(0.1 + 1.1 + 0.1)
    assert ranking_loss(img, txt, pos).item() == pytest.approx(1.3 / 3)  # defaults: MH, mean


def test_ranking_two_items_no_violation_is_zero():
    img, txt = embed([[0.9, 0.1], [0.2, 0.8]])  # every positive beats its negative by >= margin
    assert ranking_loss(img, txt, torch.eye(2, dtype=torch.bool), margin=0.2).item() == 0.0


def test_positive_mask_same_image_or_same_normalised_caption():
    mask = positive_mask(["a", "b", "c", "a"], ["A dog.", "a  dog. ", "a cat", "two birds"])
    expected = torch.tensor(
        [
            [1, 1, 0, 1],  # pair 0 shares its caption with 1 and its image with 3
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="one entry per pair"):
        positive_mask([1, 2], ["x"])


def test_duplicate_caption_is_not_a_negative():
    img, txt = embed(S3)
    pos = positive_mask([10, 11, 12], ["A dog.", "a  dog.", "a cat"])  # texts 0 and 1 are the same caption
    # positives: (0,0) (0,1) (1,0) (1,1) (2,2); hardest negative per direction, margin .2:
    #   (0,0) s=.9: caption t2 .6 -> 0;  image i2 .2 -> 0
    #   (0,1) s=.5: caption t2 .6 -> .3; image i2 .4 -> .1
    #   (1,0) s=.8: caption t2 .1 -> 0;  image i2 .2 -> 0
    #   (1,1) s=.3: caption t2 .1 -> 0;  image i2 .4 -> .3
    #   (2,2) s=.7: captions .2,.4 -> 0; images .6,.1 -> .1
    loss = ranking_loss(img, txt, pos, margin=0.2, max_violation=True, reduction="sum")
    assert loss.item() == pytest.approx(0.3 + 0.1 + 0.3 + 0.1)
    # Treating the twin caption as a negative (diagonal mask) would charge (1,1) .7 for it.
    naive = ranking_loss(img, txt, torch.eye(3, dtype=torch.bool), max_violation=True, reduction="sum")
    assert naive.item() == pytest.approx(1.3)


def test_contrastive_multi_positive_hand_value():
    img, txt = embed([[1.0, 1.0], [0.0, 2.0]])
    pos = torch.tensor([[True, True], [False, True]])  # image 0 has two captions; text 1 fits both images
    # image rows: row0 all positive -> 0; row1 lse(0, 2) - 2 = log(1 + e^-2)
    # text cols:  col0 lse(1, 0) - 1 = log(1 + e^-1); col1 all positive -> 0
    expected = (math.log(1 + math.exp(-2)) / 2 + math.log(1 + math.exp(-1)) / 2) / 2
    assert contrastive_loss(img, txt, pos, logit_scale=1.0).item() == pytest.approx(expected)


def test_contrastive_one_positive_per_row_is_clip_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    logits = 10.0 * img @ txt.T
    clip = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    ours = contrastive_loss(img, txt, torch.eye(5, dtype=torch.bool), logit_scale=10.0)
    assert ours.item() == pytest.approx(clip.item(), rel=1e-5)


def test_contrastive_rejects_row_without_positive():
    img, txt = embed([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="no positive"):
        contrastive_loss(img, txt, torch.tensor([[True, True], [False, False]]), logit_scale=1.0)


def test_combined_is_weighted_sum_and_gradients_flow():
    torch.manual_seed(0)
    img = torch.randn(4, 6, requires_grad=True)
    txt = torch.randn(4, 6, requires_grad=True)
    scale = torch.tensor(5.0, requires_grad=True)
    pos = positive_mask([0, 1, 1, 2], ["a", "b", "c", "a"])
    total = combined_loss(img, txt, pos, scale, weights={"ranking": 2.0, "contrastive": 0.5})
    parts = 2.0 * ranking_loss(img, txt, pos) + 0.5 * contrastive_loss(img, txt, pos, scale)
    assert total.item() == pytest.approx(parts.item())
    total.backward()
    for t in (img, txt, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_registry_lookup_and_errors():
    assert {"ranking", "contrastive", "combined"} <= set(LOSSES.names())
    assert LOSSES.get("ranking") is ranking_loss
    with pytest.raises(KeyError, match="Did you mean 'ranking'"):
        LOSSES.get("rankng")
    img, txt = embed([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(KeyError, match="Did you mean 'contrastive'"):
        combined_loss(img, txt, torch.eye(2, dtype=torch.bool), 1.0, weights={"contrastiv": 1.0})
    with pytest.raises(ValueError, match="positive_mask"):
        ranking_loss(img, txt, torch.eye(3, dtype=torch.bool))


def test_contrastive_extra_negative_texts_only_compete_in_image_rows():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    pos = torch.zeros(3, 5, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = True  # texts 3 and 4: hard negatives, true of no image
    logits = 10.0 * img @ txt.T
    i2t = F.cross_entropy(logits, torch.arange(3))  # rows see all 5 texts
    t2i = F.cross_entropy(logits[:, :3].T, torch.arange(3))  # columns: only the 3 matched texts
    assert contrastive_loss(img, txt, pos, 10.0).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)
    # and a hard negative raises the loss of the image it resembles
    closer = txt.clone()
    closer[3] = img[0]
    assert contrastive_loss(img, closer, pos, 10.0) > contrastive_loss(img, txt, pos, 10.0)
