"""Unit importance for heads and MLP neurons: OPTIN (one-shot trajectory distillation), weight magnitude, random.

OPTIN (Khaki & Plataniotis, ICLR 2024; github.com/Skhaki18/optin-transformer-pruning, prune/head_pruning.py,
prune/language_pruning.py, prune/loss_components.py) scores a unit by removing it alone and measuring
(a) the manifold-distillation distance of the token features of the *later* layers to the unpruned ones
(L2-normalised tokens, a random subset of K=768 of the batch's tokens, Gram matrices M = f f^T,
||M_dense - M_masked||^2; summed over layers after the masked one, the masked layer itself only when it
is the last) plus (b) lambda times a KL divergence of the output logits. Here (b) is the cosine distance
of the output embeddings (a CLIP tower has no class logits), the token subset is fixed per tower (seeded)
instead of re-drawn per unit, and each term is divided by its mean over the tower's units before adding,
in place of OPTIN's power-of-ten rescaling of the KL term towards lambda.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone.blocks import (
    TowerStages,
    available_towers,
    tower_stages,
    transformer_blocks,
    valid_tokens,
)
from vlkit.compress.masks import install_explicit, set_masks, uninstall

Key = tuple[str, int]
Importances = dict[str, dict[Key, torch.Tensor]]  # {"heads": {(tower, i): [n_heads]}, "neurons": {...}}


def magnitude_importance(model: nn.Module, towers: Sequence[str] | None = None) -> Importances:
    """L1 norm of each unit's weights: a head's q/k/v rows and out_proj columns; a neuron's fc row and proj column."""
    out: Importances = {"heads": {}, "neurons": {}}
    for v in transformer_blocks(model, towers or available_towers(model)):
        qkv, ow = v.qkv_weight().detach().abs(), v.out_weight().detach().abs()
        out["heads"][v.key] = torch.stack([qkv[v.head_rows(h)].sum() + ow[:, v.head_cols(h)].sum()
                                           for h in range(v.n_heads)]).float().cpu() if v.n_heads else torch.zeros(0)
        fc, pw = v.fc_weight().detach().abs(), v.proj_weight().detach().abs()
        out["neurons"][v.key] = (fc.sum(1) + pw.sum(0)).float().cpu()
    return out


def random_importance(model: nn.Module, towers: Sequence[str] | None = None, seed: int = 0) -> Importances:
    """Uniform random scores (a baseline), reproducible through ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out: Importances = {"heads": {}, "neurons": {}}
    for v in transformer_blocks(model, towers or available_towers(model)):
        out["heads"][v.key] = torch.rand(v.n_heads, generator=gen)
        out["neurons"][v.key] = torch.rand(v.mlp_hidden, generator=gen)
    return out


def _token_subset(tower: str, inputs: torch.Tensor, batch: int, tokens: int, k: int, seed: int) -> torch.Tensor:
    """Flat indices into [batch * tokens] of the tokens compared by the Gram distance (text: up to EOT)."""
    valid = valid_tokens(tower, inputs, tokens)
    valid = torch.ones(batch, tokens, dtype=torch.bool) if valid is None else valid
    idx = valid.flatten().nonzero().flatten()
    if idx.numel() > k:
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:k]].sort().values
    return idx


def _gram_distance(h: torch.Tensor, copies: int, idx: torch.Tensor) -> torch.Tensor:
    """Per-copy mean squared Gram difference to copy 0 (the unmasked reference in the same batch)."""
    f = F.normalize(h.float(), dim=-1).reshape(copies, -1, h.shape[-1])[:, idx.to(h.device)]
    gram = f @ f.transpose(1, 2)
    return (gram[1:] - gram[:1]).pow(2).mean(dim=(1, 2))


def _unit_masks(units: Sequence[tuple[str, int]], batch: int, n_heads: int, n_neurons: int, device):
    """Per-sample masks: copy 0 is the reference, copy c+1 removes unit c."""
    copies = len(units) + 1
    heads = torch.ones(copies, batch, n_heads, device=device)
    neurons = torch.ones(copies, batch, n_neurons, device=device)
    for c, (kind, u) in enumerate(units, start=1):
        (heads if kind == "heads" else neurons)[c, :, u] = 0
    has_h = any(kind == "heads" for kind, _ in units)
    has_n = any(kind == "neurons" for kind, _ in units)
    return (heads.flatten(0, 1) if has_h else None), (neurons.flatten(0, 1) if has_n else None)


def _repeat(t: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.repeat(copies, *([1] * (t.ndim - 1)))


@torch.no_grad()
def _score_chunk(stages: TowerStages, view, start: int, x_in: torch.Tensor, attn_mask, inputs: torch.Tensor,
                 units: Sequence[tuple[str, int]], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(trajectory distance, embedding cosine distance) of removing each unit of ``units`` in block ``start``."""
    copies, batch, last = len(units) + 1, x_in.shape[0], len(stages.blocks) - 1
    head_mask, neuron_mask = _unit_masks(units, batch, view.n_heads, view.mlp_hidden, x_in.device)
    mask = attn_mask if attn_mask is None or attn_mask.ndim == 2 else _repeat(attn_mask, copies)
    h, traj = _repeat(x_in, copies), torch.zeros(len(units), device=x_in.device)
    set_masks(view, head_mask, neuron_mask)
    try:
        for j in range(start, last + 1):
            h, _ = stages.run_blocks(h, mask, start=j, stop=j + 1)
            if j == start:
                set_masks(view, None, None)
            if j > start or start == last:
                traj += _gram_distance(h, copies, idx)
    finally:
        set_masks(view, None, None)
    emb = F.normalize(stages.head(h, _repeat(inputs, copies)).float(), dim=-1).reshape(copies, batch, -1)
    cos = 1 - (emb[1:] * emb[:1]).sum(-1).mean(-1)
    return traj, cos.clamp_min(0)


