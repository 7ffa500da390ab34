"""Turn head/neuron masks into a physically smaller model, and record/rebuild that structure for save/load."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlkit.backbone.blocks import (
    BlockView,
    available_towers,
    block_map,
    kept_indices,
    spec_entries,
    transformer_blocks,
)
from vlkit.compress.masks import MaskDict, attention_core

SPEC_FORMAT = "vlkit-pruned"
SPEC_VERSION = 1
SPEC_ATTR = "vlkit_pruned_spec"  # read by vlkit.backbone.Backbone.pruned_spec()
RESIZED_ATTR = "vlkit_resized"  # a channel-pruned module's record (vlkit.compress.conv.prune_conv_channels)
_MLP_FLAG = "vlkit_pruned"


class PrunedAttention(nn.Module):
    """Multi-head attention with an inner width (heads * head_dim) independent of the model width.

    Keeps the parameter names of nn.MultiheadAttention / open_clip Attention (in_proj_weight, in_proj_bias,
    out_proj, ln_q, ln_k, logit_scale, head_scale) so state dicts keep their keys. ``mha_api`` selects the
    call convention of the block it replaces: ``attn(q, k, v, need_weights=..., attn_mask=...)`` returning a
    tuple (ResidualAttentionBlock) or ``attn(x, attn_mask=...)`` returning a tensor (Custom block)."""

    vlkit_native_masks = True  # attention_core reads head masks; masks.install_explicit needs no patch

    def __init__(self, width: int, kept_heads: Sequence[int], orig_heads: int, head_dim: int, *,
                 qkv_bias: bool = True, out_bias: bool = True, mha_api: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, qk_norm: tuple[nn.Module, nn.Module] | None = None,
                 scaled_cosine: bool = False, head_scale: bool = False, logit_scale_max: float = 4.6052) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.orig_heads = len(kept_heads), head_dim, orig_heads
        self.mha_api, self.batch_first, self.dropout = mha_api, batch_first, dropout
        self.logit_scale_max = logit_scale_max
        inner = self.num_heads * head_dim
        self.register_buffer("kept_heads", torch.as_tensor(list(kept_heads), dtype=torch.long), persistent=False)
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if qkv_bias else None
        self.out_proj = _linear(inner, width, bias=out_bias)
        self.ln_q, self.ln_k = qk_norm if qk_norm is not None else (None, None)
        self.logit_scale = nn.Parameter(torch.zeros(self.num_heads, 1, 1)) if scaled_cosine else None
        self.head_scale = nn.Parameter(torch.ones(self.num_heads, 1, 1)) if head_scale else None

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None, **_unused: Any):
        key = query if key is None else key
        value = query if value is None else value
        out = attention_core(self, query, key, value, attn_mask, getattr(self, "_vlkit_head_mask", None))
        return (out, None) if self.mha_api else out

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}/{self.orig_heads}, head_dim={self.head_dim}, mha_api={self.mha_api}"

    @classmethod
    def like(cls, attn: nn.Module, kept: Sequence[int]) -> PrunedAttention:
        """An empty PrunedAttention shaped like ``attn`` restricted to heads ``kept`` (indices into attn)."""
        if isinstance(getattr(attn, "ln_inner", None), nn.Module) and not isinstance(attn.ln_inner, nn.Identity):
            raise NotImplementedError("heads of attention with an inner LayerNorm (scale_attn_inner) are coupled "
                                      "by that norm and cannot be removed exactly")
        orig = int(getattr(attn, "orig_heads", attn.num_heads))
        prev = getattr(attn, "kept_heads", None)
        kept_orig = [int(prev[i]) for i in kept] if prev is not None else [int(i) for i in kept]
        is_mha = isinstance(attn, nn.MultiheadAttention) or bool(getattr(attn, "mha_api", False))
        ln_q, ln_k = getattr(attn, "ln_q", None), getattr(attn, "ln_k", None)
        drop = attn.dropout if isinstance(attn, (nn.MultiheadAttention, cls)) else attn.attn_drop.p
        return cls(int(attn.out_proj.out_features), kept_orig, orig, int(attn.head_dim),
                   qkv_bias=attn.in_proj_bias is not None, out_bias=attn.out_proj.bias is not None,
                   mha_api=is_mha, batch_first=bool(getattr(attn, "batch_first", True)), dropout=float(drop),
                   qk_norm=(copy.deepcopy(ln_q), copy.deepcopy(ln_k)) if ln_q is not None else None,
                   scaled_cosine=isinstance(getattr(attn, "logit_scale", None), torch.Tensor),
                   head_scale=isinstance(getattr(attn, "head_scale", None), torch.Tensor),
                   logit_scale_max=float(getattr(attn, "logit_scale_max", 4.6052)))


@torch.no_grad()
def _slice_attention(view: BlockView, kept: list[int]) -> PrunedAttention:
    attn = view.attn
    new = PrunedAttention.like(attn, kept).to(attn.in_proj_weight.device, attn.in_proj_weight.dtype)
    rows = torch.cat([view.head_rows(h) for h in kept]) if kept else torch.zeros(0, dtype=torch.long)
    rows = rows.view(len(kept), 3, -1).transpose(0, 1).flatten() if kept else rows  # q rows, k rows, v rows
    cols = torch.cat([view.head_cols(h) for h in kept]) if kept else rows
    new.in_proj_weight.copy_(view.qkv_weight()[rows])
    if new.in_proj_bias is not None:
        new.in_proj_bias.copy_(view.qkv_bias()[rows])
    new.out_proj.weight.copy_(view.out_weight()[:, cols])
    if new.out_proj.bias is not None:
        new.out_proj.bias.copy_(view.out_bias())
    idx = torch.as_tensor(kept, dtype=torch.long)
    for name in ("logit_scale", "head_scale"):
        if getattr(new, name) is not None:
            getattr(new, name).copy_(getattr(attn, name)[idx])
    return new


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    with warnings.catch_warnings():  # a fully pruned block has 0-sized weights; their init is a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=bias)


def _resized_linear(old: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    out_f = old.out_features if out_features is None else out_features
    in_f = old.in_features if in_features is None else in_features
    return _linear(in_f, out_f, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)


@torch.no_grad()
def _slice_mlp(view: BlockView, kept: list[int]) -> None:
    mlp = view.mlp
    if isinstance(getattr(mlp, "ln", None), nn.LayerNorm):
        raise NotImplementedError("MLP neurons behind an MLP LayerNorm (scale_fc) are coupled by that norm "
                                  "and cannot be removed exactly")
    idx = torch.as_tensor(kept, dtype=torch.long, device=mlp.c_fc.weight.device)
    fc, proj = _resized_linear(mlp.c_fc, out_features=len(kept)), _resized_linear(mlp.c_proj, in_features=len(kept))
    fc.weight.copy_(mlp.c_fc.weight[idx])
    if fc.bias is not None:
        fc.bias.copy_(mlp.c_fc.bias[idx])
    proj.weight.copy_(mlp.c_proj.weight[:, idx])
    if proj.bias is not None:
        proj.bias.copy_(mlp.c_proj.bias)
    mlp.c_fc, mlp.c_proj = fc, proj
    setattr(mlp, _MLP_FLAG, True)


def materialize(model: nn.Module, head_masks: MaskDict | None = None, neuron_masks: MaskDict | None = None,
                inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or model itself if ``inplace``) without the masked heads/neurons.

    Masks are binary ({0,1}), keyed (tower, block index); its outputs equal the masked model's. A block
    that loses every head keeps only out_proj's bias (what the masked model computes). The structure is
    recorded in ``model.vlkit_pruned_spec`` (see pruned_spec / rebuild_pruned)."""
    from vlkit.backbone.hf_blocks import is_hf_model, materialize_hf
    from vlkit.compress.masks import remove_masks

    out = model if inplace else copy.deepcopy(model)
    if is_hf_model(out):
        return materialize_hf(out, head_masks, neuron_masks)
    remove_masks(out)
    head_masks, neuron_masks = dict(head_masks or {}), dict(neuron_masks or {})
    views = block_map(out, sorted({k[0] for k in (*head_masks, *neuron_masks)}))
    for key in (*head_masks, *neuron_masks):
        if key not in views:
            raise KeyError(f"no block {key} to materialize")
    for key, view in views.items():
        heads = kept_indices(head_masks.get(key), view.n_heads, f"head {key}")
        if heads is not None:
            view.module.attn = _slice_attention(view, heads)
        neurons = kept_indices(neuron_masks.get(key), view.mlp_hidden, f"neuron {key}")
        if neurons is not None:
            _slice_mlp(view, neurons)
    refresh_spec(out)
    return out


