"""The learned vocabulary as a file (safetensors + JSON bound to one backbone), and the name helpers around it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlkit.backbone import Backbone
from vlkit.errors import VlkitError
from vlkit.io import atomic_directory, file_digests, read_json_file, seal, unseal, verify_digests

FORMAT = "vlkit-csp-vocab"
VERSION = 1
WEIGHTS = "vocab.safetensors"
META = "vocab.json"

Pair = tuple[str, str]


class VocabError(VlkitError, ValueError):
    """A vocabulary file is missing, malformed, or belongs to another backbone."""


def clean_name(name: str) -> str:
    """The words a CZSL label stands for: CSP replaces '.' by a space and lower-cases
    (UT-Zappos' 'Boots.Ankle' -> 'boots ankle')."""
    return name.replace(".", " ").lower()


def parse_pairs(text: str | Sequence[str]) -> list[Pair]:
    """'striped circle, dotted star' (or ['striped circle', 'dotted star']) -> [('striped', 'circle'),
    ('dotted', 'star')]."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    pairs = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        words = item.split()
        if len(words) != 2:
            raise VocabError(
                f"csp.pairs: {item!r} is not 'attr obj' (two words); write pairs as "
                f"csp.pairs=\"[striped circle,dotted star]\" (multi-word names use '.', e.g. boots.ankle)"
            )
        pairs.append((words[0], words[1]))
    if not pairs:
        raise VocabError("csp.pairs is empty; give pairs as csp.pairs=\"[striped circle,dotted star]\"")
    return pairs


def eot_positions(tokens: torch.Tensor, clip: torch.nn.Module) -> torch.Tensor:
    """Where the text tower pools each sequence: the end-of-text token (the ids' argmax for
    open_clip's CLIP tokenizer, as CLIP.encode_text assumes)."""
    if getattr(clip, "text_pool_type", "argmax") == "eos":
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


@torch.no_grad()
def name_embeddings(backbone: Backbone, names: list[str]) -> torch.Tensor:
    """[N, width]: the mean of the backbone's token embeddings of each name (all its tokens between
    start- and end-of-text), CSP's initialisation of a soft word."""
    clip = backbone.model
    tokens = backbone.tokenize([clean_name(n) for n in names]).to(backbone.device)
    emb = clip.token_embedding(tokens).float()
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    keep = (pos >= 1) & (pos < eot_positions(tokens, clip)[:, None])
    count = keep.sum(dim=1, keepdim=True)
    if (count == 0).any():
        bad = names[int((count[:, 0] == 0).nonzero()[0])]
        raise VocabError(f"the name {bad!r} has no tokens; CZSL names must be non-empty words")
    return (emb * keep[..., None]).sum(dim=1) / count


@dataclass
class SoftVocab:
    """What CSP/CoOp learn, bound to the backbone it was learned on. csp: ``attr_emb`` [A, W] and
    ``obj_emb`` [O, W] are learned; coop: ``ctx`` [n_ctx, W] is learned and the word vectors are the
    frozen name embeddings (kept so the file is self-contained)."""

    method: str
    attrs: list[str]
    objs: list[str]
    attr_emb: torch.Tensor
    obj_emb: torch.Tensor
    ctx: torch.Tensor | None
    backbone: str  # Backbone.identity
    template: str = "a photo of"

    def save(self, path: str | Path) -> Path:
        """Write ``path/vocab.safetensors`` and ``path/vocab.json`` atomically; returns ``path``."""
        tensors = {"attr_emb": self.attr_emb, "obj_emb": self.obj_emb}
        if self.ctx is not None:
            tensors["ctx"] = self.ctx
        meta = {"format": FORMAT, "version": VERSION, "method": self.method, "attrs": self.attrs,
                "objs": self.objs, "template": self.template, "backbone": self.backbone}
        with atomic_directory(path) as tmp:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            meta["files"] = file_digests(tmp, [WEIGHTS])
            (tmp / META).write_text(json.dumps(seal(meta), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone) -> SoftVocab:
        """Read a vocabulary folder; fails when ``backbone`` is not the one it was trained on."""
        path = Path(path)
        if not (path / META).is_file() or not (path / WEIGHTS).is_file():
            raise VocabError(f"{str(path)!r} is not a csp vocabulary folder (expected {META} and {WEIGHTS}; "
                             f"training writes one to <run>/vocab)")
        fix = "train the vocabulary again (vlkit train plugin=csp) or copy the folder again"
        meta = unseal(read_json_file(path / META, VocabError, fix), path / META, fix)
        if meta.get("format") != FORMAT or not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > VERSION:
            raise VocabError(f"{str(path / META)!r} is not a {FORMAT} file this version can read")
        if "files" in meta:  # vocabularies saved before checksums existed have none
            verify_digests(path, meta["files"], fix)
        try:
            tensors = load_file(str(path / WEIGHTS))
            if not {"attr_emb", "obj_emb"} <= set(tensors):
                raise ValueError("attr_emb or obj_emb missing")
        except Exception as exc:
            raise VocabError(f"{path / WEIGHTS} is unreadable ({type(exc).__name__}: {exc}): {fix}") from None
        vocab = cls(meta["method"], list(meta["attrs"]), list(meta["objs"]), tensors["attr_emb"],
                    tensors["obj_emb"], tensors.get("ctx"), meta["backbone"], meta.get("template", "a photo of"))
        vocab.check_backbone(backbone, source=str(path))
        return vocab

    def check_backbone(self, backbone: Backbone, source: str = "this vocabulary") -> None:
        got = backbone.identity
        if got != self.backbone:
            raise VocabError(
                f"{source} was trained on backbone {self.backbone}, got {got}: soft words only mean something "
                f"to the text encoder they were learned with; load that backbone (same model.name and weights)"
            )
        width = backbone.model.token_embedding.weight.shape[1]
        if self.attr_emb.shape[1] != width:
            raise VocabError(f"{source} has {self.attr_emb.shape[1]}-wide word vectors; the backbone's are {width}")
