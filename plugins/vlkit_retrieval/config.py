"""The retrieval plugin's config section (`retrieval.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlkit.config import bounded


@dataclass
class RetrievalConfig:
    # ranking (VSE++ hinge) | contrastive (InfoNCE) | combined (weighted sum of both)
    loss: str = "combined"
    margin: float = 0.2
    # VSE++: only the hardest negative per positive (sum over all negatives when false)
    max_violation: bool = True
    ranking_weight: float = 1.0
    contrastive_weight: float = 1.0
    # which (image, caption) pairs of a batch are positives: scene = every image the caption is true of
    # (shapes worlds: the instances file describes each scene); caption = the same image or the very same
    # caption text (any COCO-format data); auto = scene when the data describe scenes, else caption.
    # Everything else is a negative of the ranking/contrastive loss.
    positives: str = "auto"
    # decode the training images once into memory (uint8) when they take at most this many MiB; 0 = never
    preload_mb: int = 1024
    # captions of each image in a batch (all positives of it): more text signal per image encoded
    captions_per_image: int = 1
    # add to each batch one caption per image that is false of it (a recoloured / reshaped object, two
    # objects' colours or places swapped): negatives that only binding and relations tell apart (shapes worlds)
    hard_negatives: bool = False
    # start the learned temperature here (logit scale 1/T) when > 0; 0 keeps the backbone's own
    init_temperature: float = 0.0
    # what is trained: full | lock_image | lock_text | lora (peft adapters on the MLPs of both towers)
    train_mode: str = "full"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # last parts of the linear layers' names; empty = the backbone's defaults: the MLPs on open_clip models
    # (nn.MultiheadAttention runs its projections inside a fused kernel), every projection on an MLLM
    lora_targets: list[str] = field(default_factory=list)
    # the trained backbone is also saved into vlkit's cache under this name (csp/ufo defaults load it)
    export_as: str = ""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    # recovery by distillation (vlkit.compress.distill; `vlkit prune ... recover_steps=N` sets these): the dense
    # teacher, e.g. the backbone this one was pruned from (a folder or cached:NAME; empty = no teacher), and
    # the weights of its relation (similarity distributions), feature (embedding cosine) and block terms (each
    # transformer block's output against the teacher's: layer-wise distillation; 0 = off)
    distill_from: str = ""
    distill_relation: float = 1.0
    distill_feature: float = 1.0
    distill_blocks: float = 0.0
    # cross relations: student embeddings against the teacher's embeddings of this batch and of the last
    # distill_bank earlier batches' captions/images (0 = off), pulled to the teacher's own distributions
    distill_cross: float = 0.0
    distill_bank: int = bounded(8, 0)
    # the relation term's temperature, relative to the teacher's own (2 = distributions twice as soft)
    distill_temperature: float = bounded(1.0, 1e-3)
    # the ranking/contrastive loss on labels beside distillation (0 = learn from the teacher alone)
    task_weight: float = 1.0
