"""The shared CLIP backbone: one wrapper over any open_clip model, its loading paths and its saved form."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone.base import BackboneError, TextTruncatedWarning, model_identity
from vlkit.backbone.stem import ConvStem
from vlkit.errors import VlkitError
from vlkit.io import atomic_directory, file_digests, read_json_file, seal, unseal, verify_digests
from vlkit.registry import did_you_mean

SAVED_CONFIG = "vlkit_backbone.json"
SAVED_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_CONFIG_DIR = Path(__file__).with_name("model_configs")


@cache
def register_vlkit_configs() -> list[str]:
    """Register vlkit's own tiny architectures (vlkit-tiny, vlkit-tiny-test) with open_clip, once."""
    open_clip.add_model_config(_CONFIG_DIR)
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def _model_config(name: str) -> dict[str, Any]:
    register_vlkit_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        names = open_clip.list_models()
        raise BackboneError(
            f"unknown open_clip model {name!r}.{did_you_mean(name, names)} "
            f"({len(names)} architectures are known; `python -c 'import open_clip; print(open_clip.list_models())'` "
            f"lists them). vlkit's own: {', '.join(register_vlkit_configs())}. A saved vlkit backbone is a folder path; "
            f"an MLLM (transformers) is hf:FOLDER or hf:ORG/NAME, or vlkit-tiny-llava."
        )
    return copy.deepcopy(cfg)


def _trimmable_text(model: nn.Module, tokens: torch.Tensor) -> bool:
    """True when ``model`` runs open_clip's own CLIP.encode_text with a causal mask and argmax pooling
    over full-length token rows: then trailing positions can be dropped exactly."""
    return (type(model).encode_text is open_clip.CLIP.encode_text
            and getattr(model, "text_pool_type", None) == "argmax"
            and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
            and tokens.shape[1] == model.positional_embedding.shape[0])


