"""Heads and MLP neurons of a transformers LLaVA-style model (Llama-family language model, CLIP vision
tower): a uniform block view, masks through forward pre-hooks, and materialisation into a narrower model.

Blocks are keyed like the CLIP ones: ``("text", i)`` is layer i of the language model, ``("image", i)`` layer
i of the vision tower. A head mask multiplies each head's slice of the attention output before the output
projection; a neuron mask multiplies the MLP's hidden activations before its down projection. Removing a
head (``materialize_hf``) drops its query/key/value rows and output-projection columns, so the narrower
model computes exactly what the masked one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlkit.backbone.blocks import kept_indices, spec_entries

Key = tuple[str, int]
SPEC_FORMAT = "vlkit-pruned-hf"
SPEC_VERSION = 1
SPEC_ATTR = "vlkit_pruned_spec"
TOWERS = ("image", "text")
_KEPT = "_vlkit_kept_heads"
_HOOKS = "_vlkit_mask_hooks"


def _layers(model: nn.Module, tower: str) -> Sequence[nn.Module]:
    inner = model.model
    if tower == "text":
        lm = inner.language_model
        return lm.layers
    vt = inner.vision_tower
    enc = getattr(getattr(vt, "vision_model", vt), "encoder", None)
    if enc is None or not hasattr(enc, "layers"):
        raise NotImplementedError(f"the vision tower {type(vt).__name__} has no encoder.layers to view")
    return enc.layers


@dataclass(eq=False)
class HFBlockView:
    """One decoder/encoder layer; sizes are read live from the modules, so they follow pruning."""

    tower: str
    index: int
    module: nn.Module
    batch_first: bool = True

    @property
    def key(self) -> Key:
        return (self.tower, self.index)

    @property
    def attn(self) -> nn.Module:
        return self.module.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.module.mlp

    @property
    def out_proj(self) -> nn.Linear:
        a = self.attn
        return a.o_proj if hasattr(a, "o_proj") else a.out_proj

    @property
    def qkv(self) -> list[nn.Linear]:
        return [self.attn.q_proj, self.attn.k_proj, self.attn.v_proj]

    @property
    def head_dim(self) -> int:
        return int(self.attn.head_dim)

    @property
    def n_heads(self) -> int:
        return int(self.attn.q_proj.out_features) // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return int(self.attn.k_proj.out_features) // self.head_dim

    @property
    def width(self) -> int:
        return int(self.out_proj.out_features)

    @property
    def up(self) -> list[nn.Linear]:
        """The layers whose output rows are the MLP neurons (gate and up, or fc1)."""
        m = self.mlp
        return [m.gate_proj, m.up_proj] if hasattr(m, "gate_proj") else [m.fc1]

    @property
    def down(self) -> nn.Linear:
        m = self.mlp
        return m.down_proj if hasattr(m, "down_proj") else m.fc2

    @property
    def mlp_hidden(self) -> int:
        return int(self.down.in_features)


def is_hf_model(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    return hasattr(inner, "language_model") and hasattr(inner, "vision_tower")


def hf_blocks(model: nn.Module, towers: Sequence[str] | None = None) -> list[HFBlockView]:
    towers = TOWERS if towers is None else tuple(towers)
    out: list[HFBlockView] = []
    for tower in towers:
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
        out += [HFBlockView(tower, i, layer) for i, layer in enumerate(_layers(model, tower))]
    return out


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[units] or [batch, units] as a tensor broadcastable over like's [batch, length, units]."""
    mask = mask.to(device=like.device, dtype=like.dtype)
    if mask.ndim == 1:
        return mask[None, None, :]
    if mask.ndim != 2 or mask.shape[0] != like.shape[0]:
        raise ValueError(f"a per-sample mask must be [batch={like.shape[0]}, units], got {tuple(mask.shape)}")
    return mask[:, None, :]


def _head_hook(mask: torch.Tensor, head_dim: int):
    def hook(_module, args):
        x = args[0]
        m = _per_sample(mask, x).repeat_interleave(head_dim, dim=-1)
        return (x * m, *args[1:])
    return hook


