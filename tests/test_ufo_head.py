"""Tests for the UFO building blocks: mask assembly, decoder, post-processing, losses and matching."""

import math

import pytest
import torch
from torch import nn

from vlkit_ufo.head import (
    QueryDecoder,
    assemble_masks,
    masks_to_boxes,
    predict,
    semantic_labels,
    training_free_logits,
)
from vlkit_ufo.losses import LossWeights, dice_loss, score_loss, sigmoid_focal_loss, ufo_loss
from vlkit_ufo.matching import hungarian_match

# ---------------------------------------------------------------- assemble_masks


def test_assemble_masks_pixel_shuffle_hand_case():
    # h = w = 2, C = 4. feats[y, x] = m(y, x) * ones(4) with m = [[1, 2], [3, 4]];
    # embedding k = k * ones(4). Map k at (y, x) = (4 * k * m) / sqrt(4) = 2 * k * m,
    # placed at (4y + dy, 4x + dx) with k = 4 * dy + dx.
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    feats = (m[..., None] * torch.ones(4)).reshape(1, 2, 2, 4)
    emb = torch.arange(16.0)[:, None].expand(16, 4).reshape(1, 1, 16, 4)
    expected = torch.tensor(
        [
            [0, 2, 4, 6, 0, 4, 8, 12],  # y=0, dy=0: k=0..3, m=1 | m=2
            [8, 10, 12, 14, 16, 20, 24, 28],  # dy=1: k=4..7
            [16, 18, 20, 22, 32, 36, 40, 44],  # dy=2: k=8..11
            [24, 26, 28, 30, 48, 52, 56, 60],  # dy=3: k=12..15
            [0, 6, 12, 18, 0, 8, 16, 24],  # y=1, dy=0: m=3 | m=4
            [24, 30, 36, 42, 32, 40, 48, 56],
            [48, 54, 60, 66, 64, 72, 80, 88],
            [72, 78, 84, 90, 96, 104, 112, 120],
        ],
        dtype=torch.float32,
    )
    out = assemble_masks(emb, feats)
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out[0, 0], expected)


def test_assemble_masks_matches_ufo_permute_layout_and_resizes():
    torch.manual_seed(0)
    emb, feats = torch.randn(2, 3, 16, 8), torch.randn(2, 5, 6, 8)
    out = assemble_masks(emb, feats)
    # UFO: maps.view(N, 4, 4, h, w).permute(0, 3, 1, 4, 2).flatten(1, 2).flatten(2, 3)
    maps = torch.einsum("bnkc,bhwc->bnkhw", emb, feats) / math.sqrt(8)
    ref = maps.reshape(6, 4, 4, 5, 6).permute(0, 3, 1, 4, 2).flatten(1, 2).flatten(2, 3).reshape(2, 3, 20, 24)
    torch.testing.assert_close(out, ref)
    assert assemble_masks(emb, feats, out_size=(33, 17)).shape == (2, 3, 33, 17)


def test_assemble_masks_general_r_and_errors():
    # r = 2: 4 embeddings, 1x1 features of value 1 (C=1): out = [[e0, e1], [e2, e3]].
    out = assemble_masks(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 4, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        assemble_masks(torch.ones(1, 1, 5, 2), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match="mismatch"):
        assemble_masks(torch.ones(1, 1, 4, 3), torch.ones(1, 2, 2, 2))


# ---------------------------------------------------------------- training-free baseline


def test_training_free_logits_is_scaled_cosine():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # Q=2 shared queries
    feats = torch.tensor([[[[5.0, 0.0], [0.0, 2.0]], [[3.0, 3.0], [-1.0, 0.0]]]])  # [1, 2, 2, 2]
    out = training_free_logits(t, feats, scale=10.0)
    assert out.shape == (1, 2, 2, 2)
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(out[0, 0], 10 * torch.tensor([[1.0, 0.0], [c, -1.0]]))
    torch.testing.assert_close(out[0, 1], 10 * torch.tensor([[0.0, 1.0], [c, 0.0]]))
    per_image = training_free_logits(t[None, :1].expand(3, 1, 2), feats.expand(3, -1, -1, -1))
    assert per_image.shape == (3, 1, 2, 2)
    with pytest.raises(ValueError):
        training_free_logits(torch.ones(2, 3), feats)


# ---------------------------------------------------------------- boxes / predict


def test_masks_to_boxes_hand_cases():
    masks = torch.zeros(4, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4 -> x1=2, y1=1, x2=5, y2=3 (pixel edges)
    masks[1, 0, 0] = True  # single pixel -> [0, 0, 1, 1]
    masks[3] = True  # full -> [0, 0, W, H]
    boxes, valid = masks_to_boxes(masks)
    expected = torch.tensor([[2, 1, 5, 3], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 6, 5]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected)
    assert valid.tolist() == [True, True, False, True]


def test_predict_rescores_drops_empty_and_sorts():
    logits = torch.full((3, 4, 4), -10.0)
    logits[0, :2, :2] = math.log(3)  # p = 0.75 on 4 pixels
    logits[2, 1:, 1:] = 10.0  # ~1.0 on 9 pixels
    obj = torch.tensor([0.0, 5.0, -math.log(3)])  # sigmoid: 0.5, ~1 (but empty mask), 0.25
    inst = predict(logits, obj)
    # slot 0: 0.5 * 0.75 = 0.375; slot 2: 0.25 * ~1 = 0.25; slot 1 dropped (empty mask)
    assert inst.slots.tolist() == [0, 2]
    torch.testing.assert_close(inst.scores, torch.tensor([0.375, 0.25]), atol=1e-4, rtol=0)
    torch.testing.assert_close(inst.boxes, torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 4.0]]))
    assert inst.masks.dtype == torch.bool and inst.masks[0].sum() == 4
    assert len(predict(logits, obj, top_k=1)) == 1
    assert len(predict(logits, obj, score_threshold=0.3)) == 1


