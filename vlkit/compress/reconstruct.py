"""Least-squares reconstruction after structured pruning: no training, a better start for recovery.

Removing heads and neurons leaves each block's attention and MLP computing a truncated sum: the kept units'
share of the dense output, with nothing standing in for the rest. The output projections that read the kept
units (attention's ``out_proj`` over the kept heads' outputs, the MLP's ``c_proj`` over the kept neurons) are
refit here by ridge least squares so that, on calibration tokens, each pruned module reproduces what the
unpruned module computes from the same input: the layer-wise reconstruction of post-training pruning
frameworks for transformers (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers",
NeurIPS 2022, tune the kept units' scales this way; here the whole projection and its bias are refit).

Blocks are refit in order along the *pruned* stream: block l sees the output of blocks < l as already pruned
and refit, so it learns to correct what reaches it rather than what the dense model would have passed on.
A projection over k kept units has k + 1 unknowns per output; with T calibration tokens the fit is
well posed for T >> k (a few hundred images or captions), and ``ridge`` (relative to the mean diagonal of
the Gram matrix) keeps it stable when it is not.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vlkit.backbone.blocks import tower_stages, transformer_blocks, valid_tokens
from vlkit.compress.masks import install_explicit, uninstall

__all__ = ["DenseBlocks", "reconstruct", "ridge_fit", "snapshot_blocks"]

Key = tuple[str, int]
DenseBlocks = dict[Key, nn.Module]


def snapshot_blocks(model: nn.Module, towers: Sequence[str]) -> DenseBlocks:
    """Frozen copies of every transformer block of ``towers``: the targets of ``reconstruct``. Take them before
    the model is pruned in place."""
    return {v.key: copy.deepcopy(v.module).eval().requires_grad_(False) for v in transformer_blocks(model, towers)}


def ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, k], bias [out]) minimising ||inputs @ weight.T + bias - targets||^2 + lam ||weight||^2 over
    rows ([T, k] inputs, [T, out] targets), lam = ``ridge`` x the mean diagonal of inputs' Gram matrix (the
    bias is not shrunk). Solved in float64; k = 0 gives the targets' mean as bias."""
    x, y = inputs.double(), targets.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y  # centring separates the bias from the (shrunk) weights
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean()) if gram.numel() else 0.0
    weight = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc).T
    bias = mean_y - weight @ mean_x
    return weight.to(inputs.dtype), bias.to(inputs.dtype)


def _rows(t: torch.Tensor, batch_first: bool, valid: torch.Tensor | None) -> torch.Tensor:
    """[tokens, features] of a block-internal activation, in batch-first order, padding positions dropped."""
    t = t if batch_first else t.transpose(0, 1)
    if valid is not None:
        t = t[valid[:, : t.shape[1]].to(t.device)]
    return t.flatten(0, -2)


class _Capture:
    """Activations seen by forward (pre-)hooks on a few modules during one call."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def before(self, name: str, module: nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, a: self.seen.__setitem__(name, a[0])))

    def after(self, name: str, module: nn.Module) -> None:
        def keep(m, a, out):
            self.seen[name] = out[0] if isinstance(out, tuple) else out
        self.handles.append(module.register_forward_hook(keep))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.copy_(weight.to(linear.weight))
    if linear.bias is None:
        raise NotImplementedError("reconstruction refits the projection's bias; this one has none")
    linear.bias.copy_(bias.to(linear.bias))


def _rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def reconstruct(model: nn.Module, dense: Mapping[Key, nn.Module], inputs: Mapping[str, torch.Tensor], *,
                ridge: float = 1e-2) -> dict[str, list[dict]]:
    """Refit, in place, the output projections of every pruned attention and MLP of ``model`` (an open_clip
    model after ``materialize``) to the unpruned blocks ``dense`` (``snapshot_blocks`` of the model before
    pruning), on calibration ``inputs`` per tower ({"image": [B, 3, S, S], "text": [B, L]}). Returns, per tower,
    each refit module's relative squared error to its target before and after."""
    was_training = model.training
    model.eval()
    report: dict[str, list[dict]] = {}
    try:
        for tower, batch in inputs.items():
            stages = tower_stages(model, tower)
            x, attn_mask = stages.embed(batch)
            valid = valid_tokens(tower, batch, x.shape[1])
            report[tower] = []
            for view in transformer_blocks(model, [tower]):
                ref = dense[view.key]
                if view.n_heads < ref.attn.num_heads:
                    report[tower].append(_refit_attention(stages, view, ref, x, attn_mask, valid, ridge))
                if view.mlp_hidden < ref.mlp.c_fc.out_features:
                    report[tower].append(_refit_mlp(stages, view, ref, x, attn_mask, valid, ridge))
                x, _ = stages.run_blocks(x, attn_mask, start=view.index, stop=view.index + 1)
    finally:
        model.train(was_training)
    return report


