"""Prompt models on a frozen CLIP: CSP's soft attribute/object words, CoOp's soft context, CLIP's hard prompts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone import Backbone
from vlkit.errors import VlkitError
from vlkit_csp.config import METHODS
from vlkit_csp.vocab import Pair, SoftVocab, clean_name, eot_positions, name_embeddings, parse_pairs

# The placeholder word of the template "a photo of x x": its two token positions (just before
# end-of-text) receive the attribute and object vectors.
SLOT = "x"
_TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_projection")


def check_text_tower(backbone: Backbone) -> None:
    """Soft prompts replace token embeddings, so the text tower must be open_clip's built-in one."""
    missing = [a for a in _TEXT_TOWER if not hasattr(backbone.model, a)]
    if missing:
        raise VlkitError(
            f"plugin csp needs an open_clip CLIP with its built-in text tower; backbone {backbone.name!r} has "
            f"no {', '.join(missing)} (a custom/HF text tower?). Use a CLIP architecture such as ViT-B-32 or vlkit-tiny"
        )


def _pool(x: torch.Tensor, token_ids: torch.Tensor, clip: nn.Module) -> torch.Tensor:
    """open_clip's text_global_pool for the pool types a soft prompt can use."""
    kind = getattr(clip, "text_pool_type", "argmax")
    if kind in ("argmax", "eos"):
        return x[torch.arange(x.shape[0], device=x.device), eot_positions(token_ids, clip).to(x.device)]
    if kind in ("first", "last"):
        return x[:, 0] if kind == "first" else x[:, -1]
    raise VlkitError(f"plugin csp: text pool type {kind!r} is not supported (argmax, eos, first, last are)")


def encode_text_from_embeddings(clip: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor,
                                normalize: bool = False) -> torch.Tensor:
    """``CLIP.encode_text`` from token *embeddings* [N, L, W] instead of ids: positional embedding,
    transformer with the causal mask, ln_final, pooling at the end-of-text position of ``token_ids``
    [N, L] (or [1, L], shared), text projection. Equals ``encode_text(token_ids)`` when ``embeddings``
    is ``token_embedding(token_ids)``."""
    cast = clip.transformer.get_cast_dtype()
    x = embeddings.to(cast) + clip.positional_embedding.to(cast)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = _pool(x, token_ids.expand(x.shape[0], -1), clip)
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