def _neuron_hook(mask: torch.Tensor):
    def hook(_module, args):
        return (args[0] * _per_sample(mask, args[0]), *args[1:])
    return hook


def _remove(view: HFBlockView) -> None:
    for mod in (view.out_proj, view.down):
        for h in mod.__dict__.pop(_HOOKS, []):
            h.remove()


def apply_hf_masks(model: nn.Module, head_masks: Mapping[Key, torch.Tensor] | None = None,
                   neuron_masks: Mapping[Key, torch.Tensor] | None = None) -> list[HFBlockView]:
    """Install masks keyed (tower, layer index): head masks [n_heads] (or [batch, n_heads]), neuron masks
    [mlp_hidden]; 0 removes the unit. Replaces masks set earlier on the same layers."""
    head_masks, neuron_masks = dict(head_masks or {}), dict(neuron_masks or {})
    views = {v.key: v for v in hf_blocks(model, sorted({k[0] for k in (*head_masks, *neuron_masks)}))}
    for key in (*head_masks, *neuron_masks):
        if key not in views:
            raise KeyError(f"no block {key}; blocks are keyed (tower, index) with tower in image/text")
    installed = []
    for key, view in views.items():
        if key not in head_masks and key not in neuron_masks:
            continue
        _remove(view)
        if key in head_masks:
            mask = torch.as_tensor(head_masks[key])
            if mask.shape[-1] != view.n_heads:
                raise ValueError(f"{key}: head mask has {mask.shape[-1]} entries, the layer has {view.n_heads} heads")
            view.out_proj.__dict__.setdefault(_HOOKS, []).append(
                view.out_proj.register_forward_pre_hook(_head_hook(mask, view.head_dim)))
        if key in neuron_masks:
            mask = torch.as_tensor(neuron_masks[key])
            if mask.shape[-1] != view.mlp_hidden:
                raise ValueError(f"{key}: neuron mask has {mask.shape[-1]} entries, the MLP has {view.mlp_hidden}")
            view.down.__dict__.setdefault(_HOOKS, []).append(view.down.register_forward_pre_hook(_neuron_hook(mask)))
        installed.append(view)
    return installed


def remove_hf_masks(model: nn.Module) -> None:
    for view in hf_blocks(model):
        _remove(view)


@contextlib.contextmanager
def hf_masked(model: nn.Module, head_masks: Mapping[Key, torch.Tensor] | None = None,
              neuron_masks: Mapping[Key, torch.Tensor] | None = None) -> Iterator[nn.Module]:
    views = apply_hf_masks(model, head_masks, neuron_masks)
    try:
        yield model
    finally:
        for view in views:
            _remove(view)


