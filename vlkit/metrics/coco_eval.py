"""COCO-style instance evaluation (segm / bbox AP) on pycocotools, with RLE result encoding."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["STAT_NAMES", "coco_evaluate", "f1_operating_point", "instances_to_coco_results", "load_results",
           "write_results"]

# Order of COCOeval.stats for iou types "segm" and "bbox".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instances_to_coco_results(
    image_id: int, masks: Any, scores: Any, category_id: int | Sequence[int]
) -> list[dict]:
    """Encode one image's instances as COCO result dicts.

    Args:
        image_id: the COCO image id.
        masks: [N, H, W] bool (numpy or torch), at the gt image's resolution.
        scores: [N] confidences.
        category_id: one id for all instances or one per instance.

    Returns:
        ``[{"image_id", "category_id", "segmentation": RLE with str counts, "bbox": [x, y, w, h], "score"}]``.
        Empty masks are skipped: they can only be false positives.
    """
    m = _to_numpy(masks).astype(bool)
    s = _to_numpy(scores).astype(float).reshape(-1)
    if m.ndim != 3 or m.shape[0] != s.shape[0]:
        raise ValueError(f"expected masks [N,H,W] and scores [N], got {m.shape} and {s.shape}")
    cats = [int(c) for c in _to_numpy(category_id).reshape(-1)]
    cats = cats * len(s) if len(cats) == 1 else cats
    if len(cats) != len(s):
        raise ValueError(f"{len(cats)} category ids for {len(s)} instances")
    if len(s) == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array.
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    boxes = mask_utils.toBbox(rles)
    results = []
    for rle, box, score, cat, area in zip(rles, boxes, s, cats, m.reshape(len(s), -1).sum(1), strict=True):
        if area == 0:
            continue
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON serialisable
        results.append(
            {"image_id": int(image_id), "category_id": cat, "segmentation": rle,
             "bbox": [float(v) for v in box], "score": float(score)}
        )
    return results


def write_results(results: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write results as JSON atomically (temp file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(list(results), f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a results file written by ``write_results``."""
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a JSON list of result dicts")
    return results


def _check_image_ids(coco_gt: COCO, results: list[dict]) -> None:
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results refer to image ids absent from the ground truth: {sorted(unknown)[:10]}")


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Copy results (loadRes mutates them) and, for segm, drop "bbox".

    When "bbox" is present loadRes takes the *box* area as the instance area, which changes the
    small/medium/large split of mask AP; without it the area comes from the mask (as detectron2 does).
    """
    out = copy.deepcopy(results)
    if iou_type == "segm":
        if any("segmentation" not in r for r in out):
            raise ValueError("segm evaluation needs a 'segmentation' in every result")
        for r in out:
            r.pop("bbox", None)
    elif iou_type == "bbox" and any("bbox" not in r for r in out):
        raise ValueError("bbox evaluation needs a 'bbox' in every result")
    return out


def _evaluate_one(coco_gt: COCO, results: list[dict], iou_type: str, img_ids, cat_ids,
                  use_cats: bool = True) -> np.ndarray:
    coco_dt = coco_gt.loadRes(_results_for(results, iou_type))
    ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    ev.params.useCats = int(use_cats)
    if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
    if cat_ids is not None:
        ev.params.catIds = sorted(int(c) for c in cat_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats, dtype=float)


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict] | str | os.PathLike,
    iou_types: Sequence[str] = ("segm", "bbox"),
    img_ids: Iterable[int] | None = None,
    cat_ids: Iterable[int] | None = None,
    verbose: bool = False,
    use_cats: bool = True,
) -> dict[str, float]:
    """Run COCOeval and return ``{"<iou_type>/<stat>": value}`` for every name in STAT_NAMES.

    Values are fractions in [0, 1] (AP 1.0 = perfect). A stat whose area range has no gt is NaN
    (pycocotools reports -1). Crowd gts (iscrowd=1) are pycocotools' "ignore" regions: a prediction
    matched to one is neither a true nor a false positive.

    Empty results: pycocotools' ``loadRes`` fails on an empty list, so every stat is returned as 0.0
    (no predictions = nothing detected), without calling it.

    ``img_ids`` / ``cat_ids`` restrict the evaluation (default: all gt images / categories; images without
    any prediction still count their gts as misses). pycocotools' prints are captured unless ``verbose``.
    ``use_cats=False`` is the class-agnostic evaluation (COCOeval's ``useCats=0``): a detection may match
    a gt of any category, so it measures masks and localisation apart from recognition.
    """
    if isinstance(results, str | os.PathLike):
        results = load_results(results)
    for t in iou_types:
        if t not in ("segm", "bbox"):
            raise ValueError(f"unsupported iou type {t!r}; use 'segm' or 'bbox'")
    if not results:
        return {f"{t}/{name}": 0.0 for t in iou_types for name in STAT_NAMES}
    _check_image_ids(coco_gt, results)
    img_ids = list(img_ids) if img_ids is not None else None
    cat_ids = list(cat_ids) if cat_ids is not None else None
    out: dict[str, float] = {}
    for t in iou_types:
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            stats = _evaluate_one(coco_gt, results, t, img_ids, cat_ids, use_cats)
        for name, value in zip(STAT_NAMES, stats, strict=True):
            out[f"{t}/{name}"] = float(value) if value >= 0 else float("nan")
    return out


def f1_operating_point(
    coco_gt: COCO,
    results: list[dict],
    iou_type: str = "segm",
    img_ids: Iterable[int] | None = None,
    cat_ids: Iterable[int] | None = None,
    iou: float = 0.5,
) -> tuple[float, float]:
    """(best F1, the score threshold that reaches it) of detections matched to gts at IoU >= ``iou``.

    COCOeval's own matching (per image and category, greedy by score, crowd gts ignored) at area range
    "all" and its largest max-detections: keeping the detections scoring at or above the threshold gives
    the best F1 = 2PR / (P + R). This is the operating point to offer as a default score threshold; AP
    does not depend on how the scores are calibrated, a user picking instances does. No results: (0, 1).
    """
    if not results:
        return 0.0, 1.0
    _check_image_ids(coco_gt, results)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(_results_for(results, iou_type)), iouType=iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in img_ids)
        if cat_ids is not None:
            ev.params.catIds = sorted(int(c) for c in cat_ids)
        ev.evaluate()
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    n_area = len(ev.params.areaRng)
    scores, hits, n_gt = [], [], 0
    for k, e in enumerate(ev.evalImgs):
        if e is None or k % (n_area * len(ev.params.imgIds)) >= len(ev.params.imgIds):
            continue  # area ranges other than "all" (the first)
        keep = ~np.asarray(e["dtIgnore"][t], dtype=bool)
        scores += list(np.asarray(e["dtScores"])[keep])
        hits += list(np.asarray(e["dtMatches"][t])[keep] > 0)
        n_gt += int((~np.asarray(e["gtIgnore"], dtype=bool)).sum())
    if not scores or n_gt == 0:
        return 0.0, 1.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, tp = np.asarray(scores)[order], np.cumsum(np.asarray(hits)[order])
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + n_gt)  # 2PR/(P+R) = 2TP / (detections + gts)
    # a threshold keeps every detection scoring at least it: only the last of equal scores is a valid cut
    valid = np.append(s[1:] < s[:-1], True)
    best = int(np.argmax(np.where(valid, f1, -1.0)))
    return float(f1[best]), float(s[best])