def _run_both(stages, view, ref: nn.Module, x, attn_mask, watch, dense: bool = True) -> tuple[_Capture, _Capture]:
    """One forward of the pruned block (and of its dense copy when ``dense``) on the same input, with hooks set
    by ``watch``."""
    mine, theirs = _Capture(), _Capture()
    watch(mine, theirs)
    try:
        stages.run_blocks(x, attn_mask, start=view.index, stop=view.index + 1)
        if dense:
            ref(x if stages.batch_first else x.transpose(0, 1), attn_mask=attn_mask)
    finally:
        mine.close()
        theirs.close()
    return mine, theirs


def _refit_attention(stages, view, ref, x, attn_mask, valid, ridge) -> dict:
    """out_proj over the kept heads' outputs := least squares to the dense attention's output."""
    preinstalled = bool(getattr(view.attn, "_vlkit_explicit", False))
    install_explicit(view)  # the explicit path calls out_proj as a module: its input is the heads' outputs
    try:
        mine, theirs = _run_both(stages, view, ref, x, attn_mask, lambda m, t: (
            m.before("heads", view.attn.out_proj), m.after("out", view.attn), t.after("out", ref.attn)))
    finally:
        if not preinstalled:
            uninstall(view.attn)
            uninstall(view.mlp)
    target = _rows(theirs.seen["out"], view.batch_first, valid)
    before = _rows(mine.seen["out"], view.batch_first, valid)
    if "heads" in mine.seen:
        heads = _rows(mine.seen["heads"], view.batch_first, valid)
    else:  # every head removed: out_proj is never called and only its bias remains
        heads = target.new_zeros(len(target), 0)
    weight, bias = ridge_fit(heads, target, ridge)
    if heads.shape[1]:
        _set(view.attn.out_proj, weight, bias)
    else:
        view.attn.out_proj.bias.copy_(bias.to(view.attn.out_proj.bias))
    after = heads @ weight.T + bias
    return {"block": view.index, "module": "attention", "kept": view.n_heads,
            "err_before": _rel_err(before, target), "err_after": _rel_err(after, target)}


def _refit_mlp(stages, view, ref, x, attn_mask, valid, ridge) -> dict:
    """c_proj over the kept neurons := least squares to the dense MLP's output on the same input."""
    mine, _ = _run_both(stages, view, ref, x, attn_mask, lambda m, t: (
        m.before("in", view.mlp), m.before("hidden", view.mlp.c_proj), m.after("out", view.mlp)), dense=False)
    # the target: the dense MLP on the input the pruned block's MLP saw (after the attention refit above)
    target = _rows(ref.mlp(mine.seen["in"]), view.batch_first, valid)
    hidden = _rows(mine.seen["hidden"], view.batch_first, valid)
    before = _rows(mine.seen["out"], view.batch_first, valid)
    weight, bias = ridge_fit(hidden, target, ridge)
    _set(view.mlp.c_proj, weight, bias)
    return {"block": view.index, "module": "mlp", "kept": view.mlp_hidden,
            "err_before": _rel_err(before, target), "err_after": _rel_err(hidden @ weight.T + bias, target)}
