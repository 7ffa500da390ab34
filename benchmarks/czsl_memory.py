"""Peak memory and time of streaming CZSL evaluation at open-world C-GQA size; streaming == dense check."""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from vlkit.metrics.czsl import choose_threshold, evaluate, evaluate_dense, feasibility_scores

GIB = 1024**3
RSS_AFTER_IMPORT = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # torch runtime alone


def rss_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def synthetic(n_attr: int, n_obj: int, n_img: int, dim: int, n_train: int, n_test: int, seed: int) -> dict:
    """C-GQA-shaped split of unit embeddings; images lie near their gt pair so accuracies are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    n_pairs = n_attr * n_obj
    pair_emb = torch.empty(n_pairs, dim)
    for i in range(0, n_pairs, 16384):  # in slices, so generation peaks no higher than the data itself
        pair_emb[i : i + 16384] = F.normalize(torch.randn(min(16384, n_pairs - i), dim, generator=g), dim=1)
    perm = torch.randperm(n_pairs, generator=g)
    train_idx, unseen_idx = perm[:n_train], perm[n_train : n_train + n_test]
    # Test images: half with seen gt pairs, half unseen (C-GQA test is about even).
    test_seen = train_idx[:n_test]
    gt_pool = torch.cat([test_seen, unseen_idx])
    pair_gt = gt_pool[torch.randint(len(gt_pool), (n_img,), generator=g)]
    noise = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    img_emb = F.normalize(pair_emb[pair_gt] + 5.0 * noise, dim=1)
    as_pairs = lambda idx: [(int(i) // n_obj, int(i) % n_obj) for i in idx]  # noqa: E731
    return {
        "pair_emb": pair_emb,
        "img_emb": img_emb,
        "pairs": as_pairs(range(n_pairs)),
        "train": as_pairs(train_idx),
        "eval": as_pairs(torch.cat([test_seen, unseen_idx])),
        "attr_gt": pair_gt // n_obj,
        "obj_gt": pair_gt % n_obj,
        "pair_gt": pair_gt,
        "seen_cols": train_idx,
    }


def score_fn(data: dict, seen_bonus: float = 1.5):
    """scores(start, stop): 100 * cosine, with a bonus on seen pairs (the bias calibration undoes)."""
    bonus = torch.zeros(1, len(data["pairs"]))
    bonus[0, data["seen_cols"]] = seen_bonus
    pair_t = data["pair_emb"].T
    return lambda i, j: torch.addmm(bonus, data["img_emb"][i:j], pair_t, alpha=100.0)


def args_of(data: dict) -> tuple:
    return data["pairs"], data["train"], data["eval"], data["attr_gt"], data["obj_gt"], data["pair_gt"]


def full_size(a: argparse.Namespace) -> None:
    n_pairs = a.attrs * a.objs
    data = synthetic(a.attrs, a.objs, a.images, a.dim, a.train_pairs, a.test_pairs, seed=0)
    base = rss_peak_gib()
    print(f"open-world pairs: {a.attrs} x {a.objs} = {n_pairs:,}; images: {a.images:,}; dim {a.dim}")
    dense_bytes = a.images * n_pairs * 4
    print(
        f"dense [{a.images} x {n_pairs}] float32 matrix alone: "
        f"{dense_bytes / 1e9:.2f} GB ({dense_bytes / GIB:.2f} GiB)"
    )
    print(f"peak RSS after importing torch + vlkit: {RSS_AFTER_IMPORT:.2f} GiB")
    print(
        f"pair embeddings held by this script: {n_pairs * a.dim * 4 / GIB:.2f} GiB; "
        f"peak RSS before eval {base:.2f} GiB"
    )
    t, cpu = time.perf_counter(), time.process_time()
    r = evaluate(score_fn(data), *args_of(data), open_world=True, chunk_size=a.chunk_size)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(
        f"streaming open world: {wall:.1f} s wall, {cpu:.1f} s CPU (scores computed on the fly), "
        f"peak RSS {rss_peak_gib():.2f} GiB\n"
        f"  AUC {r['AUC']:.4f}  best HM {r['best_hm']:.4f}  best seen {r['best_seen']:.4f}  "
        f"best unseen {r['best_unseen']:.4f}  attr {r['attr_acc']:.4f}  obj {r['obj_acc']:.4f}  "
        f"({len(r['biases'])} curve points)"
    )
    if a.threshold_search:
        g = torch.Generator().manual_seed(1)
        t = time.perf_counter()
        feas = feasibility_scores(
            torch.randn(a.attrs, 64, generator=g),
            torch.randn(a.objs, 64, generator=g),
            data["pairs"],
            data["train"],
        )
        t_feas = time.perf_counter() - t
        t, cpu = time.perf_counter(), time.process_time()
        c = choose_threshold(score_fn(data), *args_of(data), feasibility=feas, chunk_size=a.chunk_size)
        print(
            f"feasibility_scores: {t_feas:.1f} s; choose_threshold (50 thresholds, one pass): "
            f"{time.perf_counter() - t:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; threshold "
            f"{c.threshold:.4f} (AUC {c.result['AUC']:.4f}); peak RSS {rss_peak_gib():.2f} GiB"
        )


def check_small() -> None:
    """Streaming == dense, exactly, on a reduced size (closed, open, open + feasibility)."""
    data = synthetic(40, 50, 600, 64, 400, 150, seed=2)
    scores = score_fn(data)(0, 600)
    g = torch.Generator().manual_seed(3)
    feas = feasibility_scores(
        torch.randn(40, 16, generator=g), torch.randn(50, 16, generator=g), data["pairs"], data["train"]
    )
    for name, kw in (
        ("closed", {}),
        ("open", {"open_world": True}),
        ("open+feasible", {"open_world": True, "feasible": feas >= float(feas.median())}),
    ):
        dense = evaluate_dense(scores, *args_of(data), **kw)
        stream = evaluate(score_fn(data), *args_of(data), chunk_size=37, **kw)
        assert stream == dense, f"streaming != dense ({name})"
        print(f"  {name:14s} streaming == dense: AUC {dense['AUC']:.4f}, best HM {dense['best_hm']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attrs", type=int, default=413)
    p.add_argument("--objs", type=int, default=674)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--train-pairs", type=int, default=5592)  # C-GQA seen pairs
    p.add_argument("--test-pairs", type=int, default=900)  # unseen test pairs (C-GQA: ~900)
    p.add_argument(
        "--chunk-size", type=int, default=None, help="image rows per block (default: ~2**25 scores)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threshold-search", action="store_true", help="also time feasibility + choose_threshold")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    full_size(a)
    print("reduced size check (600 images, 40 x 50 pairs, chunk 37):")
    check_small()


if __name__ == "__main__":
    main()