def _encode_text_prefix(model: nn.Module, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first ``tokens.shape[1]`` positions (causal mask cut to size)."""
    n = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def _build_model(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip CLIP from a config dict (the json of a model architecture). vlkit adds one
    key: ``vision_cfg.stem`` (hidden widths of a convolutional patch embedding, see ConvStem)."""
    cfg = copy.deepcopy(cfg)
    stem = cfg.get("vision_cfg", {}).pop("stem", None)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise BackboneError("CoCa-style models (multimodal_cfg) are not supported as vlkit backbones")
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg)
    if stem:
        vis = cfg["vision_cfg"]
        model.visual.conv1 = ConvStem(stem, vis["width"], vis["patch_size"])
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects: safetensors, or torch files with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BackboneError(f"{str(path)!r} is not a readable safetensors file ({exc}): it is truncated or "
                                f"damaged; save or download it again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"could not read {str(path)!r} as a weights file ({type(exc).__name__}: {exc}). vlkit only reads "
                "safetensors or plain torch state dicts (weights_only=True); convert other files first"
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    """load_state_dict with an error that names the first mismatching tensor and says what to do."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            if key == "logit_scale" and own[key].numel() == tensor.numel():
                state[key] = tensor.reshape(own[key].shape)
                continue
            raise BackboneError(
                f"checkpoint {source!r} does not fit model {model_name!r}: tensor {key!r} has shape "
                f"{tuple(tensor.shape)} in the file but {tuple(own[key].shape)} in the model. "
                f"Pick the model name the checkpoint was trained with (model.name=...)."
            )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {source!r} does not fit model {model_name!r}: "
            + (f"missing {len(missing)} tensors (first: {missing[0]!r}) " if missing else "")
            + (f"unexpected {len(unexpected)} tensors (first: {unexpected[0]!r})" if unexpected else "")
            + ". Pick the model name the checkpoint was trained with (model.name=...)."
        )
    model.load_state_dict(state, strict=True)


class Backbone(nn.Module):
    """An open_clip CLIP model plus everything plugins need from it: tokenizer, transforms, encoders,
    text-aligned dense patch features, a uniform view of its blocks, and save/load."""

    def __init__(self, model: nn.Module, name: str, config: dict[str, Any],
                 preprocess_cfg: dict[str, Any] | None = None, source: str = "random-init") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.config = config
        self.source = source
        self.preprocess_cfg = dict(preprocess_cfg or {})
        self._tokenizer = open_clip.get_tokenizer(name) if name in open_clip.list_models() else (
            open_clip.SimpleTokenizer(context_length=self.context_length))
        self.preprocess = self._transform(is_train=False)
        self.preprocess_train = self._transform(is_train=True)

    kind = "clip"

    # ---- facts about the model ------------------------------------------------------------
    @property
    def logit_scale_param(self) -> nn.Parameter:
        """The learned log temperature (``logit_scale`` is its exponential)."""
        return self.model.logit_scale

    @property
    def image_tower(self) -> nn.Module:
        return self.model.visual

    def is_image_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` (of ``self.model``) belongs to the image tower."""
        return name.startswith("visual.")

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.config.get("text_cfg", {}).get("context_length", 77))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def identity(self) -> str:
        """A fingerprint of the architecture and the weights: equal iff the same model and weights."""
        return model_identity(self.name, self.config, self.pruned_spec(), self.model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def pruned_spec(self) -> dict[str, Any] | None:
        return getattr(self.model, "vlkit_pruned_spec", None)

    # ---- text and images ------------------------------------------------------------------
    def _transform(self, is_train: bool):
        mean = self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)
        return open_clip.image_transform(self.image_size, is_train=is_train, mean=mean, std=std)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length]. A text longer than the context is cut (its end is dropped) with a
        TextTruncatedWarning; ``truncated(texts)`` says which texts were."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self._tokenizer(list(texts), context_length=self.context_length)
        if tokens.ndim == 2 and bool((tokens[:, -1] != 0).any()) and self.truncated(texts, tokens):
            # one fixed text, so Python's default filter shows it once per place, not once per batch
            warnings.warn(TextTruncatedWarning(
                f"texts longer than the text encoder's {self.context_length}-token context are cut to it "
                f"(Backbone.truncated(texts) says which)"), stacklevel=2)
        return tokens

    def truncated(self, texts: Sequence[str], tokens: torch.Tensor | None = None) -> list[int]:
        """Indices of ``texts`` that do not fit the context (so tokenize drops their end)."""
        texts = list(texts)
        tokens = self._tokenizer(texts, context_length=self.context_length) if tokens is None else tokens
        full = [i for i in range(len(texts)) if int(tokens[i, -1]) != 0]  # the last slot is used: maybe cut
        if not full:
            return []
        longer = self._tokenizer([texts[i] for i in full], context_length=4 * self.context_length + 8)
        return [i for i, row in zip(full, longer) if int(row[self.context_length]) != 0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Caption embeddings. For CLIP text towers (causal mask, pooled at the end-of-text token) the
        positions after the batch's last end-of-text token cannot change any pooled output, so they are
        not computed: the same embeddings at a fraction of the cost for short captions."""
        model = self.model
        if tokens.ndim == 2 and _trimmable_text(model, tokens):
            keep = int(tokens.argmax(dim=-1).max()) + 1
            if keep < tokens.shape[1]:
                return _encode_text_prefix(model, tokens[:, :keep], normalize)
        return model.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    def dense_features(self, images: torch.Tensor, mode: str = "maskclip") -> torch.Tensor:
        """Text-aligned patch features [B, h, w, D] in the joint space (unnormalised); see vlkit.backbone.dense."""
        from vlkit.backbone.dense import dense_features

        return dense_features(self.model.visual, images, mode)

    def blocks(self):
        """The uniform view of transformer blocks (heads, MLP neurons) used by vlkit.compress."""
        from vlkit.backbone.blocks import transformer_blocks

        return transformer_blocks(self.model)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write safetensors weights + a JSON config, atomically, so load_backbone(dir) restores it.
        ``dtype`` (e.g. torch.float16) stores floating-point tensors cast to it; loading casts back."""
        from safetensors.torch import save_file

        with atomic_directory(directory) as tmp:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            save_file(state, str(tmp / SAVED_WEIGHTS))
            meta = {
                "format": "vlkit-backbone", "version": FORMAT_VERSION, "name": self.name,
                "config": self.config, "preprocess_cfg": self.preprocess_cfg,
                "pruned": self.pruned_spec(), "source": self.source,
                "files": file_digests(tmp, [SAVED_WEIGHTS]),
            }
            (tmp / SAVED_CONFIG).write_text(json.dumps(seal(meta), indent=2, sort_keys=True))
        return Path(directory)


def is_saved_backbone(path: str | Path) -> bool:
    return (Path(path) / SAVED_CONFIG).is_file()


def _load_saved(directory: Path) -> Backbone:
    fix = "save the backbone again (or copy the folder again)"
    meta = unseal(read_json_file(directory / SAVED_CONFIG, BackboneError, fix), directory / SAVED_CONFIG, fix)
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("name"), str):
        raise BackboneError(f"{directory / SAVED_CONFIG} is damaged (no config or name): {fix}")
    if meta.get("format") != "vlkit-backbone" or not isinstance(meta.get("version", 0), int) \
            or meta.get("version", 0) > FORMAT_VERSION:
        raise BackboneError(f"{str(directory)!r} is not a vlkit backbone folder this version can read")
    if "files" in meta:  # folders saved before checksums existed have none
        verify_digests(directory, meta["files"], fix)
    try:
        model = _build_model(meta["config"])
        if meta.get("pruned"):
            from vlkit.compress.materialize import rebuild_pruned

            rebuild_pruned(model, meta["pruned"])
    except VlkitError:
        raise
    except Exception as exc:  # a config edited into something open_clip cannot build
        raise BackboneError(f"{directory / SAVED_CONFIG} describes no model vlkit can build "
                            f"({type(exc).__name__}: {exc}): {fix}") from None
    state = read_state_dict(directory / SAVED_WEIGHTS)
    load_weights_strict(model, state, str(directory), meta["name"])
    return Backbone(model, meta["name"], meta["config"], meta.get("preprocess_cfg"), source=str(directory))


