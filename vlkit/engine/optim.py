"""Optimizers and learning-rate schedules from the `optim` config section."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from vlkit.registry import Registry

SCHEDULES: Registry = Registry("lr schedule")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # no decay on biases, norms, embeddings-like 1-D tensors and scalars (logit scale): decaying them hurts
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"unknown optim.name {cfg.name!r}; choose adamw or sgd")


@SCHEDULES.register("cosine")
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("linear")
def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


@SCHEDULES.register("constant")
def _constant(progress: float) -> float:
    return 1.0


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warmup over ``warmup_steps``, then the named decay over the remaining steps."""
    decay = SCHEDULES.get(cfg.scheduler)
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay((step - warmup) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
