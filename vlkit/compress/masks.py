"""Per-head and per-neuron masks on open_clip blocks through an explicit, mask-aware attention path."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone.blocks import BlockView, available_towers, block_map, transformer_blocks
from vlkit.backbone.hf_blocks import apply_hf_masks, hf_blocks, hf_masked, is_hf_model, remove_hf_masks

Key = tuple[str, int]
MaskDict = Mapping[Key, torch.Tensor]

_FLAG = "_vlkit_explicit"
_HEAD_MASK = "_vlkit_head_mask"
_NEURON_MASK = "_vlkit_neuron_mask"
_HOOK = "_vlkit_neuron_hook"


def _per_sample(mask: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A [units] or [batch, units] mask as [batch|1, units] on like's device/dtype."""
    mask = mask.to(device=like.device, dtype=like.dtype)
    if mask.ndim == 1:
        return mask.unsqueeze(0)
    if mask.ndim != 2 or mask.shape[0] != n:
        raise ValueError(f"a per-sample mask must be [batch={n}, units], got {tuple(mask.shape)}")
    return mask


def _additive_mask(attn_mask: torch.Tensor, m: nn.Module, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Bool (True = blocked) or float masks, [L, S] or [N*heads, L, S], as an additive [.., L, S] tensor."""
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    else:
        attn_mask = attn_mask.to(dtype)
    if attn_mask.ndim == 3:
        # masks are built for the original head count; a pruned module keeps only its heads' slices
        orig = int(getattr(m, "orig_heads", m.num_heads))
        attn_mask = attn_mask.reshape(n, orig, *attn_mask.shape[-2:])
        kept = getattr(m, "kept_heads", None)
        if kept is not None and orig != m.num_heads:
            attn_mask = attn_mask.index_select(1, kept.to(attn_mask.device))
    return attn_mask


def _project_qkv(m: nn.Module, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w, b = m.in_proj_weight, m.in_proj_bias
    if key is query and value is query:
        return F.linear(query, w, b).chunk(3, dim=-1)
    ws, bs = w.chunk(3), (b.chunk(3) if b is not None else (None, None, None))
    return F.linear(query, ws[0], bs[0]), F.linear(key, ws[1], bs[1]), F.linear(value, ws[2], bs[2])


def _dropout_p(m: nn.Module) -> float:
    p = getattr(m, "dropout", 0.0)
    if isinstance(p, nn.Module):
        p = getattr(p, "p", 0.0)
    drop = getattr(m, "attn_drop", None)
    return float(drop.p) if isinstance(drop, nn.Dropout) else float(p)


def _scores(m: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    logit_scale = getattr(m, "logit_scale", None)
    if isinstance(logit_scale, torch.Tensor):  # scaled cosine attention (Swin v2), per head
        scale = torch.clamp(logit_scale, max=float(m.logit_scale_max)).exp()
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * scale
    ln_q, ln_k = getattr(m, "ln_q", None), getattr(m, "ln_k", None)
    q = ln_q(q) if ln_q is not None else q
    k = ln_k(k) if ln_k is not None else k
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)


def attention_core(m: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit multi-head attention of an nn.MultiheadAttention / open_clip Attention / PrunedAttention.

    Every matmul is a plain matmul (visible to FlopCounterMode) and each head's output is multiplied by
    ``head_mask`` ([heads] or [batch, heads]) before out_proj."""
    bf = bool(getattr(m, "batch_first", True))
    if not bf:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, _ = query.shape
    heads = int(m.num_heads)
    if heads == 0:  # a fully pruned block: only out_proj's bias survives, as in the masked model
        out = query.new_zeros(n, length, m.out_proj.out_features)
        out = out + m.out_proj.bias if m.out_proj.bias is not None else out
        return out if bf else out.transpose(0, 1)
    q, k, v = (t.reshape(n, t.shape[1], heads, -1).transpose(1, 2) for t in _project_qkv(m, query, key, value))
    scores = _scores(m, q, k)
    if attn_mask is not None:
        scores = scores + _additive_mask(attn_mask, m, n, scores.dtype)
    probs = scores.softmax(dim=-1)
    if m.training and _dropout_p(m) > 0:
        probs = F.dropout(probs, p=_dropout_p(m))
    out = probs @ v  # [n, heads, length, head_dim]: the per-head outputs
    head_scale = getattr(m, "head_scale", None)
    if isinstance(head_scale, torch.Tensor):
        out = out * head_scale
    if head_mask is not None:
        out = out * _per_sample(head_mask, n, out)[:, :, None, None]
    out = out.transpose(1, 2).reshape(n, length, -1)
    ln_inner = getattr(m, "ln_inner", None)
    out = m.out_proj(ln_inner(out) if ln_inner is not None else out)
    return out if bf else out.transpose(0, 1)


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
    if key_padding_mask is not None:
        raise NotImplementedError("vlkit's explicit attention does not take key_padding_mask (open_clip never passes it)")
    return attention_core(self, query, key, value, attn_mask, getattr(self, _HEAD_MASK, None)), None


def _custom_forward(self, x, attn_mask=None):
    return attention_core(self, x, x, x, attn_mask, getattr(self, _HEAD_MASK, None))


def _neuron_hook(mlp: nn.Module):
    def hook(_mod, _inp, out):
        mask = getattr(mlp, _NEURON_MASK, None)
        if mask is None:
            return out
        bf = getattr(mlp, "_vlkit_batch_first", True)
        n = out.shape[0] if bf else out.shape[1]
        mask = _per_sample(mask, n, out)
        return out * (mask[:, None, :] if bf else mask[None, :, :])
    return hook


def install_explicit(view: BlockView) -> None:
    """Route the block's attention through attention_core and hook its MLP activation (idempotent)."""
    attn, mlp = view.attn, view.mlp
    if not getattr(attn, _FLAG, False):
        if isinstance(attn, nn.MultiheadAttention):
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise NotImplementedError("only self-attention nn.MultiheadAttention without bias_k/zero-attn")
            attn.forward = types.MethodType(_mha_forward, attn)
        elif not getattr(attn, "vlkit_native_masks", False):  # open_clip Attention
            attn.forward = types.MethodType(_custom_forward, attn)
        setattr(attn, _FLAG, True)
    if getattr(mlp, _HOOK, None) is None:
        act = getattr(mlp, "gelu", None)
        if act is None:
            raise NotImplementedError("neuron masks need the block's MLP activation module at mlp.gelu")
        mlp._vlkit_batch_first = view.batch_first
        setattr(mlp, _HOOK, act.register_forward_hook(_neuron_hook(mlp)))


def set_masks(view: BlockView, head_mask: torch.Tensor | None = None,
              neuron_mask: torch.Tensor | None = None) -> None:
    """Set (or clear with None) the masks of one installed block; [units] or per-sample [batch, units]."""
    if head_mask is not None and head_mask.shape[-1] != view.n_heads:
        raise ValueError(f"{view.key}: head mask has {head_mask.shape[-1]} entries, block has {view.n_heads} heads")
    if neuron_mask is not None and neuron_mask.shape[-1] != view.mlp_hidden:
        raise ValueError(f"{view.key}: neuron mask has {neuron_mask.shape[-1]} entries, MLP has {view.mlp_hidden}")
    setattr(view.attn, _HEAD_MASK, head_mask)
    setattr(view.mlp, _NEURON_MASK, neuron_mask)


def uninstall(module: nn.Module) -> None:
    """Undo install_explicit / set_masks on one module (attention or MLP); other modules are untouched."""
    if module.__dict__.get(_FLAG, False):
        module.__dict__.pop("forward", None)
    for attr in (_FLAG, _HEAD_MASK, _NEURON_MASK, "_vlkit_batch_first"):
        module.__dict__.pop(attr, None)
    hook = module.__dict__.pop(_HOOK, None)
    if hook is not None:
        hook.remove()


def remove_masks(model: nn.Module) -> None:
    """Restore every block's original forward and drop all masks and hooks."""
    if is_hf_model(model):
        remove_hf_masks(model)
        return
    for module in model.modules():
        uninstall(module)


def apply_masks(model: nn.Module, head_masks: MaskDict | None = None, neuron_masks: MaskDict | None = None,
                all_blocks: bool = False) -> list[BlockView]:
    """Install masks keyed by (tower, block index): head mask [n_heads], neuron mask [mlp_hidden].

    Values multiply the unit's output (0 = removed); ``all_blocks`` also routes unmasked blocks through
    the explicit path (what FLOP counting and export use). Returns the installed views."""
    if is_hf_model(model):  # a transformers MLLM: masks through pre-hooks (vlkit.backbone.hf_blocks)
        return apply_hf_masks(model, head_masks, neuron_masks)
    head_masks, neuron_masks = dict(head_masks or {}), dict(neuron_masks or {})
    keys = [*head_masks, *neuron_masks]
    views = transformer_blocks(model, available_towers(model) if all_blocks else sorted({k[0] for k in keys}))
    known = {v.key for v in views}
    for key in keys:
        if key not in known:
            raise KeyError(f"no block {key}; blocks are keyed (tower, index) with tower in image/text")
    installed = []
    for view in views:
        if all_blocks or view.key in head_masks or view.key in neuron_masks:
            install_explicit(view)
            set_masks(view, head_masks.get(view.key), neuron_masks.get(view.key))
            installed.append(view)
    return installed


@contextlib.contextmanager
def masked(model: nn.Module, head_masks: MaskDict | None = None, neuron_masks: MaskDict | None = None,
           all_blocks: bool = False) -> Iterator[nn.Module]:
    """``with masked(model, heads, neurons): ...`` applies masks and removes them on exit."""
    if is_hf_model(model):
        with hf_masked(model, head_masks, neuron_masks):
            yield model
        return
    views = apply_masks(model, head_masks, neuron_masks, all_blocks)
    try:
        yield model
    finally:
        for view in views:
            uninstall(view.attn)
            uninstall(view.mlp)


def full_masks(model: nn.Module, towers: Sequence[str] | None = None) -> tuple[dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
    """All-ones head and neuron masks for every block (a starting point for editing)."""
    views = hf_blocks(model, towers) if is_hf_model(model) else block_map(model, towers).values()
    return ({v.key: torch.ones(v.n_heads) for v in views}, {v.key: torch.ones(v.mlp_hidden) for v in views})