def pruned_spec(model: nn.Module) -> dict[str, Any] | None:
    """The JSON-able pruned structure of ``model`` (None if nothing was pruned): kept heads (original
    indices) and MLP widths of every pruned block, plus any conv channel resizing."""
    blocks = []
    for view in transformer_blocks(model, available_towers(model)):
        pruned_attn = isinstance(view.attn, PrunedAttention)
        pruned_mlp = bool(getattr(view.mlp, _MLP_FLAG, False))
        if pruned_attn or pruned_mlp:
            blocks.append({
                "tower": view.tower, "index": view.index,
                "heads": view.attn.kept_heads.tolist() if pruned_attn else None,
                "mlp_hidden": view.mlp_hidden if pruned_mlp else None,
            })
    resized = collect_resized(model)
    if not blocks and not resized:
        return None
    spec: dict[str, Any] = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "blocks": blocks}
    if resized:
        spec["resized"] = resized
    return spec


@torch.no_grad()
def rebuild_pruned(model: nn.Module, spec: Mapping[str, Any] | None) -> nn.Module:
    """Reshape a freshly built model (in place) to ``spec`` so a pruned state dict loads strictly.

    Weights of the new modules are placeholders until load_state_dict."""
    if not spec:
        return model
    for view, entry in spec_entries(spec, block_map(model, available_towers(model)), SPEC_FORMAT, SPEC_VERSION):
        if entry.get("heads") is not None:
            view.module.attn = _placeholder_attention(view, entry["heads"])
        if entry.get("mlp_hidden") is not None:
            _slice_mlp(view, list(range(int(entry["mlp_hidden"]))))
    if spec.get("resized"):
        apply_resized(model, spec["resized"])
    refresh_spec(model)
    return model


