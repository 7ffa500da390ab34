"""Recovery by knowledge distillation: a pruned (or sparse) student learns back from its dense teacher.

The teacher's knowledge of an image-text backbone lies in two places, and the loss reads both:

* **relations**: within a batch, each image's softmax over the captions and each caption's softmax over the
  images (the teacher's image-text similarity distributions, at its own temperature); the student's rows
  are pulled to them by KL divergence (as CLIP-KD's "CRD"-style relational terms; MEAL V2 distils from
  teachers' soft outputs alone, without labels);
* **features**: pruning keeps the embedding width, so each student embedding is pulled to the teacher's
  by cosine distance (CLIP-KD's feature distillation);
* **cross** (optional): each student image's softmax over the *teacher's* caption embeddings (this batch's
  and a bank of earlier batches': many more anchors than the batch) pulled to the teacher image's softmax over
  the same captions, and each student caption's over the teacher's images likewise (CLIP-KD's interactive
  terms, read as relations: the anchors are fixed, so the student learns where it stands in the teacher's
  space, not only within its own batch);
* **blocks** (optional): pruning heads and neurons keeps every block and the residual width, so the output of
  each transformer block of the student can be pulled to the teacher's block output (layer-wise
  distillation, as structured-pruning recoveries of language models do): mean squared error relative to the
  teacher's energy, averaged over blocks. ``BlockOutputs`` records them during a forward.

No labels are needed: with the task loss weighted 0 the student learns from the teacher alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BlockOutputs", "DistillWeights", "block_loss", "distillation_loss"]


@dataclass
class DistillWeights:
    relation: float = 1.0  # KL between the teacher's and the student's similarity distributions (both ways)
    feature: float = 1.0  # 1 - cosine between the student's and the teacher's embeddings (images and texts)
    blocks: float = 0.0  # relative squared error between the student's and the teacher's block outputs
    cross: float = 0.0  # KL of student-vs-teacher-anchor similarity distributions to the teacher's own


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                    reduction="batchmean")


def distillation_loss(s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, scale: float | Tensor,
                      weights: DistillWeights | None = None, bank_img: Tensor | None = None,
                      bank_txt: Tensor | None = None) -> dict[str, Tensor]:
    """Distillation terms for a batch of L2-normalised embeddings ([N, D] images, [M, D] texts; student s,
    teacher t, same D). ``scale`` is the logit scale both similarity matrices are read at (the teacher's
    temperature: its distributions are the targets). ``bank_img`` / ``bank_txt`` ([K, D], teacher embeddings
    of earlier batches) widen the anchors of the cross term. Returns the weighted sum as ``loss`` and each
    term."""
    if s_img.shape[-1] != t_img.shape[-1] or s_txt.shape[-1] != t_txt.shape[-1]:
        raise ValueError(f"the student's embeddings ({s_img.shape[-1]}) and the teacher's ({t_img.shape[-1]}) "
                         "differ in width: distil from the backbone this one was pruned from")
    weights = weights or DistillWeights()
    s_sim, t_sim = scale * s_img @ s_txt.T, scale * t_img @ t_txt.T
    relation = 0.5 * (_kl_rows(s_sim, t_sim) + _kl_rows(s_sim.T, t_sim.T))
    feature = 0.5 * ((1 - (s_img * t_img).sum(-1)).mean() + (1 - (s_txt * t_txt).sum(-1)).mean())
    loss = weights.relation * relation + weights.feature * feature
    out = {"kd_relation": relation.detach(), "kd_feature": feature.detach()}
    if weights.cross:
        anchors_txt = t_txt if bank_txt is None else torch.cat([t_txt, bank_txt.to(t_txt)])
        anchors_img = t_img if bank_img is None else torch.cat([t_img, bank_img.to(t_img)])
        cross = 0.5 * (_kl_rows(scale * s_img @ anchors_txt.T, scale * t_img @ anchors_txt.T)
                       + _kl_rows(scale * s_txt @ anchors_img.T, scale * t_txt @ anchors_img.T))
        loss = loss + weights.cross * cross
        out["kd_cross"] = cross.detach()
    return {"loss": loss, **out}


class BlockOutputs:
    """The outputs of every transformer block of ``towers`` of an open_clip model, in call order, while
    ``recording`` is on (forward hooks; ``take()`` hands them over and clears). The model is not changed."""

    def __init__(self, model: nn.Module, towers: Sequence[str] = ("image", "text")) -> None:
        from vlkit.backbone.blocks import transformer_blocks

        self.recording, self.outputs = False, []
        self._handles = [v.module.register_forward_hook(self._keep) for v in transformer_blocks(model, towers)]

    def _keep(self, module: nn.Module, args: tuple, out: Tensor | tuple) -> None:
        if self.recording:
            self.outputs.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list[Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def block_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """Mean over blocks of ||s - t||^2 / ||t||^2 (each block's outputs over the whole batch): 0 when the
    student reproduces every block, ~1 when it outputs zeros; blind to each block's scale."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"block distillation needs the same blocks on both sides: the student ran {len(student)} "
                         f"blocks, the teacher {len(teacher)} (distil from the backbone this one was pruned from)")
    terms = [((s - t.detach()) ** 2).sum() / ((t.detach() ** 2).sum() + eps) for s, t in zip(student, teacher)]
    return sum(terms) / len(terms)
