"""Structured pruning of open_clip towers under a FLOP budget: importance -> selection -> materialize -> report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone.blocks import available_towers, transformer_blocks
from vlkit.compress.conv import prune_conv_channels
from vlkit.compress.distill import DistillWeights, distillation_loss
from vlkit.compress.flops import TowerFlops, count_flops, dummy_inputs, flop_model
from vlkit.compress.importance import Importances, magnitude_importance, optin_importance, random_importance
from vlkit.compress.materialize import count_parameters, materialize
from vlkit.compress.methods import METHODS
from vlkit.compress.reconstruct import reconstruct, snapshot_blocks
from vlkit.progress import progress

__all__ = [
    "magnitude_importance", "optin_importance", "plot_kept_units", "prune_backbone", "prune_conv_channels",
    "choose_split", "embed_pairs", "random_importance", "relation_damage", "select_under_budget", "tower_splits",
]
Key = tuple[str, int]


def _ranked(scores: dict[Key, torch.Tensor], costs: dict[Key, int], minimum: int):
    """(forced units, ranked free units) as lists of (score, cost, key, index); forced = per-block top-``minimum``."""
    forced, free = [], []
    for key, s in scores.items():
        order = torch.argsort(s, descending=True, stable=True).tolist()
        for rank, i in enumerate(order):
            (forced if rank < minimum else free).append((float(s[i]), costs[key], key, i))
    free.sort(key=lambda u: -u[0])
    return forced, free


def _prefix(units) -> tuple[torch.Tensor, torch.Tensor]:
    cost = torch.tensor([0.0] + [float(u[1]) for u in units], dtype=torch.float64).cumsum(0)
    value = torch.tensor([0.0] + [u[0] for u in units], dtype=torch.float64).cumsum(0)
    return cost, value


def _best_split(heads, neurons, budget: float) -> tuple[int, int]:
    """The (k heads, m neurons), each a prefix of its ranking, with the largest total score within budget.

    With one cost per unit kind (true within a tower) this is the exact optimum of the two-kind knapsack,
    the search OPTIN runs (prune/main_prune.py: globalRankingLanguage)."""
    hc, hv = _prefix(heads)
    nc, nv = _prefix(neurons)
    best, best_key = (0, 0), (-1.0, -1)
    for k in range(len(heads) + 1):
        rest = budget - float(hc[k])
        if rest < 0:
            break
        m = int(torch.searchsorted(nc, torch.tensor([rest], dtype=torch.float64), right=True)) - 1
        key = (float(hv[k] + nv[m]), k + m)
        if key > best_key:
            best, best_key = (k, m), key
    return best


def _proportional_split(heads, neurons, budget: float) -> tuple[int, int]:
    """(k heads, m neurons) keeping the same fraction of each kind's cost: the split a baseline uses whose
    scores are not comparable across kinds (random scores would otherwise drop every costly head first)."""
    hc, _ = _prefix(heads)
    nc, _ = _prefix(neurons)
    total = float(hc[-1] + nc[-1])
    frac = min(1.0, budget / total) if total > 0 else 0.0
    k = int(torch.searchsorted(hc, torch.tensor([frac * float(hc[-1])], dtype=torch.float64), right=True)) - 1
    rest = budget - float(hc[k])
    m = int(torch.searchsorted(nc, torch.tensor([rest], dtype=torch.float64), right=True)) - 1
    return k, m


def _select_tower(imp: Importances, tf: TowerFlops, keys: list[Key], flops: float,
                  min_heads: int, min_neurons: int, split: str = "best") -> tuple[dict, dict, dict[str, Any]]:
    head_cost = {k: tf.head_cost[k[1]] for k in keys}
    neuron_cost = {k: tf.neuron_cost[k[1]] for k in keys}
    for kind in ("heads", "neurons"):
        if any(float(imp[kind][k].min()) < 0 for k in keys if imp[kind][k].numel()):
            raise ValueError(f"importances must be >= 0 ({kind} of the {tf.tower} tower are not)")
    f_h, heads = _ranked({k: imp["heads"][k] for k in keys}, head_cost, min_heads)
    f_n, neurons = _ranked({k: imp["neurons"][k] for k in keys}, neuron_cost, min_neurons)
    budget = int(flops * tf.dense)
    free = budget - tf.fixed - sum(u[1] for u in f_h + f_n)
    if free < 0:
        raise ValueError(f"{tf.tower}: a budget of {flops:.0%} ({budget} FLOPs) cannot hold the fixed part "
                         f"({tf.fixed}) plus the per-block minimums; raise flops or lower min_heads/min_neurons")
    k, m = (_best_split if split == "best" else _proportional_split)(heads, neurons, free)
    hm = {key: torch.zeros_like(imp["heads"][key], dtype=torch.float32) for key in keys}
    nm = {key: torch.zeros_like(imp["neurons"][key], dtype=torch.float32) for key in keys}
    for _, _, key, i in f_h + heads[:k]:
        hm[key][i] = 1.0
    for _, _, key, i in f_n + neurons[:m]:
        nm[key][i] = 1.0
    heads_per = [int(hm[key].sum()) for key in keys]
    neurons_per = [int(nm[key].sum()) for key in keys]
    info = {"budget": budget, "dense": tf.dense, "selected": tf.total(heads_per, neurons_per)}
    return hm, nm, info


def select_under_budget(importances: Importances, flop_models: dict[str, TowerFlops],
                        flops: float | Mapping[str, float] = 0.6, *, min_heads: int = 0, min_neurons: int = 0,
                        split: str = "best") -> tuple[dict, dict, dict[str, Any]]:
    """Binary head/neuron masks keeping, per tower, FLOPs <= ``flops`` x the tower's current FLOPs (one
    fraction for every tower, or one per tower: {"image": 0.6, "text": 0.25}).

    Heads and neurons are ranked separately (highest importance first); the kept sets are a prefix of each
    ranking, chosen to maximise total kept importance within the budget (OPTIN's global-ranking search).
    ``min_heads`` / ``min_neurons`` reserve each block's top units first. Returns (head_masks, neuron_masks,
    info per tower). ``split="proportional"`` instead keeps the same cost fraction of heads and of neurons
    (for scores that are not comparable across the two kinds, such as the random baseline's)."""
    if split not in ("best", "proportional"):
        raise ValueError(f"split must be 'best' or 'proportional', got {split!r}")
    fractions = dict(flops) if isinstance(flops, Mapping) else {t: flops for t in flop_models}
    for tower, frac in fractions.items():
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"flops is a fraction of the dense FLOPs in (0, 1], got {frac} ({tower} tower)")
    head_masks, neuron_masks, info = {}, {}, {}
    for tower, tf in flop_models.items():
        keys = sorted(k for k in importances["heads"] if k[0] == tower)
        if not keys:
            continue
        if tower not in fractions:
            raise ValueError(f"no FLOP fraction for the {tower} tower (given: {', '.join(fractions)})")
        hm, nm, info[tower] = _select_tower(importances, tf, keys, fractions[tower], min_heads, min_neurons, split)
        head_masks.update(hm)
        neuron_masks.update(nm)
    return head_masks, neuron_masks, info


