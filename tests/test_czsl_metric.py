"""Tests of the CZSL protocol (vlkit.metrics.czsl) against hand-computed values and the dense path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlkit.metrics.czsl import (
    choose_threshold,
    evaluate,
    evaluate_dense,
    feasibility_scores,
    plot_curve,
)

# Hand case. Pairs (attr, obj): c0=(0,0) seen, c1=(1,0) seen, c2=(0,1) unseen, c3=(1,1) unseen
# (c2, c3 are the eval pairs), c4=(2,1): neither, so it only exists in the open world.
PAIRS = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)]
TRAIN = [(0, 0), (1, 0)]
EVAL = [(0, 1), (1, 1)]
SCORES = torch.tensor(
    [
        # c0   c1    c2    c3   c4         gt
        [5.0, 1.0, 4.00, 0.0, 9.0],  # img0 c0 seen:   s=5 (c0), u=4 (c2); open world u=9 (c4)
        [2.0, 3.0, 2.50, 0.0, 0.0],  # img1 c1 seen:   s=3 (c1), u=2.5 (c2)
        [2.0, 3.0, 1.00, 0.0, 0.0],  # img2 c0 seen:   s=3 (c1, wrong), u=1 (c2): never right
        [4.0, 0.0, 2.00, 1.0, 0.0],  # img3 c2 unseen: s=4, u=gt=2          -> gap 2
        [1.0, 2.0, 0.00, 3.0, 0.0],  # img4 c3 unseen: s=2, u=gt=3          -> gap -1
        [3.0, 0.0, 2.25, 2.5, 0.0],  # img5 c2 unseen: s=3, u=2.5 (c3 != gt): never right (closed)
        [1.5, 0.0, 0.00, 2.0, 0.0],  # img6 c3 unseen: s=1.5, u=gt=2        -> gap -0.5
    ]
)
PAIR_GT = [0, 1, 0, 2, 3, 2, 3]
ATTR_GT = [PAIRS[g][0] for g in PAIR_GT]
OBJ_GT = [PAIRS[g][1] for g in PAIR_GT]
ARGS = (PAIRS, TRAIN, EVAL, ATTR_GT, OBJ_GT, PAIR_GT)


def f32_bias(gap: float) -> float:
    """The reference's bias value: (max seen - gt) - 1e-4 in float32."""
    return float(torch.tensor(gap, dtype=torch.float32) - 1e-4)


def hm(s: float, u: float) -> float:
    return 0.0 if s == 0 or u == 0 else 2 * s * u / (s + u)


def check(result, biases, seen_curve, unseen_curve, auc, best_hm, best_bias, attr, obj):
    assert result["biases"] == pytest.approx(biases, abs=1e-7)
    assert result["seen_curve"] == pytest.approx(seen_curve)
    assert result["unseen_curve"] == pytest.approx(unseen_curve)
    assert result["AUC"] == pytest.approx(auc)
    assert result["best_hm"] == pytest.approx(best_hm)
    assert result["best_bias"] == pytest.approx(best_bias, abs=1e-7)
    assert result["best_seen"] == pytest.approx(max(seen_curve))
    assert result["best_unseen"] == pytest.approx(max(unseen_curve))
    assert result["attr_acc"] == pytest.approx(attr)
    assert result["obj_acc"] == pytest.approx(obj)


