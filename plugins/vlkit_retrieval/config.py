"""The retrieval plugin's config section (`retrieval.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetrievalConfig:
    # ranking (VSE++ hinge) | contrastive (InfoNCE) | combined (weighted sum of both)
    loss: str = "combined"
    margin: float = 0.2
    # VSE++: only the hardest negative per positive (sum over all negatives when false)
    max_violation: bool = True
    ranking_weight: float = 1.0
    contrastive_weight: float = 1.0
    # what is trained: full | lock_image | lock_text | lora (peft adapters on the MLPs of both towers)
    train_mode: str = "full"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # nn.MultiheadAttention runs its projections inside a fused kernel, so adapters go on the MLP linears
    lora_targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj"])
    # the trained backbone is also saved into vlkit's cache under this name (csp/ufo defaults load it)
    export_as: str = ""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