def tower_splits(flop_models: Mapping[str, TowerFlops], flops: float, step: float = 0.05) -> list[dict[str, float]]:
    """Per-tower kept fractions whose FLOPs add up to ``flops`` x the towers' summed dense FLOPs: the even
    split first, then the first tower's fraction moved by multiples of ``step`` (the other tower takes what is
    left), every fraction in (0, 1]. One tower: its own budget. Two at most (a CLIP model's image and text)."""
    towers = list(flop_models)
    if len(towers) == 1:
        return [{towers[0]: flops}]
    if len(towers) != 2:
        raise ValueError(f"a budget over the whole model splits between two towers, got {len(towers)}")
    (a, fa), (b, fb) = ((t, flop_models[t].dense) for t in towers)
    total = flops * (fa + fb)
    out = []
    for k in sorted(range(-int(1 / step) - 1, int(1 / step) + 2), key=abs):
        x = round(flops + k * step, 6)
        y = (total - x * fa) / fb
        if 0.0 < x <= 1.0 and 0.0 < y <= 1.0:
            out.append({a: x, b: y})
    return out


@torch.no_grad()
def embed_pairs(model: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of an open_clip model, ``chunk`` inputs at a time."""
    img = torch.cat([model.encode_image(images[i:i + chunk]) for i in range(0, len(images), chunk)])
    txt = torch.cat([model.encode_text(texts[i:i + chunk]) for i in range(0, len(texts), chunk)])
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


@torch.no_grad()
def relation_damage(dense: nn.Module, pruned: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                    reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """How far the pruned model's in-batch image-text similarity distributions (each image's softmax over
    the captions and each caption's over the images, at the dense model's logit scale) fall from the dense
    model's: the distillation loss's relation term (KL, both ways), before any training. ``reference`` = the
    dense model's ``embed_pairs`` of these inputs, when already computed."""
    t_img, t_txt = reference if reference is not None else embed_pairs(dense, images, texts)
    s_img, s_txt = embed_pairs(pruned, images, texts)
    terms = distillation_loss(s_img, s_txt, t_img, t_txt, dense.logit_scale.exp().float(),
                              DistillWeights(relation=1.0, feature=0.0))
    return float(terms["kd_relation"])