@pytest.mark.parametrize("path", [evaluate, evaluate_dense])
def test_closed_world_by_hand(path):
    # Correct at bias 1e3 (all unseen candidates win): img3 (c2), img4 (c3), img6 (c3); img5 picks c3.
    # Their gaps 2, -1, -0.5 -> minus 1e-4, sorted: [-1.0001, -0.5001, 1.9999] (3 // 20 -> skip 1).
    # b=-1.0001: seen img0 (4-1.0001<5) img1 right, img2 wrong -> 2/3; unseen: img4 1.9999<2 -> 0/4
    # b=-0.5001: seen 2/3; unseen img4 (2.4999>2) right, img6 (1.4999<1.5) not -> 1/4
    # b= 1.9999: seen all flip to c2 -> 0; unseen img4, img6 right, img3 (3.9999<4) not -> 2/4
    # b=1e3:     seen 0; unseen img3, img4, img6 -> 3/4
    seen = [2 / 3, 2 / 3, 0, 0]
    unseen = [0, 1 / 4, 2 / 4, 3 / 4]
    # AUC = trapz(seen, unseen) = 1/4*(2/3+2/3)/2 + 1/4*(2/3+0)/2 + 0 = 1/6 + 1/12 = 1/4
    # HM: [0, 2*(2/3)(1/4)/(2/3+1/4) = 4/11, 0, 0] -> best at bias -0.5001
    # Unbiased (b=0) predictions: c0 c1 c1 c0 c3 c0 c3 vs gt c0 c1 c0 c2 c3 c2 c3
    # attr right: all but img2 -> 6/7; obj right: img0,1,2,4,6 -> 5/7
    r = path(SCORES, *ARGS)
    biases = [f32_bias(-1), f32_bias(-0.5), f32_bias(2), 1e3]
    check(r, biases, seen, unseen, 0.25, 4 / 11, f32_bias(-0.5), 6 / 7, 5 / 7)
    assert r["hm_seen"] == pytest.approx(2 / 3) and r["hm_unseen"] == pytest.approx(1 / 4)
    assert r["unbiased_seen"] == pytest.approx(2 / 3) and r["unbiased_unseen"] == pytest.approx(2 / 4)
    assert (r["n_seen_images"], r["n_unseen_images"]) == (3, 4)


@pytest.mark.parametrize("path", [evaluate, evaluate_dense])
def test_open_world_without_mask_by_hand(path):
    # c4 is now a candidate (unseen): only img0 changes, its best unseen is c4 = 9, so img0 is
    # wrong at every listed bias (9 - 1.0001 > 5) and unbiased. Same bias list as closed world.
    seen = [1 / 3, 1 / 3, 0, 0]
    unseen = [0, 1 / 4, 2 / 4, 3 / 4]
    # AUC = 1/4*(2/3)/2 + 1/4*(1/3)/2 = 1/12 + 1/24 = 1/8; HM at point 1: 2*(1/3)(1/4)/(7/12) = 2/7
    # Unbiased: img0 predicts c4 = (2,1) vs (0,0): attr and obj wrong -> attr 5/7, obj 4/7
    r = path(SCORES, *ARGS, open_world=True)
    biases = [f32_bias(-1), f32_bias(-0.5), f32_bias(2), 1e3]
    check(r, biases, seen, unseen, 1 / 8, 2 / 7, f32_bias(-0.5), 5 / 7, 4 / 7)


@pytest.mark.parametrize("path", [evaluate, evaluate_dense])
def test_open_world_feasibility_mask_by_hand(path):
    # Infeasible c4 only: identical to the closed world.
    closed = path(SCORES, *ARGS)
    masked = path(SCORES, *ARGS, open_world=True, feasible=torch.tensor([True, True, True, True, False]))
    assert masked == closed
    # Infeasible c3 and c4, and c0 marked False although seen: seen pairs are always kept.
    # Unseen candidates: only c2. img4, img6 (gt c3) can never be right; img5 (gt c2, s=3) can.
    # Correct at 1e3: img3 (gap 2), img5 (gap 3-2.25 = 0.75) -> biases [0.7499, 1.9999]
    # b=0.7499: img0 4.7499<5 right, img1 3.2499>3 flips, img2 wrong -> 1/3; unseen: img5 2.9999<3 -> 0
    # b=1.9999: seen 0; unseen img5 right, img3 3.9999<4 not -> 1/4;  b=1e3: img3, img5 -> 2/4
    # AUC = 1/4*(1/3)/2 = 1/24; HM all 0 -> best index 0, bias 0.7499
    # Unbiased preds c0 c1 c1 c0 c1 c0 c0: attr right img0,1,3,4,5 -> 5/7; obj img0,1,2 -> 3/7
    feasible = np.array([False, True, True, False, False])
    r = path(SCORES.numpy(), *ARGS, open_world=True, feasible=feasible)
    check(
        r,
        [f32_bias(0.75), f32_bias(2), 1e3],
        [1 / 3, 0, 0],
        [0, 1 / 4, 2 / 4],
        1 / 24,
        0.0,
        f32_bias(0.75),
        5 / 7,
        3 / 7,
    )


