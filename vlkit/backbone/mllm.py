"""The MLLM backbone: a Hugging Face ``transformers`` vision-language model (LLaVA architecture: vision tower,
projector, language model) behind the protocol the plugins use on CLIP backbones.

Embeddings follow E5-V / VLM2Vec: the model reads the image (or the sentence) followed by a prompt that asks
for a one-word summary, and the final hidden state of the last token is the embedding; image and text land in
one space because both are summarised by the same language model. Dense features are the final hidden states
at the image's own token positions (one per patch), in that same space.

Sources (``load_backbone``):
- ``hf:FOLDER`` or a plain folder holding a transformers ``config.json`` (written by ``save_pretrained``;
  the processor or tokenizer must sit beside it);
- ``hf:ORG/NAME``: a hub id, the download path for users with internet;
- a folder written by ``MLLMBackbone.save`` (vlkit's own format: safetensors + sealed JSON, pruned
  structures included);
- ``vlkit-tiny-llava``: the tiny offline architecture (``vlkit.backbone.tiny_llava``), random init.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.backbone.base import BackboneError, TextTruncatedWarning, model_identity
from vlkit.io import atomic_directory, file_digests, read_json_file, seal, unseal, verify_digests

KIND = "mllm"
SAVED_CONFIG = "vlkit_backbone.json"
SAVED_WEIGHTS = "model.safetensors"
FORMAT = "vlkit-mllm"
FORMAT_VERSION = 1
HF_PREFIX = "hf:"

# E5-V's prompts; the image's tokens (or the sentence) take the place of {}
IMAGE_PROMPT = "{}\nsummary above image in one word :"
TEXT_PROMPT = "{}\nsummary above sentence in one word :"
CAPTION_PROMPT = "{}\ndescribe the image :"
DEFAULT_CONTEXT = 48


# keys transformers adds or fills when a config is saved or read: not part of what the model computes
_VOLATILE = ("_name_or_path", "transformers_version", "_commit_hash", "architectures", "dtype", "torch_dtype")


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    return obj


def _image_token_count(config: Any) -> int:
    vis = config.vision_config
    n = (int(vis.image_size) // int(vis.patch_size)) ** 2
    return n + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


class MLLMBackbone(nn.Module):
    """A LLaVA-style model and its tokenizer as a vlkit backbone (``kind == "mllm"``)."""

    kind = KIND

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, *, mean: Sequence[float],
                 std: Sequence[float], source: str = "random-init", context_length: int = DEFAULT_CONTEXT,
                 logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.mean, self.std = [float(x) for x in mean], [float(x) for x in std]
        self.context_length = int(context_length)
        # the learned temperature of contrastive training lives beside the model (LLaVA has none)
        self.logit_scale_param = nn.Parameter(torch.tensor(float(logit_scale)))
        # True only for an architecture built by name with fresh weights (vlkit.backbone.tiny_llava)
        self.random_init = False
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)
        self.n_image_tokens = _image_token_count(cfg)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise BackboneError(f"{name}: the tokenizer has neither a pad nor an end-of-sequence token")
        self.pad_id = int(pad)
        self.bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
        self._suffix = {k: self._ids(p.split("{}", 1)[1]) for k, p in
                        (("image", IMAGE_PROMPT), ("text", TEXT_PROMPT), ("caption", CAPTION_PROMPT))}
        self.preprocess = self._transform(False)
        self.preprocess_train = self._transform(True)

    # ---- facts ------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The transformers config as a dict, without the keys that name where it was read from."""
        return _stable(self.model.config.to_dict())

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def grid(self) -> int:
        return int(self.model.config.vision_config.image_size) // int(self.model.config.vision_config.patch_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.logit_scale_param.exp()

    @property
    def image_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def is_image_parameter(self, name: str) -> bool:
        return ".vision_tower." in f".{name}" or ".multi_modal_projector." in f".{name}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def pruned_spec(self) -> dict[str, Any] | None:
        return getattr(self.model, "vlkit_pruned_spec", None)

    @property
    def identity(self) -> str:
        return model_identity(self.name, self.config, self.pruned_spec(), self.model)

    # ---- text and images ----------------------------------------------------------------------
    def _transform(self, is_train: bool):
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=is_train, mean=self.mean, std=self.std)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Prompted token ids [N, context_length], left-padded, so every row ends with the summary prompt
        (the last position is the one read). A sentence too long for the context loses its end, with a
        TextTruncatedWarning."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        suffix = self._suffix["text"]
        room = self.context_length - len(self.bos) - len(suffix)
        rows, cut = [], False
        for text in texts:
            ids = self._ids(text)
            cut |= len(ids) > room
            rows.append(self.bos + ids[:room] + suffix)
        if cut:
            warnings.warn(TextTruncatedWarning(
                f"texts longer than the {self.context_length}-token context are cut to it"), stacklevel=2)
        out = torch.full((len(rows), self.context_length), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, self.context_length - len(row):] = torch.tensor(row)
        return out

    def truncated(self, texts: Sequence[str], tokens: torch.Tensor | None = None) -> list[int]:
        room = self.context_length - len(self.bos) - len(self._suffix["text"])
        return [i for i, t in enumerate(texts) if len(self._ids(t)) > room]

    def add_tokens(self, special: Sequence[str] = (), words: Sequence[str] = ()) -> list[int]:
        """Add ``special`` tokens (never split, e.g. a mask token) and the ``words`` the tokenizer cannot
        spell (they read as unknown) to the tokenizer, and grow the embedding table (and the tied output
        layer) to match; new rows start at the mean of the old ones. Tokens already there are left alone,
        so calling it again changes nothing; a saved backbone keeps them (tokenizer and config are saved).
        Returns the ids of ``special`` + ``words``, in order."""
        tok = self.tokenizer
        vocab = tok.get_vocab()
        new_special = [t for t in special if t not in vocab]
        unk = tok.unk_token_id
        new_words = [w for w in words if w not in vocab and unk is not None and unk in self._ids(w)]
        if new_special:
            tok.add_special_tokens({"additional_special_tokens": list(new_special)},
                                   replace_extra_special_tokens=False)
        if new_words:
            tok.add_tokens(list(new_words))
        if len(tok) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = self.model.get_input_embeddings().weight
            old = emb.shape[0] - (len(tok) - len(vocab))
            with torch.no_grad():
                emb[old:] = emb[:old].mean(0, keepdim=True)
        ids = []
        for t in [*special, *words]:
            got = self._ids(t) if t in words else [tok.convert_tokens_to_ids(t)]
            if len(got) != 1:
                raise BackboneError(f"{self.name}: token {t!r} reads as {len(got)} tokens after adding it")
            ids.append(int(got[0]))
        return ids

    def image_prompt_ids(self, kind: str = "image") -> list[int]:
        """The token ids of an image prompt: bos, the image's placeholder tokens, the ``kind`` suffix."""
        return self.bos + [self.image_token_id] * self.n_image_tokens + self._suffix[kind]

    def _image_hidden(self, images: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.image_prompt_ids("image"), device=images.device).expand(images.shape[0], -1)
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        return self.model.model(input_ids=ids, pixel_values=images.to(dtype)).last_hidden_state

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self._image_hidden(images)[:, -1]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        mask = tokens != self.pad_id
        first = int(mask.float().argmax(dim=1).min()) if tokens.numel() else 0  # drop columns that are all padding
        tokens, mask = tokens[:, first:], mask[:, first:]
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        x = self.model.model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).last_hidden_state
        x = x[:, -1]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    def dense_features(self, images: torch.Tensor, mode: str = "plain") -> torch.Tensor:
        """The final hidden states at the image's patch positions, [B, h, w, D] (unnormalised)."""
        if mode != "plain":
            raise BackboneError(f"dense feature mode {mode!r} is for CLIP towers; MLLM backbones have 'plain'")
        hidden = self._image_hidden(images)
        start = len(self.bos) + self.n_image_tokens - self.grid ** 2
        patches = hidden[:, start:start + self.grid ** 2]
        return patches.reshape(images.shape[0], self.grid, self.grid, -1)

    # ---- captions -----------------------------------------------------------------------------
    def caption_batch(self, images: torch.Tensor, captions: Sequence[str], max_length: int = 40
                      ) -> dict[str, torch.Tensor]:
        """Inputs and labels for next-token training on captions: the caption prompt with the image, then
        the caption and the end token; only caption tokens (and the end) are predicted."""
        prefix = self.image_prompt_ids("caption")
        eos = int(self.tokenizer.eos_token_id)
        targets = [self._ids(c)[:max_length] + [eos] for c in captions]
        width = len(prefix) + max(len(t) for t in targets)
        ids = torch.full((len(captions), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(targets):
            row = prefix + t
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, len(prefix):len(row)] = torch.tensor(t)
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": images}

    def caption_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"].to(dtype), labels=batch["labels"]).loss

    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy caption token ids [B, max_new_tokens] of preprocessed images, padded after the end token."""
        ids = torch.tensor(self.image_prompt_ids("caption"), device=images.device).expand(images.shape[0], -1)
        dtype = next(self.model.model.vision_tower.parameters()).dtype
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=images.to(dtype), max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=int(self.tokenizer.eos_token_id), pad_token_id=self.pad_id)
        new = out[:, ids.shape[1]:]
        return F.pad(new, (0, max_new_tokens - new.shape[1]), value=self.pad_id)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> text up to the end token, punctuation attached to the word before it."""
        eos = int(self.tokenizer.eos_token_id)
        texts = []
        for row in ids.tolist():
            row = row[:row.index(eos)] if eos in row else row
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            texts.append(re.sub(r"\s+([,.:;!?])", r"\1", " ".join(text.split())))
        return texts

    def generate_captions(self, images: torch.Tensor, max_new_tokens: int = 32) -> list[str]:
        """Greedy captions of a batch of preprocessed images."""
        return self.decode(self.generate_ids(images, max_new_tokens))

    def blocks(self):
        """The uniform view of the transformer blocks (language model and vision tower) for vlkit.compress."""
        from vlkit.backbone.hf_blocks import hf_blocks

        return hf_blocks(self.model)

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """vlkit's MLLM folder: the model's weights (safetensors, tied tensors once), its transformers config,
        the tokenizer, and a sealed JSON with vlkit's settings (prompts' context, temperature, pruning)."""
        from safetensors.torch import save_model

        with atomic_directory(directory) as tmp:
            model = self.model
            if dtype is not None:
                import copy

                model = copy.deepcopy(model).to(dtype)
            save_model(model, str(tmp / SAVED_WEIGHTS))
            self.model.config.save_pretrained(tmp / "hf_config")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "kind": KIND,
                "source": self.source, "mean": self.mean, "std": self.std, "context_length": self.context_length,
                "logit_scale": float(self.logit_scale_param.detach()), "pruned": self.pruned_spec(),
                # every file: a changed config or tokenizer would silently change what the model computes
                "files": file_digests(tmp, sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())),
            }
            (tmp / SAVED_CONFIG).write_text(json.dumps(seal(meta), indent=2, sort_keys=True))
        return Path(directory)