def choose_split(model: nn.Module, imp: Importances, fm: dict[str, TowerFlops], flops: float,
                 select_on: Mapping[str, torch.Tensor], dense: Mapping[Key, nn.Module] | None = None,
                 refit_on: Mapping[str, torch.Tensor] | None = None, ridge: float = 1e-2,
                 **select_kw: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The split of a whole-model FLOP budget between the towers (``tower_splits``) whose pruned model keeps
    the dense model's image-text relations best on ``select_on`` ({"image": ..., "text": ...}; with ``dense``,
    the unpruned blocks from ``snapshot_blocks``, each candidate is refit on ``refit_on`` first, as
    ``prune_backbone`` refits). ``select_kw`` go to ``select_under_budget``. Returns (the chosen fractions per
    tower, every split tried with its ``relation_damage``)."""
    if "image" not in select_on or "text" not in select_on:
        raise ValueError("a budget over the whole model compares splits on images and their captions: "
                         "give select_on={'image': ..., 'text': ...}")
    images, texts = select_on["image"], select_on["text"]
    reference = embed_pairs(model, images, texts)
    search: list[dict[str, Any]] = []
    for fractions in progress(tower_splits(fm, flops), "compare FLOP splits", unit="split"):
        try:
            hm, nm, _ = select_under_budget(imp, fm, fractions, **select_kw)
        except ValueError:  # a fraction below a tower's fixed part
            continue
        candidate = materialize(model, hm, nm)
        if dense:
            reconstruct(candidate, dense, refit_on or {}, ridge=ridge)
        search.append({"fractions": fractions, "damage": relation_damage(model, candidate, images, texts, reference)})
    if not search:
        raise ValueError(f"no split of {flops:.0%} of the model's FLOPs holds every tower's fixed part; raise flops")
    return min(search, key=lambda r: r["damage"])["fractions"], search


def _importances(model, method, towers, calib_images, calib_texts, seed, **optin_kw) -> Importances:
    if method == "optin":
        return optin_importance(model, calib_images, calib_texts, towers=towers, seed=seed, **optin_kw)
    if method == "magnitude":
        return magnitude_importance(model, towers)
    if method == "random":
        return random_importance(model, towers, seed=seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def tower_report(tower: str, before: TowerFlops, after: TowerFlops, counted0: int, counted1: int,
                 flops: float) -> dict[str, Any]:
    """Kept heads/neurons and analytic/counted FLOPs of one tower before and after pruning, and the budget."""
    return {
        "kept_heads": after.n_heads, "total_heads": before.n_heads,
        "kept_neurons": after.mlp_hidden, "total_neurons": before.mlp_hidden,
        "flops_before_analytic": before.dense, "flops_after_analytic": after.dense,
        "flops_before_counted": counted0, "flops_after_counted": counted1,
        "flops_ratio": counted1 / max(counted0, 1), "budget_met": counted1 <= flops * counted0,
    }


def model_flops(counted_before: Mapping[str, int], counted_after: Mapping[str, int],
                towers: Sequence[str]) -> dict[str, Any]:
    """Counted FLOPs of the pruned towers together (one input each), before and after, and their ratio."""
    before, after = sum(counted_before[t] for t in towers), sum(counted_after[t] for t in towers)
    return {"before_counted": before, "after_counted": after, "ratio": after / max(before, 1)}


def prune_backbone(model: nn.Module, method: str = "optin", flops: float = 0.6,
                   calib_images: torch.Tensor | None = None, calib_texts: torch.Tensor | None = None, *,
                   towers: Sequence[str] | None = None, seed: int = 0, min_heads: int = 0, min_neurons: int = 0,
                   inplace: bool = False, reconstruct_on: dict[str, torch.Tensor] | None = None,
                   ridge: float = 1e-2, budget: str = "tower", select_on: dict[str, torch.Tensor] | None = None,
                   **optin_kw: Any) -> tuple[nn.Module, dict[str, Any]]:
    """One-shot structured pruning of an open_clip model's transformer towers to ``flops`` x dense FLOPs.

    ``model`` is the open_clip module (``Backbone.model``); calibration inputs are preprocessed images
    [B, 3, S, S] and token ids [N, L] (needed by "optin" for each pruned tower). FLOPs are per input (one
    image, one caption). ``budget="tower"`` keeps ``flops`` of each pruned tower's own FLOPs; ``"model"``
    keeps ``flops`` of the pruned towers' summed FLOPs, split between them where the pruned model keeps the
    dense one's image-text relations best on ``select_on`` ({"image": ..., "text": ...}, calibration pairs
    held out from the others; ``tower_splits``, ``relation_damage``; every split tried is in the report).
    Returns (pruned model, report) where report holds kept units per block, FLOPs before/after (analytic and
    FlopCounterMode-counted), params before/after and the pruned spec.

    ``reconstruct_on`` (calibration inputs per tower, {"image": ..., "text": ...}) refits the output
    projections of the pruned attentions and MLPs by least squares to the unpruned ones on those inputs
    (vlkit.compress.reconstruct; ``ridge`` its regularisation); the report then holds each fit's errors."""
    if budget not in ("tower", "model"):
        raise ValueError(f"budget must be 'tower' (each tower keeps flops of its own FLOPs) or 'model' (the "
                         f"towers together), got {budget!r}")
    towers = tuple(towers) if towers is not None else available_towers(model)
    transformer_blocks(model, towers)  # clear error for towers that cannot be pruned this way
    was_training = model.training
    model.eval()
    imp = _importances(model, method, towers, calib_images, calib_texts, seed, **optin_kw)
    fm_before = flop_model(model, towers)
    select_kw = {"min_heads": min_heads, "min_neurons": min_neurons,
                 "split": "proportional" if method == "random" else "best"}
    refit_on = {t: v for t, v in (reconstruct_on or {}).items() if t in towers}
    dense = snapshot_blocks(model, towers) if reconstruct_on else None
    fractions: float | dict[str, float] = flops
    search = None
    if budget == "model" and len(towers) > 1:
        fractions, search = choose_split(model, imp, fm_before, flops, select_on or {}, dense, refit_on, ridge,
                                          **select_kw)
    head_masks, neuron_masks, info = select_under_budget(imp, fm_before, fractions, **select_kw)
    images, tokens = dummy_inputs(model, 1)
    images = calib_images[:1] if calib_images is not None else images
    tokens = calib_texts[:1] if calib_texts is not None else tokens
    args = (images if "image" in towers else None, tokens if "text" in towers else None)
    counted_before, params_before = count_flops(model, *args), count_parameters(model)
    pruned = materialize(model, head_masks, neuron_masks, inplace=inplace)
    fits = reconstruct(pruned, dense, refit_on, ridge=ridge) if dense else None
    counted_after, fm_after = count_flops(pruned, *args), flop_model(pruned, towers)
    model.train(was_training)
    pruned.train(was_training)
    per_tower = fractions if isinstance(fractions, dict) else {t: flops for t in towers}
    report = {
        "method": method, "flops_target": flops, "seed": seed, "budget": budget,
        "towers": {t: tower_report(t, fm_before[t], fm_after[t], counted_before[t], counted_after[t], per_tower[t])
                   for t in towers},
        "params_before": params_before, "params_after": count_parameters(pruned),
        "selection": info, "spec": getattr(pruned, "vlkit_pruned_spec", None),
    }
    report["model_flops"] = model_flops(counted_before, counted_after, towers)
    if search is not None:
        report["split"] = {"fractions": per_tower, "n_pairs": len(select_on["image"]), "tried": search}
    if fits is not None:
        report["reconstruction"] = {"ridge": ridge, "n": {t: len(v) for t, v in refit_on.items()}, "fits": fits}
    return pruned, report


def plot_kept_units(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG bar chart of kept vs total heads and neurons per block, one row per tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = list(report["towers"])
    fig, axes = plt.subplots(len(towers), 2, figsize=(10, 3 * len(towers)), squeeze=False)
    for row, tower in enumerate(towers):
        rep = report["towers"][tower]
        for col, kind in enumerate(("heads", "neurons")):
            ax, kept, total = axes[row][col], rep[f"kept_{kind}"], rep[f"total_{kind}"]
            idx = range(len(total))
            ax.bar(idx, total, color="#d0d0d0", label="dense")
            ax.bar(idx, kept, color="#3b75af", label="kept")
            ax.set_title(f"{tower}: kept {kind} ({sum(kept)}/{sum(total)})")
            ax.set_xlabel("block")
            ax.set_xticks(list(idx))
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['method']} @ {report['flops_target']:.0%} FLOPs")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
