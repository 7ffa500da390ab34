"""A uniform view of the transformer blocks (heads, MLP neurons, weights) of open_clip's image and text towers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

TOWERS = ("image", "text")
SUPPORTED = (
    "open_clip VisionTransformer image towers and open_clip TextTransformer / built-in CLIP text towers, "
    "with ResidualAttentionBlock (nn.MultiheadAttention) or CustomResidualAttentionBlock (open_clip Attention)"
)


@dataclass(eq=False)
class BlockView:
    """One residual attention block; sizes are read live from the module, so they follow pruning."""

    tower: str
    index: int
    module: nn.Module
    batch_first: bool = True

    @property
    def key(self) -> tuple[str, int]:
        return (self.tower, self.index)

    @property
    def attn(self) -> nn.Module:
        return self.module.attn

    @property
    def mlp(self) -> nn.Sequential:
        return self.module.mlp

    @property
    def n_heads(self) -> int:
        return int(self.attn.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.attn.head_dim)

    @property
    def width(self) -> int:
        return int(self.attn.out_proj.out_features)

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp.c_fc.out_features)

    # ---- weights (views of the live parameters, not copies) ---------------------------------
    def qkv_weight(self) -> torch.Tensor:
        """[3 * n_heads * head_dim, width]: q rows, then k rows, then v rows; head h owns rows h*hd:(h+1)*hd."""
        return self.attn.in_proj_weight

    def qkv_bias(self) -> torch.Tensor | None:
        return self.attn.in_proj_bias

    def out_weight(self) -> torch.Tensor:
        """[width, n_heads * head_dim]: head h owns columns h*hd:(h+1)*hd."""
        return self.attn.out_proj.weight

    def out_bias(self) -> torch.Tensor | None:
        return self.attn.out_proj.bias

    def fc_weight(self) -> torch.Tensor:
        """[mlp_hidden, width]: neuron n owns row n."""
        return self.mlp.c_fc.weight

    def fc_bias(self) -> torch.Tensor | None:
        return self.mlp.c_fc.bias

    def proj_weight(self) -> torch.Tensor:
        """[width, mlp_hidden]: neuron n owns column n."""
        return self.mlp.c_proj.weight

    def proj_bias(self) -> torch.Tensor | None:
        return self.mlp.c_proj.bias

    def head_rows(self, head: int) -> torch.Tensor:
        """Row indices of head ``head`` in qkv_weight (its q, k and v slices)."""
        inner, hd = self.n_heads * self.head_dim, self.head_dim
        base = torch.arange(head * hd, (head + 1) * hd)
        return torch.cat([base, base + inner, base + 2 * inner])

    def head_cols(self, head: int) -> torch.Tensor:
        """Column indices of head ``head`` in out_weight."""
        return torch.arange(head * self.head_dim, (head + 1) * self.head_dim)


def kept_indices(mask: torch.Tensor | None, n: int, what: str) -> list[int] | None:
    """Kept indices of a binary unit mask with ``n`` entries, or None when everything is kept."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask).detach().flatten().float().cpu()
    if mask.numel() != n or not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{what} mask must be binary with {n} entries (got {mask.numel()} entries)")
    kept = mask.nonzero().flatten().tolist()
    return None if len(kept) == n else kept


def spec_entries(spec: dict, views: dict, fmt: str, version: int):
    """(view, entry) for every block a pruned-structure spec names, after checking its format and version."""
    if spec.get("format") != fmt or int(spec.get("version", 0)) > version:
        raise ValueError(f"not a {fmt} spec this version can read: {dict(spec)!r:.200}")
    for entry in spec.get("blocks", []):
        key = (entry["tower"], int(entry["index"]))
        if key not in views:
            raise KeyError(f"spec names block {key}, which this model does not have")
        yield views[key], entry


def text_root(model: nn.Module) -> nn.Module | None:
    """The module that owns the text transformer: CLIP keeps it flat, CustomTextCLIP under ``.text``."""
    text = getattr(model, "text", None)
    if text is not None:
        return text if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks") else None
    tr = getattr(model, "transformer", None)
    return model if tr is not None and hasattr(tr, "resblocks") and hasattr(model, "token_embedding") else None


def _transformer(model: nn.Module, tower: str) -> nn.Module | None:
    if tower == "image":
        visual = getattr(model, "visual", None)
        tr = getattr(visual, "transformer", None)
        return tr if tr is not None and hasattr(tr, "resblocks") else None
    root = text_root(model)
    return None if root is None else root.transformer