def test_best_hm_at_large_bias_endpoint():
    # c0=(0,0) seen, c1=(0,1) unseen. img0 (seen) has a huge seen score, img1 (unseen) gap 3-1=2.
    # b=1.9999: img0 right, img1 (2.9999<3) wrong -> (1, 0); b=1e3: img0 (1001<2000) right,
    # img1 right -> (1, 1). HM [0, 1]: best at the endpoint, whose bias is 1e3; AUC = 1*(1+1)/2 = 1.
    scores = torch.tensor([[2000.0, 1.0], [3.0, 1.0]])
    r = evaluate(scores, [(0, 0), (0, 1)], [(0, 0)], [(0, 1)], [0, 0], [0, 1], [0, 1])
    assert r["biases"] == pytest.approx([f32_bias(2), 1e3])
    assert r["best_bias"] == 1e3 and r["best_hm"] == 1.0 and r["AUC"] == 1.0
    # A smaller endpoint leaves img0 right but img1 wrong (1 + 1.5 < 3): the endpoint is (1, 0).
    r = evaluate(scores, [(0, 0), (0, 1)], [(0, 0)], [(0, 1)], [0, 0], [0, 1], [0, 1], large_bias=1.5)
    assert r["biases"] == [] + [1.5] and r["seen_curve"] == [1.0] and r["unseen_curve"] == [0.0]


def test_bias_list_subsampling():
    # 45 unseen images, all right at 1e3, gaps 0.5*k for k = 44..0 (img k: seen 10, gt 10 - 0.5*(44-k)).
    # Sorted gaps minus 1e-4, every 45 // 20 = 2nd -> k = 0, 2, ..., 44 (23 values); bias_steps=10
    # -> every 4th (12 values). One seen image keeps the seen accuracy defined.
    n = 45
    gaps = 0.5 * np.arange(n)[::-1]
    scores = np.zeros((n + 1, 2), dtype=np.float32)
    scores[:n, 0], scores[:n, 1] = 10.0, 10.0 - gaps
    scores[n] = [1.0, 0.0]
    pairs, train, ev = [(0, 0), (0, 1)], [(0, 0)], [(0, 1)]
    gt = [1] * n + [0]
    args = (pairs, train, ev, [0] * (n + 1), gt, gt)
    expected = [f32_bias(g) for g in np.sort(gaps)[::2]]
    assert evaluate(scores, *args)["biases"] == pytest.approx(expected + [1e3], abs=1e-7)
    expected = [f32_bias(g) for g in np.sort(gaps)[::4]]
    assert evaluate(scores, *args, bias_steps=10)["biases"] == pytest.approx(expected + [1e3], abs=1e-7)
    # Only images right at the large bias contribute: make image 0 pick another unseen pair.
    scores3 = np.concatenate([scores, np.full((n + 1, 1), -100.0, np.float32)], 1)
    scores3[0, 2] = 100.0
    pairs3 = pairs + [(1, 1)]
    r = evaluate(scores3, pairs3, train, ev + [(1, 1)], [0] * (n + 1), gt, gt)
    expected = [f32_bias(g) for g in np.sort(gaps[1:])[::2]]  # 44 gaps -> skip 2 -> 22 values
    assert r["biases"] == pytest.approx(expected + [1e3], abs=1e-7)


def _random_case(seed: int, n_img: int, n_attr: int, n_obj: int, integer: bool):
    g = torch.Generator().manual_seed(seed)
    pairs = [(a, o) for a in range(n_attr) for o in range(n_obj)]
    perm = torch.randperm(len(pairs), generator=g).tolist()
    n_train, n_eval = len(pairs) // 3, len(pairs) // 4
    train = [pairs[i] for i in perm[:n_train]]
    ev = [pairs[i] for i in perm[n_train : n_train + n_eval]]
    gt_pool = perm[: n_train + n_eval]
    pair_gt = torch.tensor(gt_pool)[torch.randint(len(gt_pool), (n_img,), generator=g)]
    if integer:  # many exact ties: exercises first-column tie breaking
        scores = torch.randint(0, 6, (n_img, len(pairs)), generator=g).float()
    else:
        scores = torch.randn(n_img, len(pairs), generator=g)
    scores[torch.arange(n_img), pair_gt] += 1.5  # a mildly informative model
    attr_gt = torch.tensor([pairs[i][0] for i in pair_gt])
    obj_gt = torch.tensor([pairs[i][1] for i in pair_gt])
    feasible = torch.rand(len(pairs), generator=g) > 0.4
    return scores, (pairs, train, ev, attr_gt, obj_gt, pair_gt), feasible


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("integer", [False, True])
def test_streaming_equals_dense(seed, integer):
    scores, args, feasible = _random_case(seed, n_img=97, n_attr=7, n_obj=9, integer=integer)
    for kw in ({}, {"open_world": True}, {"open_world": True, "feasible": feasible}):
        dense = evaluate_dense(scores, *args, **kw)
        assert 0 <= dense["AUC"] <= 1 and len(dense["biases"]) > 2
        for chunk in (1, 10, 32, 500):  # 97 = 9*10+7 = 3*32+1: chunks with a remainder
            assert evaluate(scores, *args, chunk_size=chunk, **kw) == dense
        # The same through a callable and an iterator of uneven chunks.
        assert evaluate(lambda i, j: scores[i:j], *args, chunk_size=13, **kw) == dense
        chunks = [scores[i : i + 20].numpy() for i in range(0, 97, 20)]
        assert evaluate(iter(chunks[:2] + [scores[:0]] + chunks[2:]), *args, chunk_size=7, **kw) == dense