def _load_pretrained_tag(name: str, tag: str, cfg: dict[str, Any]) -> Backbone:
    """The download path of open_clip, for users with internet; offline it says how to pass a file."""
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except Exception as exc:
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = f" Known tags for {name}: {', '.join(tags)}." if tags else ""
        raise BackboneError(
            f"could not load pretrained weights {tag!r} for {name!r} ({type(exc).__name__}: {exc}).{hint} "
            f"Without internet, download the weights elsewhere and pass the file: "
            f"model.name={name} model.pretrained=/path/to/open_clip_model.safetensors, "
            f"or a folder with model.name=local-dir:/path/to/folder."
        ) from exc
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    pre = {k: pcfg[k] for k in ("mean", "std") if k in pcfg}
    return Backbone(model, name, cfg, pre, source=f"{name}:{tag}")


def is_mllm_source(name: str) -> bool:
    """Whether ``name`` names an MLLM (vlkit.backbone.mllm): hf:..., a tiny LLaVA architecture, a saved vlkit
    MLLM folder, or a plain transformers folder."""
    from vlkit.backbone import mllm
    from vlkit.backbone.tiny_llava import NAMES

    return (name.startswith(mllm.HF_PREFIX) or name in NAMES or mllm.is_saved_mllm(name)
            or (Path(name).is_dir() and mllm.is_hf_folder(name) and not is_saved_backbone(name)))


def _load_mllm(name: str, pretrained: str | None):
    """The MLLM sources (vlkit.backbone.mllm), or None when ``name`` names a CLIP backbone."""
    if not is_mllm_source(name):
        return None
    if pretrained:
        raise BackboneError(f"model.pretrained is for open_clip models; an MLLM ({name}) is loaded whole from its "
                            f"folder: model.name=hf:FOLDER or a saved vlkit folder")
    from vlkit.backbone import mllm
    from vlkit.backbone.tiny_llava import NAMES, build_tiny_llava

    if name in NAMES:
        return build_tiny_llava(name)
    if mllm.is_saved_mllm(name):
        return mllm.load_saved_mllm(name)
    return mllm.load_hf(name)


def load_backbone(name: str | Path = "vlkit-tiny", pretrained: str | None = None) -> Backbone:
    """Load a backbone from any of vlkit's sources.

    - a folder written by ``Backbone.save`` (no other information needed);
    - ``local-dir:/path`` (open_clip's own folder format: open_clip_config.json + weights);
    - an open_clip model name (``ViT-B-32``, ``vlkit-tiny``) with ``pretrained`` = None (random init),
      a local weights file (safetensors or a torch state dict), or an open_clip pretrained tag;
    - an MLLM (vlkit.backbone.mllm): ``hf:FOLDER`` / a folder with a transformers config.json, ``hf:ORG/NAME``,
      a folder written by ``MLLMBackbone.save``, or ``vlkit-tiny-llava`` (random init).
    """
    register_vlkit_configs()
    name = str(name)
    mllm = _load_mllm(name, pretrained)
    if mllm is not None:
        return mllm
    if is_saved_backbone(name):
        return _load_saved(Path(name))
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise BackboneError(f"{name!r}: expected an open_clip folder with open_clip_config.json and weights")
        model = open_clip.create_model(name)
        cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        return Backbone(model, name, cfg, source=name)
    if os.sep in name and not Path(name).exists():
        raise BackboneError(f"backbone folder {name!r} does not exist")
    if Path(name).is_dir():
        raise BackboneError(f"{name!r} is a folder without {SAVED_CONFIG}: not a saved vlkit backbone")
    cfg = _model_config(name)
    if pretrained and not Path(pretrained).exists() and os.sep not in pretrained:
        return _load_pretrained_tag(name, pretrained, cfg)
    model = _build_model(cfg)
    if pretrained:
        load_weights_strict(model, read_state_dict(pretrained), pretrained, name)
    return Backbone(model, name, cfg, source=pretrained or "random-init")


def image_text_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [n_images, n_texts]."""
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
