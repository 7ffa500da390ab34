"""Recovery by knowledge distillation: a pruned (or sparse) student learns back from its dense teacher.

The teacher's knowledge of an image-text backbone lies in two places, and the loss reads both:

* **relations**: within a batch, each image's softmax over the captions and each caption's softmax over the
  images (the teacher's image-text similarity distributions, at its own temperature); the student's rows
  are pulled to them by KL divergence (as CLIP-KD's "CRD"-style relational terms; MEAL V2 distils from
  teachers' soft outputs alone, without labels);
* **features**: pruning keeps the embedding width, so each student embedding is pulled to the teacher's
  by cosine distance (CLIP-KD's feature distillation).

No labels are needed: with the task loss weighted 0 the student learns from the teacher alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["DistillWeights", "distillation_loss"]


@dataclass
class DistillWeights:
    relation: float = 1.0  # KL between the teacher's and the student's similarity distributions (both ways)
    feature: float = 1.0  # 1 - cosine between the student's and the teacher's embeddings (images and texts)


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean")


def distillation_loss(s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, scale: float | Tensor,
                      weights: DistillWeights | None = None) -> dict[str, Tensor]:
    """Distillation terms for a batch of L2-normalised embeddings ([N, D] images, [M, D] texts; student s,
    teacher t, same D). ``scale`` is the logit scale both similarity matrices are read at (the teacher's
    temperature: its distributions are the targets). Returns the weighted sum as ``loss`` and each term."""
    if s_img.shape[-1] != t_img.shape[-1] or s_txt.shape[-1] != t_txt.shape[-1]:
        raise ValueError(f"the student's embeddings ({s_img.shape[-1]}) and the teacher's ({t_img.shape[-1]}) "
                         "differ in width: distil from the backbone this one was pruned from")
    weights = weights or DistillWeights()
    s_sim, t_sim = scale * s_img @ s_txt.T, scale * t_img @ t_txt.T
    relation = 0.5 * (_kl_rows(s_sim, t_sim) + _kl_rows(s_sim.T, t_sim.T))
    feature = 0.5 * ((1 - (s_img * t_img).sum(-1)).mean() + (1 - (s_txt * t_txt).sum(-1)).mean())
    loss = weights.relation * relation + weights.feature * feature
    return {"loss": loss, "kd_relation": relation.detach(), "kd_feature": feature.detach()}