@pytest.mark.parametrize("path", [evaluate, evaluate_dense])
def test_float64_scores_keep_float64_biases(path):
    # c0=(0,0) seen, c1=(0,1) unseen. img0 (unseen): gap 1 - 2/3 -> b = 1/3 - 1e-4 in float64.
    # img1/img2 (seen, s=1) have u = 1 - b -/+ 1e-12: at b one stays seen (right), one flips.
    # A bias rounded to float32 (error ~1e-8) would move both the same way.
    b = (1.0 - 2.0 / 3.0) - 1e-4
    scores = np.array([[1.0, 2.0 / 3.0], [1.0, 1.0 - b - 1e-12], [1.0, 1.0 - b + 1e-12]])
    r = path(scores, [(0, 0), (0, 1)], [(0, 0)], [(0, 1)], [0, 0, 0], [1, 0, 0], [1, 0, 0])
    assert r["biases"] == [b, 1e3]
    assert r["seen_curve"] == [0.5, 0.0] and r["unseen_curve"] == [0.0, 1.0]


def test_float64_scores_and_hmean_match_scipy():
    scores, args, _ = _random_case(5, n_img=60, n_attr=5, n_obj=6, integer=False)
    r = evaluate(scores.double().numpy(), *args)
    assert r == evaluate_dense(scores.double(), *args)
    from scipy.stats import hmean

    hms = [
        hmean([s, u]) if s > 0 and u > 0 else 0.0
        for s, u in zip(r["seen_curve"], r["unseen_curve"], strict=True)
    ]
    assert r["best_hm"] == pytest.approx(max(hms))
    assert r["AUC"] == pytest.approx(float(np.trapezoid(r["seen_curve"], r["unseen_curve"])))


def test_feasibility_scores_by_hand():
    # obj embeddings o0=(1,0), o1=(0,1), o2 ~ (1,1): cos(o0,o1)=0, cos(o0,o2)=cos(o1,o2)=sqrt(2)/2.
    # attr embeddings likewise (a2 unnormalized, to check the normalization).
    attr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    obj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pairs = [(a, o) for a in range(3) for o in range(3)]
    train = [(0, 0), (1, 1), (2, 0)]  # objs seen with a0:{o0} a1:{o1} a2:{o0}; attrs with o0:{a0,a2} o1:{a1}
    r2 = math.sqrt(2) / 2
    expected = {
        (0, 1): (0 + 0) / 2,  # cos(o1,o0), cos(a0,a1)
        (0, 2): (r2 - 1) / 2,  # cos(o2,o0); nobody seen with o2 -> -1
        (1, 0): (0 + r2) / 2,  # cos(o0,o1); max(cos(a1,a0), cos(a1,a2))
        (1, 2): (r2 - 1) / 2,  # cos(o2,o1); -1
        (2, 1): (0 + r2) / 2,  # cos(o1,o0); cos(a2,a1)
        (2, 2): (r2 - 1) / 2,  # cos(o2,o0); -1
    }
    f = feasibility_scores(attr, obj, pairs, train)
    assert f.dtype == torch.float32 and f.shape == (9,)
    for j, pair in enumerate(pairs):
        assert float(f[j]) == pytest.approx(1.0 if pair in train else expected[pair], abs=1e-6)
    with pytest.raises(ValueError, match="beyond the 3 x 3"):
        feasibility_scores(attr, obj, pairs + [(3, 0)], train)


