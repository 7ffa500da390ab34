"""Tests for the UFO building blocks: mask assembly, the anchored head, matrix NMS, losses and matching."""

import math

import pytest
import torch

from vlkit_ufo.anchored import AnchoredHead, anchor_centres, matrix_nms
from vlkit_ufo.head import assemble_masks, masks_to_boxes, training_free_logits
from vlkit_ufo.losses import dice_loss, objectness_focal_loss, sigmoid_focal_loss
from vlkit_ufo.matching import anchor_match, mask_centres

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


# ---------------------------------------------------------------- boxes


def test_masks_to_boxes_hand_cases():
    masks = torch.zeros(4, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4 -> x1=2, y1=1, x2=5, y2=3 (pixel edges)
    masks[1, 0, 0] = True  # single pixel -> [0, 0, 1, 1]
    masks[3] = True  # full -> [0, 0, W, H]
    boxes, valid = masks_to_boxes(masks)
    expected = torch.tensor([[2, 1, 5, 3], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 6, 5]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected)
    assert valid.tolist() == [True, True, False, True]


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


def test_objectness_focal_loss_sums_valid_terms_over_positives():
    # anchor 0: logit 0, t=1: 0.25 * 0.5^2 * ln2 ; anchor 1: logit 0, t=0: 0.75 * 0.5^2 * ln2 ;
    # anchor 2 would cost a lot (logit 5, t=0) but is not valid. One positive -> divide by 1.
    ln2 = math.log(2)
    loss = objectness_focal_loss(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]),
                                 torch.tensor([True, True, False]))
    torch.testing.assert_close(loss, torch.tensor(0.25 * ln2))
    # no positive at all: divided by 1, not 0
    none = objectness_focal_loss(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(none, torch.tensor(2 * 0.75 * 0.25 * ln2))


# ---------------------------------------------------------------- anchors and matching


def test_anchor_centres_and_mask_centres_hand_values():
    torch.testing.assert_close(anchor_centres(2, 4), torch.tensor(
        [[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25],
         [0.125, 0.75], [0.375, 0.75], [0.625, 0.75], [0.875, 0.75]]))
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 0:2, 0:2] = True  # pixel centres 0.5, 1.5 -> mean 1.0 -> 1/8
    masks[1, 4:8, 2:3] = True  # x = 2.5/8, y = 6/8
    torch.testing.assert_close(mask_centres(masks), torch.tensor([[0.125, 0.125], [2.5 / 8, 0.75], [0.5, 0.5]]))


def test_anchor_match_takes_the_nearest_anchors_without_sharing():
    anchors = anchor_centres(4, 4)  # cell centres at 1/8, 3/8, 5/8, 7/8
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, 0:4, 0:4] = True  # centre (1/8, 1/8) = anchor 0; next nearest (L1 0.25): anchors 1 and 4
    gt[1, 12:16, 12:16] = True  # centre (7/8, 7/8) = anchor 15; then 11 and 14
    ai, gi = anchor_match(anchors, gt, repeats=3)
    pairs = sorted(zip(ai.tolist(), gi.tolist()))
    assert pairs == [(0, 0), (1, 0), (4, 0), (11, 1), (14, 1), (15, 1)]
    # two gts at the same place split the nearest anchors instead of sharing one
    same = torch.stack([gt[0], gt[0]])
    ai, gi = anchor_match(anchors, same, repeats=1)
    assert sorted(gi.tolist()) == [0, 1] and len(set(ai.tolist())) == 2 and 0 in ai.tolist()
    empty_a, empty_g = anchor_match(anchors, torch.zeros(0, 16, 16, dtype=torch.bool))
    assert empty_a.numel() == 0 and empty_g.numel() == 0


