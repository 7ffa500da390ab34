"""vlkit's tiny offline MLLM: a LLaVA-architecture model (CLIP vision tower, MLP projector, Llama language
model) of about 2M parameters with a word-level tokenizer trained offline (``tokenizers``) on the shapes
world's language, built from configs alone. ``load_backbone("vlkit-tiny-llava")`` gives it randomly
initialised; ``vlkit train plugin=caption`` teaches it to describe the shapes world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.backbone.mllm import CAPTION_PROMPT, IMAGE_PROMPT, TEXT_PROMPT, MLLMBackbone

NAMES = {"vlkit-tiny-llava": dict(width=128, layers=4, heads=4, mlp=384, vision_width=128, vision_layers=4),
         "vlkit-tiny-llava-test": dict(width=32, layers=2, heads=2, mlp=64, vision_width=32, vision_layers=1)}
SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
IMAGE_SIZE, PATCH = 64, 8


def shapes_corpus(n_scenes: int = 300, seed: int = 0) -> list[str]:
    """Captions of ``n_scenes`` shapes-world scenes (every template, colour and shape), the prompts, and the
    zero-shot label prompts: the text the tokenizer is trained on."""
    from vlkit.data.shapes import COLORS, SHAPES, captions_for, scene_for

    rng = np.random.default_rng(seed)
    texts = [c for i in range(n_scenes) for c in captions_for(scene_for(seed, "train", i, IMAGE_SIZE), rng, k=8)]
    texts += [p.format("") for p in (IMAGE_PROMPT, TEXT_PROMPT, CAPTION_PROMPT)]
    texts += [f"a {c} {s}" for c in COLORS for s in SHAPES] + [f"an {c} {s}" for c in COLORS for s in SHAPES]
    return texts


def train_tokenizer(texts: list[str]) -> Any:
    """A lower-casing word-level tokenizer (words and punctuation) over ``texts``, as a transformers
    PreTrainedTokenizerFast with pad/unk/bos/eos and the ``<image>`` placeholder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    order = [SPECIALS[k] for k in ("pad", "unk", "bos", "eos", "image")]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=order, min_frequency=1))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"], bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"], extra_special_tokens={"image_token": SPECIALS["image"]},
        padding_side="left", clean_up_tokenization_spaces=False)


def llava_config(tokenizer: Any, width: int, layers: int, heads: int, mlp: int, vision_width: int,
                 vision_layers: int, image_size: int = IMAGE_SIZE) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_width // 32),
                              image_size=image_size, patch_size=PATCH, projection_dim=vision_width,
                              hidden_act="gelu")  # exact GELU, as open_clip's towers (vision_from_clip)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(SPECIALS["image"]),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return config


def build_tiny_llava(name: str = "vlkit-tiny-llava", seed: int = 0) -> MLLMBackbone:
    """The tiny LLaVA ``name`` (see NAMES), randomly initialised with ``seed``, with its trained tokenizer."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import LlavaForConditionalGeneration

    tokenizer = train_tokenizer(shapes_corpus())
    config = llava_config(tokenizer, **NAMES[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    # seeded, so the name alone rebuilds it (what an index built with it records)
    source = name if seed == 0 else f"{name} (seed {seed})"
    backbone = MLLMBackbone(model, tokenizer, name, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD, source=source)
    backbone.random_init = True
    return backbone


def save_hf(backbone: MLLMBackbone, folder: str | Path) -> Path:
    """Write ``backbone`` as a plain transformers folder (model + LlavaProcessor), as a hub model is stored."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    folder = Path(folder)
    backbone.model.save_pretrained(folder)
    size = backbone.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           image_mean=backbone.mean, image_std=backbone.std),
        tokenizer=backbone.tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        image_token=SPECIALS["image"], num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    return folder