class PromptModel(nn.Module):
    """Text features of (attribute, object) pairs through a frozen backbone, by one of three methods:
    ``csp`` learns one vector per attribute and per object, placed in "a photo of [attr] [obj]";
    ``coop`` learns the context vectors of "a photo of" and keeps the word vectors frozen;
    ``clip`` tokenizes "a photo of attr obj" (nothing learned)."""

    def __init__(self, backbone: Backbone, attrs: Sequence[str], objs: Sequence[str], method: str = "csp",
                 template: str = "a photo of", attr_dropout: float = 0.0, freeze: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise VlkitError(f"csp.method={method!r} is not a method; choose one of {', '.join(METHODS)}")
        if not 0.0 <= attr_dropout < 1.0:
            raise VlkitError(f"csp.attr_dropout={attr_dropout} must be in [0, 1)")
        check_text_tower(backbone)
        self.backbone, self.frozen = backbone, freeze
        if freeze:  # only the soft prompt is trained; the backbone never changes
            backbone.requires_grad_(False)
        self.method, self.template, self.attr_dropout = method, template, attr_dropout
        self.attrs, self.objs = list(attrs), list(objs)
        self.attr_index = {a: i for i, a in enumerate(self.attrs)}
        self.obj_index = {o: i for i, o in enumerate(self.objs)}
        ids = backbone.tokenize([f"{template} {SLOT} {SLOT}".strip()])
        self.eot = int(eot_positions(ids, backbone.model)[0])
        slot = int(backbone.tokenize([SLOT])[0, 1])
        if self.eot < 3 or int(ids[0, self.eot - 2]) != slot or int(ids[0, self.eot - 1]) != slot:
            raise VlkitError(f"csp.template={template!r} does not fit the backbone's {backbone.context_length}-token "
                             f"context with two word slots after it; shorten the template")
        self.register_buffer("template_ids", ids, persistent=False)
        if method != "clip":
            self._init_soft(backbone)

    def _init_soft(self, backbone: Backbone) -> None:
        words = (name_embeddings(backbone, self.attrs), name_embeddings(backbone, self.objs))
        if self.method == "csp":
            self.attr_emb, self.obj_emb = (nn.Parameter(w.clone()) for w in words)
            return
        # coop: the word vectors stay what the backbone says (non-persistent: derived, not learned)
        self.register_buffer("attr_emb", words[0], persistent=False)
        self.register_buffer("obj_emb", words[1], persistent=False)
        n_ctx = self.eot - 3  # template tokens between start-of-text and the two slots
        if n_ctx < 1:
            raise VlkitError(f"csp.method=coop learns the template's context vectors; csp.template={self.template!r} "
                             f"has none (use e.g. 'a photo of')")
        with torch.no_grad():
            ctx = backbone.model.token_embedding(self.template_ids.to(backbone.device))[0, 1:1 + n_ctx]
        self.ctx = nn.Parameter(ctx.detach().float().clone())

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (norm statistics, dropout)
            self.backbone.eval()
        return self

    # ---- text -------------------------------------------------------------------------------
    def soft_parameters(self) -> list[nn.Parameter]:
        return [p for p in (getattr(self, "attr_emb", None), getattr(self, "obj_emb", None),
                            getattr(self, "ctx", None)) if isinstance(p, nn.Parameter)]

    def word_vectors(self, dropout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Attribute and object vectors; with ``dropout`` (training) CSP's attr_dropout is applied to
        the whole soft vocabulary, attributes and objects alike, as in the reference implementation."""
        attr, obj = self.attr_emb, self.obj_emb
        if dropout and self.method == "csp" and self.attr_dropout > 0:
            both = F.dropout(torch.cat([attr, obj]), self.attr_dropout, training=True)
            attr, obj = both[: len(attr)], both[len(attr):]
        return attr, obj

    def encode_slots(self, attr_vecs: torch.Tensor, obj_vecs: torch.Tensor) -> torch.Tensor:
        """Normalized text features of the template with these vectors in its two word slots."""
        clip = self.backbone.model
        base = clip.token_embedding(self.template_ids)[0]
        x = base.expand(attr_vecs.shape[0], -1, -1).clone()
        x[:, self.eot - 2] = attr_vecs.to(x.dtype)
        x[:, self.eot - 1] = obj_vecs.to(x.dtype)
        if self.method == "coop":
            x[:, 1:1 + self.ctx.shape[0]] = self.ctx.to(x.dtype)
        return encode_text_from_embeddings(clip, x, self.template_ids, normalize=True)

    def encode_prompts(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """CLIP's hard prompts "a photo of attr obj" (names cleaned as CSP does), normalized."""
        texts = [f"{self.template} {clean_name(a)} {clean_name(o)}".strip() for a, o in pairs]
        return self.backbone.encode_text(self.backbone.tokenize(texts).to(self.template_ids.device), normalize=True)

    def pair_features(self, attr_idx: torch.Tensor, obj_idx: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        """Normalized text features [N, D] of the pairs (attrs[attr_idx[i]], objs[obj_idx[i]])."""
        if self.method == "clip":
            return self.encode_prompts([(self.attrs[a], self.objs[o]) for a, o in zip(attr_idx.tolist(), obj_idx.tolist())])
        attr, obj = self.word_vectors(dropout)
        return self.encode_slots(attr[attr_idx], obj[obj_idx])

    def unknown_words(self, pairs: Sequence[Pair]) -> list[str]:
        """Words of ``pairs`` outside the learned vocabulary (they use their pretrained embeddings)."""
        if self.method == "clip":
            return []
        return sorted({a for a, _ in pairs if a not in self.attr_index} | {o for _, o in pairs if o not in self.obj_index})

    def _named(self, names: list[str], index: dict[str, int], table: torch.Tensor) -> torch.Tensor:
        out = name_embeddings(self.backbone, names).to(table.device, table.dtype)  # pretrained fallback
        for i, name in enumerate(names):
            if name in index:
                out[i] = table[index[name]]
        return out

    def named_pair_features(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """Normalized text features of any typed pairs: learned words where the vocabulary has them,
        the backbone's own (pretrained) token embeddings for the others."""
        if self.method == "clip":
            return self.encode_prompts(pairs)
        attr = self._named([a for a, _ in pairs], self.attr_index, self.attr_emb)
        obj = self._named([o for _, o in pairs], self.obj_index, self.obj_emb)
        return self.encode_slots(attr, obj)

    @torch.no_grad()
    def all_pair_features(self, pairs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Text features of many index pairs [P, 2], in batches of ``batch_size`` prompts."""
        dev = self.template_ids.device
        chunks = [self.pair_features(p[:, 0].to(dev), p[:, 1].to(dev)) for p in pairs.split(batch_size)]
        return torch.cat(chunks)

    # ---- images and scores -----------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images, normalize=True)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale

    # ---- the vocabulary as a file ------------------------------------------------------------
    def vocab(self) -> SoftVocab:
        if self.method == "clip":
            raise VlkitError("csp.method=clip learns no vocabulary (its prompts are hand-written)")
        ctx = self.ctx.detach().cpu() if self.method == "coop" else None
        return SoftVocab(self.method, self.attrs, self.objs, self.attr_emb.detach().cpu(),
                         self.obj_emb.detach().cpu(), ctx, self.backbone.identity, self.template)

    @torch.no_grad()
    def load_vocab_(self, vocab: SoftVocab) -> PromptModel:
        """Copy a vocabulary's tensors in (names and method must match this model's)."""
        if (vocab.method, vocab.attrs, vocab.objs) != (self.method, self.attrs, self.objs):
            raise VlkitError(f"vocabulary ({vocab.method}, {len(vocab.attrs)} attrs, {len(vocab.objs)} objs) does not "
                             f"match this model ({self.method}, {len(self.attrs)} attrs, {len(self.objs)} objs)")
        for name in ("attr_emb", "obj_emb") + (("ctx",) if self.method == "coop" else ()):
            getattr(self, name).copy_(getattr(vocab, name))
        return self

    @classmethod
    def from_vocab(cls, vocab: SoftVocab, backbone: Backbone, freeze: bool = True) -> PromptModel:
        vocab.check_backbone(backbone)
        model = cls(backbone, vocab.attrs, vocab.objs, vocab.method, vocab.template, freeze=freeze)
        return model.load_vocab_(vocab)


def _image_batch(images: Any, backbone: Backbone) -> torch.Tensor:
    if torch.is_tensor(images):
        return images if images.ndim == 4 else images[None]
    from vlkit.data.images import load_image

    items = images if isinstance(images, (list, tuple)) else [images]
    pil = [load_image(x) if isinstance(x, (str, Path)) else x for x in items]
    return torch.stack([backbone.preprocess(im) for im in pil])


@torch.no_grad()
def predict_pairs(images: Any, pairs: str | Sequence[str | Pair], vocab: SoftVocab | None,
                  backbone: Backbone) -> torch.Tensor:
    """Scores [n_images, n_pairs] (logit scale x cosine; softmax over pairs gives probabilities) of
    images (a preprocessed [B, 3, S, S] tensor, PIL images or paths) against any pairs ('striped circle'
    or ('striped', 'circle')), composed from a learned vocabulary, or CLIP's hard prompts when
    ``vocab`` is None. Words the vocabulary lacks use the backbone's pretrained token embeddings."""
    if isinstance(pairs, str):
        pairs = parse_pairs(pairs)
    parsed = [parse_pairs(p)[0] if isinstance(p, str) else (p[0], p[1]) for p in pairs]
    model = (PromptModel.from_vocab(vocab, backbone, freeze=False) if vocab is not None
             else PromptModel(backbone, [], [], method="clip", freeze=False))
    was_training = backbone.training
    backbone.eval()
    try:
        model.to(backbone.device)
        text = model.named_pair_features(parsed)
        img = model.encode_images(_image_batch(images, backbone).to(backbone.device))
        return (model.logit_scale * img @ text.T).float().cpu()
    finally:
        backbone.train(was_training)