def _placeholder_attention(view: BlockView, heads: Sequence[int]) -> PrunedAttention:
    if isinstance(view.attn, PrunedAttention):
        raise ValueError(f"block {view.key} is already pruned; rebuild_pruned expects a freshly built model")
    attn = view.attn
    return PrunedAttention.like(attn, list(heads)).to(attn.in_proj_weight.device, attn.in_proj_weight.dtype)


def collect_resized(model: nn.Module) -> dict[str, Any]:
    """All channel resizings recorded under ``model``, with names relative to ``model``."""
    params: dict[str, list[int]] = {}
    modules: dict[str, dict[str, Any]] = {}
    for prefix, mod in model.named_modules():
        rec = getattr(mod, RESIZED_ATTR, None)
        if not rec:
            continue
        pre = f"{prefix}." if prefix else ""
        params.update({pre + n: s for n, s in rec["params"].items()})
        modules.update({(pre + n).rstrip("."): a for n, a in rec["modules"].items()})
    return {"params": params, "modules": modules} if params or modules else {}


@torch.no_grad()
def apply_resized(model: nn.Module, resized: dict[str, Any]) -> None:
    """Reshape parameters/buffers and layer attributes of a fresh model to a recorded channel pruning."""
    for name, shape in resized.get("params", {}).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, leaf)
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner._buffers[leaf] = new
    for name, attrs in resized.get("modules", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    setattr(model, RESIZED_ATTR, dict(resized))  # so a reloaded model reports the same spec


def refresh_spec(model: nn.Module) -> dict[str, Any] | None:
    """Recompute ``model.vlkit_pruned_spec`` (what Backbone.save writes) after any structural change."""
    spec = pruned_spec(model)
    setattr(model, SPEC_ATTR, spec)
    return spec


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