def _copy(dst: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    if dst.weight.shape != weight.shape:
        raise ValueError(f"shape {tuple(weight.shape)} does not fit {tuple(dst.weight.shape)}")
    dst.weight.copy_(weight)
    if bias is not None:
        dst.bias.copy_(bias)


def _copy_norm(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    _copy(dst, src.weight, src.bias)


@torch.no_grad()
def vision_from_clip(mllm: MLLMBackbone, clip: Any, images: torch.Tensor, ridge: float = 1e-3) -> dict[str, float]:
    """Start the MLLM's vision tower (a transformers CLIPVisionModel) from a vlkit CLIP backbone's ViT image
    tower: transformer blocks, class and position embeddings and layer norms are copied; a convolutional stem
    (vlkit-tiny-conv), which a CLIPVisionModel cannot hold, is replaced by the patch projection that best fits
    its outputs on ``images`` (preprocessed, least squares; its bias goes into the position embeddings, as the
    projection has none). Returns the fit's R^2 and the cosine of the two towers' final tokens on ``images``."""
    from vlkit.backbone.stem import ConvStem

    src = clip.model.visual
    tower = mllm.model.model.vision_tower
    dst = getattr(tower, "vision_model", tower)  # transformers 5 keeps the layers on the model itself
    emb = dst.embeddings
    width, patch = emb.embed_dim, emb.patch_size
    blocks = src.transformer.resblocks
    if len(blocks) != len(dst.encoder.layers) or src.transformer.width != width \
            or int(src.patch_size[0]) != patch or clip.image_size != mllm.image_size:
        raise ValueError(f"the CLIP image tower ({len(blocks)} layers, width {src.transformer.width}) does not match "
                         f"the MLLM's ({len(dst.encoder.layers)} layers, width {width}, patch {patch})")
    emb.class_embedding.copy_(src.class_embedding)
    emb.position_embedding.weight.copy_(src.positional_embedding)
    _copy_norm(dst.pre_layrnorm, src.ln_pre)
    _copy_norm(dst.post_layernorm, src.ln_post)
    for blk, layer in zip(blocks, dst.encoder.layers):
        w, b = blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3)
        for proj, wi, bi in zip((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), w, b):
            _copy(proj, wi, bi)
        _copy(layer.self_attn.out_proj, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        _copy_norm(layer.layer_norm1, blk.ln_1)
        _copy_norm(layer.layer_norm2, blk.ln_2)
        _copy(layer.mlp.fc1, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
        _copy(layer.mlp.fc2, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
    stats: dict[str, float] = {}
    if isinstance(src.conv1, ConvStem):
        target = src.conv1(images).flatten(2).transpose(1, 2).reshape(-1, width)  # [B * patches, width]
        x = images.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 3, gh, gw, p, p]
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * patch * patch)
        x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        sol = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1]), x1.T @ target)
        emb.patch_embedding.weight.copy_(sol[:-1].T.reshape(width, 3, patch, patch))
        emb.position_embedding.weight[1:] += sol[-1]
        resid = target - x1 @ sol
        stats["stem_fit_r2"] = float(1 - resid.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
    else:
        emb.patch_embedding.weight.copy_(src.conv1.weight)
    ref = src.transformer(src._embeds(images))
    ours = tower(pixel_values=images, output_hidden_states=True).hidden_states[-1]
    stats["token_cosine"] = float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean())
    return stats


def distill_vision(mllm: MLLMBackbone, clip: Any, images: torch.Tensor, steps: int = 400, batch_size: int = 64,
                   lr: float = 5e-4, seed: int = 0, held_out: int = 256, progress: bool = True) -> dict[str, float]:
    """Fine-tune the MLLM's vision tower so its final tokens match the CLIP image tower's (cosine loss), on
    ``images`` minus the last ``held_out`` (on which the returned cosine is measured): after
    ``vision_from_clip``, this recovers what the fitted patch projection lost. Seeded, so repeatable."""
    from tqdm import tqdm

    src, tower = clip.model.visual, mllm.model.model.vision_tower
    held_out = max(1, min(held_out, len(images) // 4))  # few images: a quarter of them measures the fit
    if len(images) < 2:
        raise ValueError(f"distill_vision needs at least 2 images, got {len(images)}")
    train, test = images[:-held_out], images[-held_out:]
    with torch.no_grad():
        target = torch.cat([src.transformer(src._embeds(train[i:i + 256])) for i in range(0, len(train), 256)])
        target_test = src.transformer(src._embeds(test))

    def cosine(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(tower(pixel_values=x, output_hidden_states=True).hidden_states[-1],
                                                     t, dim=-1).mean()

    with torch.no_grad():
        before = float(cosine(test, target_test))
    gen = torch.Generator().manual_seed(seed)
    was = tower.training
    tower.train()
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in tqdm(range(steps), desc="vision tower from CLIP", disable=not progress, leave=False):
        idx = torch.randint(len(train), (batch_size,), generator=gen)
        loss = 1 - cosine(train[idx], target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.train(was)
    with torch.no_grad():
        after = float(cosine(test, target_test))
    return {"token_cosine_before": before, "token_cosine_after": after}