@pytest.mark.parametrize("criterion", ["AUC", "best_hm"])
def test_choose_threshold_matches_bruteforce(criterion):
    scores, args, _ = _random_case(11, n_img=80, n_attr=6, n_obj=7, integer=False)
    pairs, train = args[0], args[1]
    g = torch.Generator().manual_seed(3)
    feas = feasibility_scores(torch.randn(6, 8, generator=g), torch.randn(7, 8, generator=g), pairs, train)
    choice = choose_threshold(
        scores, *args, feasibility=feas, n_thresholds=12, criterion=criterion, chunk_size=9
    )
    assert len(choice.thresholds) == len(choice.values) == 12
    for th, value in zip(choice.thresholds, choice.values, strict=True):
        dense = evaluate_dense(scores, *args, open_world=True, feasible=feas >= th)
        assert dense[criterion] == value
    best = int(np.argmax(choice.values))
    assert choice.threshold == choice.thresholds[best]
    assert choice.result == evaluate(scores, *args, open_world=True, feasible=feas >= choice.threshold)
    unseen_f = feas[[p not in set(train) for p in pairs]]
    assert choice.thresholds[0] == float(unseen_f.min()) and choice.thresholds[-1] == float(unseen_f.max())


def test_plot_curve(tmp_path):
    out = plot_curve(evaluate(SCORES, *ARGS), tmp_path / "sub" / "curve.png", "closed world")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_input_validation():
    with pytest.raises(ValueError, match=r"scores has shape \(6, 5\); expected .* \(7, 5\)"):
        evaluate(SCORES[:6], *ARGS)
    with pytest.raises(ValueError, match=r"pair_gt out of range: pair_gt\[6\] = 5 but there are 5 pairs"):
        evaluate(SCORES, PAIRS, TRAIN, EVAL, ATTR_GT, OBJ_GT, PAIR_GT[:6] + [5])
    with pytest.raises(
        ValueError, match=r"image 0: pair_gt points to pair \(0, 0\) but attr_gt/obj_gt say \(1, 0\)"
    ):
        evaluate(SCORES, PAIRS, TRAIN, EVAL, [1] + ATTR_GT[1:], OBJ_GT, PAIR_GT)
    with pytest.raises(ValueError, match="equally long"):
        evaluate(SCORES, PAIRS, TRAIN, EVAL, ATTR_GT[:3], OBJ_GT, PAIR_GT)
    with pytest.raises(ValueError, match="not in pairs"):
        evaluate(SCORES, PAIRS, TRAIN + [(5, 5)], EVAL, ATTR_GT, OBJ_GT, PAIR_GT)
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(torch.zeros(7, 6), PAIRS + [(0, 0)], TRAIN, EVAL, ATTR_GT, OBJ_GT, PAIR_GT)
    with pytest.raises(ValueError, match="open_world=True"):
        evaluate(SCORES, *ARGS, feasible=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask of shape"):
        evaluate(SCORES, *ARGS, open_world=True, feasible=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no image has a unseen gt pair"):
        evaluate(SCORES[:3], PAIRS, TRAIN, EVAL, ATTR_GT[:3], OBJ_GT[:3], PAIR_GT[:3])
    nan = SCORES.clone()
    nan[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in rows 4\.\.5"):
        evaluate(nan, *ARGS, chunk_size=2)
    with pytest.raises(ValueError, match="cover 4 rows but there are 7"):
        evaluate(iter([SCORES[:4]]), *ARGS)
    with pytest.raises(ValueError, match=r"expected \(rows, 5\)"):
        evaluate(iter([SCORES[:, :4]]), *ARGS)
    with pytest.raises(ValueError, match="more rows than the 7 images"):
        evaluate(iter([SCORES, SCORES[:1]]), *ARGS)
    with pytest.raises(ValueError, match="returned 2 rows"):
        evaluate(lambda i, j: SCORES[:2], *ARGS, chunk_size=3)
    with pytest.raises(ValueError, match="bias_steps"):
        evaluate(SCORES, *ARGS, bias_steps=0)