def test_semantic_labels_argmax_and_background():
    logits = torch.tensor([[[2.0, -2.0]], [[0.0, -3.0]]])  # [Q=2, 1, 2]
    assert semantic_labels(logits).tolist() == [[0, 0]]
    # class 1 weighted up: pixel 0: 0.88*1 vs 0.5*2 -> 1
    assert semantic_labels(logits, scores=torch.tensor([1.0, 2.0])).tolist() == [[1, 0]]
    assert semantic_labels(logits, bg_threshold=0.5).tolist() == [[0, 255]]


# ---------------------------------------------------------------- losses


def test_dice_loss_hand_values():
    # mask 0: p = 0.5 x4, t = [1,1,0,0]: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4
    # mask 1: p = 0.75 x4, t = [1,0,0,0]: 1 - (2*0.75 + 1) / (3 + 1 + 1) = 0.5
    logits = torch.tensor([[0.0] * 4, [math.log(3)] * 4])
    targets = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0]])
    torch.testing.assert_close(dice_loss(logits, targets, "none"), torch.tensor([0.4, 0.5]))
    torch.testing.assert_close(dice_loss(logits, targets), torch.tensor(0.45))
    torch.testing.assert_close(dice_loss(logits, targets, "sum"), torch.tensor(0.9))
    # empty target + (nearly) empty prediction costs ~0 thanks to the +1 smoothing
    assert dice_loss(torch.full((1, 9), -30.0), torch.zeros(1, 9)) < 1e-6


def test_sigmoid_focal_loss_hand_values():
    ln2, ln3, ln4 = math.log(2), math.log(3), math.log(4)
    # mask 0: logit 0 (p=.5), t=[1,0]
    #   t=1: 0.25 * (1-0.5)^2 * ln2 = 0.0625 ln2 ; t=0: 0.75 * 0.5^2 * ln2 = 0.1875 ln2 -> mean 0.125 ln2
    # mask 1: logit ln3 (p=.75), t=[1,0]
    #   t=1: 0.25 * 0.25^2 * ln(4/3) ; t=0: 0.75 * 0.75^2 * ln4 -> mean of the two
    m0 = 0.125 * ln2
    m1 = (0.25 * 0.0625 * (ln4 - ln3) + 0.75 * 0.5625 * ln4) / 2
    logits = torch.tensor([[0.0, 0.0], [ln3, ln3]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, reduction="none"), torch.tensor([m0, m1]))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), torch.tensor((m0 + m1) / 2))


def test_score_loss_hand_values():
    # BCE(0, 1) = ln2 ; BCE(ln3, 0) = -ln(1 - 0.75) = ln4 -> mean 1.5 ln2 ; neg weight 0.5 -> (ln2 + 0.5 ln4)/2 = ln2
    obj, matched = torch.tensor([0.0, math.log(3)]), torch.tensor([True, False])
    torch.testing.assert_close(score_loss(obj, matched), torch.tensor(1.5 * math.log(2)))
    torch.testing.assert_close(score_loss(obj, matched, neg_weight=0.5), torch.tensor(math.log(2)))


# ---------------------------------------------------------------- matching


def _three_gt_masks(size: int = 16) -> torch.Tensor:
    gt = torch.zeros(3, size, size, dtype=torch.bool)
    gt[0, :8, :8] = True
    gt[1, 8:, :4] = True
    gt[2, 4:12, 10:] = True
    return gt