def _is_viewable_block(block: nn.Module) -> bool:
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (attn is not None and hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj")
            and mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"))


def _tower_kind(model: nn.Module, tower: str) -> str:
    part = getattr(model, "visual", None) if tower == "image" else getattr(model, "text", model)
    return type(part).__name__ if part is not None else "missing"


def available_towers(model: nn.Module) -> tuple[str, ...]:
    """The towers of ``model`` that transformer_blocks can view."""
    out = []
    for tower in TOWERS:
        tr = _transformer(model, tower)
        if tr is not None and all(_is_viewable_block(b) for b in tr.resblocks):
            out.append(tower)
    return tuple(out)


def transformer_blocks(model: nn.Module, towers: Sequence[str] | None = None) -> list[BlockView]:
    """Views of every residual attention block of the requested towers (default: image and text).

    Raises NotImplementedError for a tower that is not an open_clip transformer (ResNet, timm, HF text)."""
    towers = TOWERS if towers is None else tuple(towers)
    views: list[BlockView] = []
    for tower in towers:
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
        tr = _transformer(model, tower)
        if tr is None or not all(_is_viewable_block(b) for b in tr.resblocks):
            raise NotImplementedError(
                f"the {tower} tower ({_tower_kind(model, tower)}) has no open_clip transformer blocks to view; "
                f"supported: {SUPPORTED}. Pass towers={available_towers(model)} to use the others; "
                "convolutional towers support vlkit.compress.sparsity and prune.prune_conv_channels."
            )
        bf = bool(getattr(tr, "batch_first", True))
        views += [BlockView(tower, i, blk, bf) for i, blk in enumerate(tr.resblocks)]
    return views


def block_map(model: nn.Module, towers: Sequence[str] | None = None) -> dict[tuple[str, int], BlockView]:
    return {v.key: v for v in transformer_blocks(model, towers)}


@dataclass(eq=False)
class TowerStages:
    """A tower split into embed -> blocks -> head, so a forward can start at any block (used by OPTIN)."""

    tower: str
    embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    blocks: Sequence[nn.Module]
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_first: bool = True

    def run_blocks(self, x: torch.Tensor, attn_mask: torch.Tensor | None, start: int = 0,
                   stop: int | None = None, collect: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks[start:stop] on batch-first x; also return every block's output when ``collect``."""
        outs: list[torch.Tensor] = []
        h = x if self.batch_first else x.transpose(0, 1)
        for blk in self.blocks[start:stop]:
            h = blk(h, attn_mask=attn_mask)
            if collect:
                outs.append(h if self.batch_first else h.transpose(0, 1))
        return (h if self.batch_first else h.transpose(0, 1)), outs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, mask = self.embed(inputs)
        x, _ = self.run_blocks(x, mask)
        return self.head(x, inputs)


def _image_stages(model: nn.Module) -> TowerStages:
    visual = model.visual
    if not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
        raise NotImplementedError("image tower stages need open_clip>=3.0 (VisionTransformer._embeds/_pool)")

    def head(x: torch.Tensor, _inputs: torch.Tensor) -> torch.Tensor:
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    tr = visual.transformer
    return TowerStages("image", lambda img: (visual._embeds(img), None), tr.resblocks, head,
                       bool(getattr(tr, "batch_first", True)))


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


def _clip_text_stages(model: nn.Module) -> TowerStages:
    from open_clip.transformer import text_global_pool

    def embed(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast) + model.positional_embedding.to(cast)
        return x, model.attn_mask

    def head(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = model.ln_final(x)
        x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        return _project(x, model.text_projection)

    tr = model.transformer
    return TowerStages("text", embed, tr.resblocks, head, bool(getattr(tr, "batch_first", True)))


def _custom_text_stages(text_tower: nn.Module) -> TowerStages:
    from open_clip.transformer import text_global_pool

    def head(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if text_tower.cls_emb is not None:  # CoCa-style appended class token: pool the last token
            pooled = text_tower.ln_final(text_global_pool(x, pool_type="last"))
        else:
            x = text_tower.ln_final(x)
            pooled = text_global_pool(x, text, pool_type=text_tower.pool_type,
                                      eos_token_id=getattr(text_tower, "eos_id", None))
        return _project(pooled, text_tower.text_projection)

    tr = text_tower.transformer
    return TowerStages("text", text_tower._embeds, tr.resblocks, head, bool(getattr(tr, "batch_first", True)))


def valid_tokens(tower: str, inputs: torch.Tensor, length: int) -> torch.Tensor | None:
    """[batch, length] bool: the token positions of a tower's block activations that carry content, or None
    when all do. Text read by argmax (end-token) pooling: positions after each caption's end token are padding."""
    if tower != "text" or inputs.shape[-1] != length:
        return None
    eot = inputs.argmax(dim=-1).cpu()
    return torch.arange(length)[None, :] <= eot[:, None]


def tower_stages(model: nn.Module, tower: str) -> TowerStages:
    """embed/blocks/head of one tower; ``stages.forward(x)`` equals encode_image / encode_text (unnormalised)."""
    transformer_blocks(model, [tower])  # raises the clear error for unsupported towers
    if tower == "image":
        return _image_stages(model)
    root = text_root(model)
    return _clip_text_stages(model) if root is model else _custom_text_stages(root)

