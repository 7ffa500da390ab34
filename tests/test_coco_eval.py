"""Tests for the COCO evaluation wrapper and the segmentation metrics."""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vlkit.metrics.coco_eval import (
    coco_evaluate,
    f1_operating_point,
    instances_to_coco_results,
    write_results,
)
from vlkit.metrics.segmentation import MeanIoU, binary_iou, confusion_matrix, miou
from vlkit_ufo.head import masks_to_boxes

H = W = 20


def _square(y0: int, x0: int, size: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def _ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray, iscrowd: int = 0) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    if iscrowd:  # COCO stores crowd regions as uncompressed RLE (counts as a list of run lengths)
        flat = mask.T.ravel()  # column-major
        runs, cur, n = [], False, 0
        for v in flat:
            if v != cur:
                runs.append(n)
                cur, n = v, 0
            n += 1
        runs.append(n)
        seg = {"size": [H, W], "counts": runs}
    else:
        seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
            "area": float(mask.sum()), "bbox": bbox, "iscrowd": iscrowd}


def _coco(anns: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": H, "width": W}, {"id": 2, "height": H, "width": W}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": anns,
    }
    coco.createIndex()
    return coco


def _gt_masks():
    return [(1, 1, _square(1, 1, 6)), (1, 1, _square(10, 10, 7)), (2, 2, _square(3, 8, 5))]


def _perfect_results() -> list[dict]:
    results = []
    for img, cat, m in _gt_masks():
        results += instances_to_coco_results(img, m[None], np.array([0.9]), cat)
    return results


# pycocotools' own decode trips a numpy-2 DeprecationWarning inside the library; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_instances_to_coco_results_encoding():
    masks = torch.from_numpy(np.stack([_square(2, 3, 4), np.zeros((H, W), bool)]))
    res = instances_to_coco_results(7, masks, torch.tensor([0.8, 0.5]), [1, 2])
    assert len(res) == 1  # the empty mask is skipped
    r = res[0]
    assert isinstance(r["segmentation"]["counts"], str)
    json.dumps(res)  # must be JSON serialisable
    assert (mask_utils.decode(r["segmentation"]).astype(bool) == masks[0].numpy()).all()
    # mask rows 2-5, cols 3-6 -> [x, y, w, h] = [3, 2, 4, 4], same as masks_to_boxes' pixel-edge xyxy
    assert r["bbox"] == [3.0, 2.0, 4.0, 4.0]
    x1, y1, x2, y2 = masks_to_boxes(masks[:1])[0][0].tolist()
    assert [x1, y1, x2 - x1, y2 - y1] == r["bbox"]
    assert r["image_id"] == 7 and r["category_id"] == 1 and r["score"] == pytest.approx(0.8)


def test_perfect_prediction_round_trips_to_ap_one(tmp_path, capsys):
    coco = _coco([_ann(i + 1, img, cat, m) for i, (img, cat, m) in enumerate(_gt_masks())])
    path = write_results(_perfect_results(), tmp_path / "sub" / "results.json")
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
    capsys.readouterr()
    stats = coco_evaluate(coco, str(path))
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed unless verbose
    for t in ("segm", "bbox"):
        assert stats[f"{t}/AP"] == pytest.approx(1.0)
        assert stats[f"{t}/AP50"] == pytest.approx(1.0)
        assert stats[f"{t}/AP75"] == pytest.approx(1.0)
        assert stats[f"{t}/APs"] == pytest.approx(1.0)  # all gts are small (< 32^2 px)
        assert math.isnan(stats[f"{t}/APl"])  # no large gt: pycocotools' -1 becomes NaN


def test_empty_and_wrong_predictions():
    coco = _coco([_ann(i + 1, img, cat, m) for i, (img, cat, m) in enumerate(_gt_masks())])
    stats = coco_evaluate(coco, [])
    assert set(stats.values()) == {0.0} and "segm/AP" in stats and "bbox/AP75" in stats
    wrong = instances_to_coco_results(1, _square(0, 12, 5)[None], [0.9], 1)  # overlaps no gt
    assert coco_evaluate(coco, wrong, iou_types=("segm",))["segm/AP"] == 0.0
    bbox_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in _perfect_results()]
    assert coco_evaluate(coco, bbox_only, iou_types=("bbox",))["bbox/AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs a 'segmentation'"):
        coco_evaluate(coco, bbox_only, iou_types=("segm",))
    with pytest.raises(ValueError, match="absent from the ground truth"):
        coco_evaluate(coco, instances_to_coco_results(99, _square(0, 0, 3)[None], [0.9], 1))