def test_hungarian_recovers_known_permutation():
    gt = _three_gt_masks()
    pred = torch.full((5, 16, 16), -5.0)
    for slot, g in [(3, 0), (0, 1), (4, 2)]:  # slots 1 and 2 predict nothing
        pred[slot][gt[g]] = 5.0
    obj = torch.zeros(5)
    pi, gi = hungarian_match(pred, obj, gt)
    assert pi.tolist() == [0, 3, 4] and gi.tolist() == [1, 0, 2]
    # same answer from 512 shared random points, and from half-resolution predictions
    pi, gi = hungarian_match(pred, obj, gt, num_points=512, generator=torch.Generator().manual_seed(0))
    assert pi.tolist() == [0, 3, 4] and gi.tolist() == [1, 0, 2]
    pi, gi = hungarian_match(pred[:, ::2, ::2], obj, gt)
    assert pi.tolist() == [0, 3, 4] and gi.tolist() == [1, 0, 2]


def test_hungarian_empty_gt_and_objectness_tiebreak():
    pi, gi = hungarian_match(torch.zeros(4, 8, 8), torch.zeros(4), torch.zeros(0, 8, 8, dtype=torch.bool))
    assert pi.numel() == 0 and gi.numel() == 0
    # identical masks: the slot with the higher objectness wins
    gt = _three_gt_masks()[:1]
    pred = torch.where(gt, 5.0, -5.0).expand(3, -1, -1).clone()
    pi, gi = hungarian_match(pred, torch.tensor([-3.0, 4.0, 0.0]), gt)
    assert pi.tolist() == [1] and gi.tolist() == [0]


# ---------------------------------------------------------------- decoder + loss


def test_query_decoder_shapes():
    dec = QueryDecoder(embed_dim=32, num_slots=5, width=32, num_heads=4)
    out = dec(torch.randn(2, 32), torch.randn(2, 4, 3, 32))
    assert out["obj_logits"].shape == (2, 5)
    assert out["mask_emb"].shape == (2, 5, 16, 32)
    assert out["mask_logits"].shape == (2, 5, 16, 12)
    assert out["sem_emb"].shape == (2, 16, 32)
    assert out["sem_logits"].shape == (2, 16, 12)
    assert dec(torch.randn(1, 32), torch.randn(1, 4, 4, 32), out_size=(20, 20))["mask_logits"].shape == (1, 5, 20, 20)
    with pytest.raises(ValueError):
        dec(torch.randn(2, 16), torch.randn(2, 4, 4, 32))


def test_direct_attention_equals_nn_multihead_attention():
    from vlkit_ufo.head import _attention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    torch.testing.assert_close(_attention(mha, q, kv + 1, kv), mha(q, kv + 1, kv, need_weights=False)[0])
    torch.testing.assert_close(_attention(mha, q, q, q), mha(q, q, q, need_weights=False)[0])


def test_candidates_decode_exactly_the_slots_that_can_pass_the_threshold():
    torch.manual_seed(0)
    dec = QueryDecoder(embed_dim=32, num_slots=6, width=32, num_heads=4).eval()
    query, feats = torch.randn(1, 32), torch.randn(1, 4, 3, 32)
    with torch.no_grad():
        full = dec(query, feats)
        p = full["obj_logits"][0].sigmoid()
        t = float(p.median())
        idx, obj, logits = dec.candidates(query, feats, min_objectness=t)
    assert idx.tolist() == (p > t).nonzero().squeeze(1).tolist() and 0 < len(idx) < 6
    torch.testing.assert_close(obj, full["obj_logits"][0, idx])
    torch.testing.assert_close(logits, full["mask_logits"][0, idx])
    # every instance predict() keeps at threshold t comes from a decoded slot
    kept = predict(full["mask_logits"][0], full["obj_logits"][0], score_threshold=t)
    assert set(kept.slots.tolist()) <= set(idx.tolist())
    with pytest.raises(ValueError, match="one image"):
        dec.candidates(torch.randn(2, 32), torch.randn(2, 4, 3, 32))


def test_ufo_loss_falls_on_one_synthetic_example():
    torch.manual_seed(0)
    dec = QueryDecoder(embed_dim=32, num_slots=4, width=32, num_heads=4)
    feats, query = torch.randn(1, 4, 4, 32), torch.randn(1, 32)
    targets = [{"masks": _three_gt_masks()[:2]}]
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = ufo_loss(dec(query, feats), targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["num_matched"].item() == 2
    assert set(out) >= {"loss", "loss_focal", "loss_dice", "loss_obj", "loss_sem", "num_matched"}
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_ufo_loss_handles_no_gt_and_points():
    dec = QueryDecoder(embed_dim=16, num_slots=3, width=16, num_heads=2)
    outputs = dec(torch.randn(2, 16), torch.randn(2, 2, 2, 16))
    targets = [{"masks": torch.zeros(0, 8, 8, dtype=torch.bool)}, {"masks": _three_gt_masks(8)[:1]}]
    out = ufo_loss(outputs, targets, LossWeights(), num_points=32, gt_repeats=2, generator=torch.Generator().manual_seed(0))
    assert out["num_matched"].item() == 2  # one gt repeated twice, image 0 has none
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in dec.parameters() if p.requires_grad)
