"""Compositional zero-shot evaluation (the closed/open-world protocol of CSP and its predecessors):
``evaluate`` sweeps the calibration bias and reports AUC, best seen/unseen/HM; ``choose_threshold`` picks the
open-world feasibility threshold on validation. ``inputs`` checks and blocks the scores, ``sweep`` runs the bias
sweep, ``evaluate`` holds the public entry points."""

from vlkit.metrics.czsl.evaluate import (
    CZSLResult,
    ThresholdChoice,
    choose_threshold,
    evaluate,
    evaluate_dense,
    feasibility_scores,
    plot_curve,
)

__all__ = [
    "CZSLResult",
    "ThresholdChoice",
    "choose_threshold",
    "evaluate",
    "evaluate_dense",
    "feasibility_scores",
    "plot_curve",
]
