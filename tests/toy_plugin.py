"""A toy regression plugin for engine tests: tiny, deterministic, with dropout so RNG state matters."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from vlkit.plugins import DataBundle, Plugin


@dataclass
class ToyConfig:
    n_train: int = 96
    n_val: int = 37          # odd on purpose: uneven last batch across processes
    dim: int = 6
    dropout: float = 0.1
    die_at_step: int = 0     # send SIGTERM to ourselves after this optimizer step (0 = never)
    nan_at_step: int = 0     # return a NaN loss at this step (0 = never)
    crash_at_step: int = 0   # raise (a hard crash, no graceful save) at this step (0 = never)


class ToyData(Dataset):
    def __init__(self, n: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.linspace(0.5, 1.0, dim)
        self.y = self.x @ w + 0.05 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i], "idx": torch.tensor(i)}


class ToyTask(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.lin = nn.Linear(cfg.dim, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        self.calls += 1
        pred = self.lin(self.drop(batch["x"])).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        step = int(self.calls)
        if self.cfg.nan_at_step and step == self.cfg.nan_at_step:
            loss = loss * float("nan")
        if self.cfg.crash_at_step and step == self.cfg.crash_at_step:
            raise RuntimeError("simulated crash")
        if self.cfg.die_at_step and step == self.cfg.die_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss, "pred_mean": pred.mean()}

    def eval_step(self, batch):
        pred = self.lin(batch["x"]).squeeze(-1)
        return {"err": (pred - batch["y"]) ** 2, "idx": batch["idx"]}

    def compute_metrics(self, outputs, split):
        return {"mse": float(outputs["err"].mean()), "n": int(outputs["err"].numel()),
                "n_unique": int(outputs["idx"].unique().numel())}


def _data(cfg, backbone) -> DataBundle:
    t = cfg.toy
    return DataBundle(train=ToyData(t.n_train, t.dim, 1), val=ToyData(t.n_val, t.dim, 2),
                      test=ToyData(t.n_val, t.dim, 3))


def _task(cfg, backbone, data) -> ToyTask:
    return ToyTask(ToyConfig(**cfg.toy))


PLUGIN = Plugin(name="toy", config=ToyConfig, build_data=_data, build_task=_task,
                description="a toy regression task for engine tests")
