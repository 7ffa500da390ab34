"""The caption plugin's config section (`caption.*`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CaptionConfig:
    # longest caption trained on (tokens; longer ones lose their end) and longest caption generated
    max_caption_tokens: int = 40
    max_new_tokens: int = 40
    # decode the training images once into memory (uint8) when they take at most this many MiB; 0 = never
    preload_mb: int = 1024
    # what is trained: full (every weight) | projector (the projector alone: a pretrained MLLM's first stage)
    # | lora (peft adapters on the language model's linears; the projector trains too)
    train_mode: str = "full"
    lora_rank: int = 8
    lora_alpha: int = 16
    # start a freshly built MLLM's vision tower from this CLIP backbone's image tower (e.g.
    # cached:vlkit-tiny-shapes; empty, or a loaded trained MLLM: keep its own): blocks copied, a convolutional stem fitted by a patch projection, then the tower
    # distilled towards the CLIP tower's tokens for vision_distill_steps on vision_distill_images training images
    vision_from: str = ""
    vision_distill_steps: int = 400
    vision_distill_images: int = 4096
