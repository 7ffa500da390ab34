"""Recall against training time, for people who would rather look than read."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = (("t2i_R@1", "text -> image R@1"), ("i2t_R@1", "image -> text R@1"), ("zeroshot_acc", "48-way zero-shot"))


def plot_recall_vs_time(eval_log: Path, out_png: Path) -> bool:
    """Plot validation R@1 (both ways) and zero-shot accuracy from a run's ``eval_log.jsonl`` against the CPU
    minutes of training. False when the log is empty."""
    recs = [json.loads(x) for x in Path(eval_log).read_text().splitlines() if x.strip()]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    minutes = [r["cpu_s"] / 60 for r in recs]
    for (key, name), color in zip(CURVES, ("C0", "C1", "C2")):
        if all(key in r for r in recs):
            ax.plot(minutes, [r[key] for r in recs], color=color, marker=".", label=name)
    ax.set_xlabel("CPU minutes of training (all threads of the training process)")
    ax.set_ylabel("validation, %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True