# ---- materialisation ---------------------------------------------------------------------------
def _sliced(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    return new


def _unit_rows(units: Sequence[int], size: int) -> torch.Tensor:
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


class EmptyAttention(nn.Module):
    """The attention of a layer that lost every head: zero-width projections (so the block view and the
    FLOP model still read it), and only the output projection's bias reaches the output."""

    def __init__(self, width: int, head_dim: int, out_name: str, bias: torch.Tensor | None) -> None:
        import warnings

        super().__init__()
        self.head_dim, self.out_name = head_dim, out_name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, 0, bias=False) for _ in range(3))
            setattr(self, out_name, nn.Linear(0, width, bias=bias is not None))
        if bias is not None:
            with torch.no_grad():
                getattr(self, out_name).bias.copy_(bias)
        self.register_buffer(_KEPT, torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = getattr(self, self.out_name)
        zeros = hidden_states.new_zeros(*hidden_states.shape[:-1], out.out_features)
        return (zeros + out.bias if out.bias is not None else zeros), None


def _slice_heads(view: HFBlockView, kept: list[int]) -> None:
    if view.n_kv_heads != view.n_heads:
        raise NotImplementedError(f"{view.key}: heads of grouped-query attention share keys and values "
                                  f"({view.n_heads} query heads, {view.n_kv_heads} key/value heads); only "
                                  "layers with as many key/value heads as query heads can lose single heads")
    attn, hd = view.attn, view.head_dim
    prev = getattr(attn, _KEPT, None)
    orig = [int(prev[i]) for i in kept] if prev is not None else list(kept)
    if not kept:
        out = view.out_proj
        name = "o_proj" if hasattr(attn, "o_proj") else "out_proj"
        view.module.self_attn = EmptyAttention(out.out_features, hd, name, out.bias).to(out.weight.device,
                                                                                       out.weight.dtype)
        return
    rows = _unit_rows(kept, hd).to(attn.q_proj.weight.device)
    attn.q_proj, attn.k_proj, attn.v_proj = (_sliced(p, rows=rows) for p in view.qkv)
    name = "o_proj" if hasattr(attn, "o_proj") else "out_proj"
    setattr(attn, name, _sliced(getattr(attn, name), cols=rows))
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(kept)
    attn.register_buffer(_KEPT, torch.as_tensor(orig, dtype=torch.long), persistent=False)


def _slice_neurons(view: HFBlockView, kept: list[int]) -> None:
    idx = torch.as_tensor(kept, dtype=torch.long, device=view.down.weight.device)
    m = view.mlp
    if hasattr(m, "gate_proj"):
        m.gate_proj, m.up_proj = _sliced(m.gate_proj, rows=idx), _sliced(m.up_proj, rows=idx)
        m.down_proj = _sliced(m.down_proj, cols=idx)
    else:
        m.fc1, m.fc2 = _sliced(m.fc1, rows=idx), _sliced(m.fc2, cols=idx)
    m._vlkit_pruned = True


@torch.no_grad()
def materialize_hf(model: nn.Module, head_masks: Mapping[Key, Any] | None = None,
                   neuron_masks: Mapping[Key, Any] | None = None) -> nn.Module:
    """Remove the masked heads and neurons from ``model`` in place (binary masks keyed like apply_hf_masks);
    the structure is recorded in ``model.vlkit_pruned_spec`` for saving."""
    remove_hf_masks(model)
    head_masks, neuron_masks = dict(head_masks or {}), dict(neuron_masks or {})
    views = {v.key: v for v in hf_blocks(model)}
    for key in (*head_masks, *neuron_masks):
        if key not in views:
            raise KeyError(f"no block {key} to materialize")
    for key, view in views.items():
        heads = kept_indices(head_masks.get(key), view.n_heads, f"head {key}") if view.n_heads else None
        if heads is not None:
            _slice_heads(view, heads)
        neurons = kept_indices(neuron_masks.get(key), view.mlp_hidden, f"neuron {key}")
        if neurons is not None:
            _slice_neurons(view, neurons)
    setattr(model, SPEC_ATTR, hf_pruned_spec(model))
    return model


def hf_pruned_spec(model: nn.Module) -> dict[str, Any] | None:
    blocks = []
    for view in hf_blocks(model):
        kept = getattr(view.attn, _KEPT, None)
        pruned_mlp = bool(getattr(view.mlp, "_vlkit_pruned", False))
        if kept is not None or pruned_mlp:
            blocks.append({"tower": view.tower, "index": view.index,
                           "heads": kept.tolist() if kept is not None else None,
                           "mlp_hidden": view.mlp_hidden if pruned_mlp else None})
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "blocks": blocks} if blocks else None


@torch.no_grad()
def rebuild_pruned_hf(model: nn.Module, spec: Mapping[str, Any] | None) -> nn.Module:
    """Reshape a freshly built model to ``spec`` so the pruned weights load strictly."""
    if not spec:
        return model
    for view, entry in spec_entries(spec, {v.key: v for v in hf_blocks(model)}, SPEC_FORMAT, SPEC_VERSION):
        if entry.get("heads") is not None:
            _slice_heads(view, list(entry["heads"]))  # placeholders: the heads' weights load next
        if entry.get("mlp_hidden") is not None:
            _slice_neurons(view, list(range(int(entry["mlp_hidden"]))))
    setattr(model, SPEC_ATTR, hf_pruned_spec(model))
    return model