@torch.no_grad()
def _optin_tower(model: nn.Module, tower: str, inputs: torch.Tensor, chunk: int, max_tokens: int,
                 seed: int) -> tuple[dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
    """Raw (trajectory, embedding) distances per unit, as flat [heads..., neurons...] tensors per block."""
    stages, views = tower_stages(model, tower), transformer_blocks(model, [tower])
    x, attn_mask = stages.embed(inputs)
    idx = _token_subset(tower, inputs, x.shape[0], x.shape[1], max_tokens, seed)
    traj: dict[Key, torch.Tensor] = {}
    emb: dict[Key, torch.Tensor] = {}
    for view in views:
        units = [("heads", h) for h in range(view.n_heads)] + [("neurons", n) for n in range(view.mlp_hidden)]
        preinstalled = bool(getattr(view.attn, "_vlkit_explicit", False))
        install_explicit(view)  # only the block whose units are removed needs the mask-aware path
        try:
            parts = [_score_chunk(stages, view, view.index, x, attn_mask, inputs, units[i:i + chunk], idx)
                     for i in range(0, len(units), chunk)]
        finally:
            if not preinstalled:
                uninstall(view.attn)
                uninstall(view.mlp)
        traj[view.key] = torch.cat([p[0] for p in parts]).cpu()
        emb[view.key] = torch.cat([p[1] for p in parts]).cpu()
        x, _ = stages.run_blocks(x, attn_mask, start=view.index, stop=view.index + 1)
    return traj, emb


def _mean(values: dict[Key, torch.Tensor]) -> float:
    flat = torch.cat(list(values.values()))
    return float(flat.mean()) if flat.numel() and float(flat.mean()) > 0 else 1.0


def optin_importance(model: nn.Module, calib_images: torch.Tensor | None = None,
                     calib_texts: torch.Tensor | None = None, *, towers: Sequence[str] | None = None,
                     lam: float = 1.0, chunk: int = 32, max_tokens: int = 768, seed: int = 0) -> Importances:
    """OPTIN-style one-shot importance of every head and neuron from a calibration batch (no gradients).

    Each unit is removed alone; the forward restarts at its block from cached block inputs, with ``chunk``
    units removed in ``chunk`` batch copies at once (plus one unmasked reference copy, so distances are
    free of batch-size rounding noise). score = traj / mean(traj) + lam * emb / mean(emb) per tower."""
    inputs = {"image": calib_images, "text": calib_texts}
    towers = tuple(towers) if towers is not None else tuple(t for t in available_towers(model)
                                                            if inputs[t] is not None)
    out: Importances = {"heads": {}, "neurons": {}}
    was_training = model.training
    model.eval()
    try:
        for tower in towers:
            if inputs[tower] is None:
                raise ValueError(f"OPTIN needs calibration inputs for the {tower} tower "
                                 f"(calib_{'images' if tower == 'image' else 'texts'})")
            traj, emb = _optin_tower(model, tower, inputs[tower], chunk, max_tokens, seed)
            t_mean, e_mean = _mean(traj), _mean(emb)
            for view in transformer_blocks(model, [tower]):
                score = traj[view.key] / t_mean + lam * emb[view.key] / e_mean
                out["heads"][view.key] = score[:view.n_heads]
                out["neurons"][view.key] = score[view.n_heads:]
    finally:
        model.train(was_training)
    return out