def is_saved_mllm(path: str | Path) -> bool:
    file = Path(path) / SAVED_CONFIG
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8, not JSON: the CLIP loader says why
        return False


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _model_class(config: Any):
    from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

    if isinstance(config, LlavaConfig):
        return LlavaForConditionalGeneration
    return AutoModelForImageTextToText


def load_saved_mllm(directory: str | Path) -> MLLMBackbone:
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    fix = "save the backbone again (or copy the folder again)"
    meta = unseal(read_json_file(directory / SAVED_CONFIG, BackboneError, fix), directory / SAVED_CONFIG, fix)
    if not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > FORMAT_VERSION \
            or not isinstance(meta.get("files"), dict):
        raise BackboneError(f"{str(directory)!r} is not a vlkit MLLM folder this version can read: {fix}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise BackboneError(f"{str(directory)!r} was written by a newer vlkit (MLLM format {meta['version']})")
    verify_digests(directory, meta["files"], fix)
    config = AutoConfig.from_pretrained(directory / "hf_config")
    model = _model_class(config)._from_config(config)
    if meta.get("pruned"):
        from vlkit.backbone.hf_blocks import rebuild_pruned_hf

        rebuild_pruned_hf(model, meta["pruned"])
    try:
        missing, unexpected = load_model(model, str(directory / SAVED_WEIGHTS), strict=False)
    except Exception as exc:
        raise BackboneError(f"{directory / SAVED_WEIGHTS} does not fit the model its config describes "
                            f"({type(exc).__name__}: {str(exc)[:300]}): {fix}") from None
    if missing or unexpected:
        raise BackboneError(f"{directory / SAVED_WEIGHTS}: missing {sorted(missing)[:3]}, unexpected "
                            f"{sorted(unexpected)[:3]}: {fix}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    return MLLMBackbone(model, tokenizer, meta["name"], mean=meta["mean"], std=meta["std"], source=str(directory),
                        context_length=meta["context_length"], logit_scale=meta["logit_scale"])


def load_hf(source: str) -> MLLMBackbone:
    """A transformers image-text-to-text model and its processor from a local folder or a hub id."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    ref = source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) else source
    local = Path(ref).is_dir()
    if not local and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise BackboneError(f"MLLM folder {ref!r} does not exist")
    # HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import): no network tries when it is set
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        config = AutoConfig.from_pretrained(ref, local_files_only=offline)
        model = _model_class(config).from_pretrained(ref, local_files_only=offline)
    except Exception as exc:
        how = ("the folder must hold a transformers model written by save_pretrained (config.json + weights)"
               if local else "without internet, download the model elsewhere (huggingface-cli download "
               f"{ref} --local-dir FOLDER) and pass model.name=hf:FOLDER")
        raise BackboneError(f"could not load the MLLM {ref!r} ({type(exc).__name__}: {str(exc)[:300]}); {how}") from None
    if not hasattr(model, "model") or not hasattr(model.model, "vision_tower") \
            or not hasattr(model.model, "language_model"):
        raise BackboneError(f"{ref!r} is a {type(model).__name__}; vlkit's MLLM backbone needs a LLaVA-style model "
                            "(vision_tower + multi_modal_projector + language_model)")
    try:
        processor = AutoProcessor.from_pretrained(ref, local_files_only=offline)
        tokenizer = getattr(processor, "tokenizer", processor)
        image_processor = getattr(processor, "image_processor", None)
    except Exception:
        tokenizer, image_processor = AutoTokenizer.from_pretrained(ref, local_files_only=offline), None
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = getattr(image_processor, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(image_processor, "image_std", None) or OPENAI_DATASET_STD
    model.eval()
    return MLLMBackbone(model, tokenizer, f"hf:{ref}", mean=mean, std=std, source=f"hf:{ref}")
