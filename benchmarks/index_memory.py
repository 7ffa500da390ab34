"""Peak memory of building a VectorIndex from vectors generated in chunks, relative to the vectors' own size.

Usage: python benchmarks/index_memory.py [--n 1000000] [--dim 512] [--kind flat] [--chunk 50000]
Each mode runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Reported: (peak RSS -
RSS after imports) / (n * dim * 4 bytes). Target <= 1.5 with ``reserve(n)`` (the documented way to
build a large index); without it the storage grows by doubling and the peak depends on where the
last doubling falls (up to ~2x), which is printed for information. Exit status 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from vlkit.index import VectorIndex

    index = VectorIndex(args.dim, kind=args.kind)
    rng = np.random.default_rng(0)
    baseline = current_rss_bytes()  # after imports: the interpreter, torch and faiss are not the index
    t0 = time.perf_counter()
    if args.reserve:
        index.reserve(args.n)
    for start in range(0, args.n, args.chunk):
        x = rng.standard_normal((min(args.chunk, args.n - start), args.dim), dtype=np.float32)
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no chunk-sized temporary, unlike linalg.norm
        index.add(x)
        del x  # so the next chunk is not generated while this one is still alive
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {"count": len(index), "baseline": baseline, "peak": peak, "seconds": time.perf_counter() - t0}
        )
    )


def run_mode(args: argparse.Namespace, reserve: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--n",
        str(args.n),
        "--dim",
        str(args.dim),
        "--kind",
        args.kind,
        "--chunk",
        str(args.chunk),
    ] + (["--reserve"] if reserve else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kind", default="flat")
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--reserve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    vec_bytes = args.n * args.dim * 4
    print(
        f"indexing {args.n} x {args.dim} float32 ({vec_bytes / 2**30:.2f} GiB) into kind={args.kind!r}, "
        f"chunks of {args.chunk}"
    )
    ok = True
    for reserve in (True, False):
        r = run_mode(args, reserve)
        assert r["count"] == args.n
        ratio = (r["peak"] - r["baseline"]) / vec_bytes
        label = "with reserve(n)" if reserve else "without reserve"
        verdict = ("PASS" if ratio <= 1.5 else "FAIL") if reserve else "(info)"
        print(
            f"{label:16s}: peak - baseline = {(r['peak'] - r['baseline']) / 2**30:.2f} GiB, "
            f"ratio {ratio:.2f} (target <= 1.5) {verdict}, {r['seconds']:.1f} s"
        )
        ok = ok and (ratio <= 1.5 or not reserve)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