def test_prediction_on_crowd_region_is_not_a_false_positive():
    gt_obj, crowd = _square(1, 1, 6), _square(10, 10, 8)
    preds = instances_to_coco_results(1, np.stack([crowd, gt_obj]), np.array([0.95, 0.9]), 1)
    with_crowd = _coco([_ann(1, 1, 1, gt_obj), _ann(2, 1, 1, crowd, iscrowd=1)])
    # the higher-scored crowd prediction is ignored, so precision stays 1 at every recall
    assert coco_evaluate(with_crowd, preds, iou_types=("segm",))["segm/AP"] == pytest.approx(1.0)
    # control: without the crowd annotation that same prediction is a ranked-first false positive
    without = _coco([_ann(1, 1, 1, gt_obj)])
    assert coco_evaluate(without, preds, iou_types=("segm",))["segm/AP"] < 0.9


def test_class_agnostic_evaluation_ignores_the_category():
    coco = _coco([_ann(i + 1, img, cat, m) for i, (img, cat, m) in enumerate(_gt_masks())])
    swapped = [{**r, "category_id": 3 - r["category_id"]} for r in _perfect_results()]  # right masks, wrong names
    assert coco_evaluate(coco, swapped, iou_types=("segm",))["segm/AP"] == 0.0
    assert coco_evaluate(coco, swapped, iou_types=("segm",), use_cats=False)["segm/AP"] == pytest.approx(1.0)


def test_f1_operating_point_hand_case():
    coco = _coco([_ann(i + 1, img, cat, m) for i, (img, cat, m) in enumerate(_gt_masks())])
    hits = _perfect_results()  # 3 true positives at score 0.9
    hits[2]["score"] = 0.4  # the third one scores low
    fp = instances_to_coco_results(1, _square(0, 12, 5)[None], [0.6], 1)  # a false positive between them
    # by score: TP 0.9, TP 0.9, FP 0.6, TP 0.4; 3 gts. F1 = 2TP / (detections + gts):
    # cut at 0.9 -> 4/5 = 0.8; at 0.6 -> 4/6; at 0.4 -> 6/7 = 0.857 (best)
    f1, threshold = f1_operating_point(coco, hits + fp)
    assert f1 == pytest.approx(6 / 7) and threshold == pytest.approx(0.4)
    fp[0]["score"] = 0.3  # now below every TP: keep the three TPs, F1 = 1 at 0.4
    assert f1_operating_point(coco, hits + fp) == (pytest.approx(1.0), pytest.approx(0.4))
    assert f1_operating_point(coco, []) == (0.0, 1.0)


def test_miou_hand_confusion_matrix():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    # valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,1); the last pixel is ignored
    cm = confusion_matrix(pred, gt, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0]])
    # IoU0 = 1 / (2 + 1 - 1) = .5 ; IoU1 = 2 / (2 + 4 - 2) = .5 ; IoU2 = 0 / (1 + 0 - 0) = 0
    metric = MeanIoU(3)
    metric.update(pred, gt)
    np.testing.assert_allclose(metric.per_class_iou(), [0.5, 0.5, 0.0])
    res = metric.compute()
    assert res["mIoU"] == pytest.approx(1 / 3) and res["aAcc"] == pytest.approx(3 / 5)
    # a 4th class absent from gt and pred is excluded, not counted as 0
    assert miou(pred, gt, n_classes=4) == pytest.approx(1 / 3)
    # accumulated over images: image 2 adds a perfect class 3 -> (.5 + .5 + 0 + 1) / 4
    assert miou([pred, np.array([[3]])], [gt, np.array([[3]])], n_classes=4) == pytest.approx(0.5)


def test_miou_unlabelled_prediction_counts_as_miss():
    # pred 255 ("no label") on a class-0 pixel: IoU0 = 1 / 2, no other class penalised
    m = MeanIoU(2)
    m.update(torch.tensor([[0, 255]]), torch.tensor([[0, 0]]))
    np.testing.assert_allclose(m.per_class_iou(), [0.5, np.nan])
    with pytest.raises(ValueError):
        m.update(np.array([[7]]), np.array([[0]]))


def test_binary_iou():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    gt = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    # inter 1 / union 3 ; empty vs empty -> 1 ; pred only -> 0
    torch.testing.assert_close(binary_iou(pred, gt), torch.tensor([1 / 3, 1.0, 0.0]))