def test_matrix_nms_decays_duplicates_only():
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, :8] = True
    masks[1, :8] = True  # a duplicate of mask 0 (IoU 1), lower score
    masks[2, 8:12] = True  # disjoint
    scores = torch.tensor([0.9, 0.8, 0.5])
    out = matrix_nms(masks, scores, sigma=2.0)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * math.exp(-2.0), 0.5]))
    # half overlap (IoU 1/3): decay exp(-2/9); the input order does not matter
    masks[1:] = False
    masks[1, 4:12] = True
    masks[2, 12:16] = True
    out = matrix_nms(masks[[2, 1, 0]], scores[[2, 1, 0]], sigma=2.0)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.8 * math.exp(-2 / 9), 0.9]))
    batched = matrix_nms(masks[None].expand(2, -1, -1), scores[None].expand(2, -1))
    torch.testing.assert_close(batched[0], batched[1])


# ---------------------------------------------------------------- the anchored head


def test_position_code_dot_product_is_a_distance_kernel():
    head = AnchoredHead(embed_dim=16, width=16, pos_dim=512, pos_sigma=0.1)
    a = torch.tensor([[0.5, 0.5]])
    pts = torch.tensor([[0.5, 0.5], [0.55, 0.5], [0.7, 0.5], [0.9, 0.9]])
    k = (head.position_code(a) * head.position_code(pts)).sum(-1)
    expected = torch.exp(-((pts - a) ** 2).sum(-1) / (2 * 0.1**2))
    torch.testing.assert_close(k, expected, atol=0.12, rtol=0)  # random features: approximate
    assert k[0] > k[1] > k[2] > k[3]


def test_anchored_head_shapes_and_position_bump():
    torch.manual_seed(0)
    head = AnchoredHead(embed_dim=32, width=16, pos_dim=64, pos_sigma=0.1).eval()
    feats, images = torch.randn(2, 4, 4, 32), torch.randn(2, 3, 32, 32)
    content, tokens = head.image_features(feats, images)
    assert content.shape == (2, 8, 8, 16 + 64) and tokens.shape == (2, 16, 16)
    qtok = head.query_tokens(tokens, torch.randn(2, 3, 32))
    assert qtok.shape == (2, 3, 16, 16) and head.objectness(qtok).shape == (2, 3, 16)
    queries = torch.randn(3, 32)
    logits, scores, sem = head.instances(queries, feats, images, top_k=5)
    assert logits.shape == (2, 3, 5, 32, 32) and scores.shape == (2, 3, 5) and sem.shape == (2, 3, 32, 32)
    assert ((scores >= 0) & (scores <= 1)).all()
    # min_score decodes only the anchors that can pass it: every candidate above it is unchanged
    with torch.no_grad():
        head.obj_head.weight.mul_(3.0)  # spread the objectness so a threshold falls between anchors
        head.obj_head.bias.zero_()
    one_q, one_f, one_i = queries[:1], feats[:1], images[:1]
    with torch.no_grad():
        obj = head.objectness(head.query_tokens(head.image_features(one_f, one_i)[1], one_q[None]))
    top = obj.sigmoid().flatten().topk(5).values
    assert 0.01 < float(top[2]) < float(top[1]) < 0.99
    t = float(top[1] + top[2]) / 2  # two anchors can pass
    full, full_scores, _ = head.instances(one_q, one_f, one_i, top_k=5)
    few, few_scores, none = head.instances(one_q, one_f, one_i, top_k=5, min_score=t, semantic=False)
    assert none is None and few.shape[2] == 2
    torch.testing.assert_close(few, full[:, :, :2])
    assert (full_scores[..., 2:] <= t).all()
    torch.testing.assert_close(few_scores[few_scores > t], full_scores[full_scores > t])
    # with the content part of the embeddings silenced, a mask is the anchor's position bump: it peaks
    # in the anchor's own cell
    with torch.no_grad():
        head.mask_head.weight.zero_()
        head.mask_head.bias.zero_()
        code = head.grid_code(4, 4, qtok)[5:6]  # the anchor at row 1, col 1 -> pixels 8..15
        torch.testing.assert_close(code, head.position_code(anchor_centres(4, 4)[5:6]))
        emb = head.mask_embeddings(qtok[:1, 0, 5:6], code)
        m = head.masks(content[:1], emb, (32, 32))[0, 0]
    y, x = divmod(int(m.argmax()), 32)
    assert 8 <= y < 16 and 8 <= x < 16
    with pytest.raises(ValueError):
        head.image_features(torch.randn(2, 4, 4, 8), images)
