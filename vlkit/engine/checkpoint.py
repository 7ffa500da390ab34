"""Training checkpoints: written atomically, read without unpickling, checked against the run they resume."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlkit.errors import VlkitError
from vlkit.io import atomic_directory, file_digests, read_json_file, seal, unseal, verify_digests

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "task.safetensors"
OPTIM_FILE = "optimizer.pt"


class CheckpointError(VlkitError, RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another model or plugin."""


@dataclass
class TrainerState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # epoch in progress
    batch_in_epoch: int = 0       # batches of that epoch already consumed (per process)
    best_value: float | None = None
    best_step: int = -1
    plugin: str = ""
    model: str = ""
    signature: dict[str, list[int]] = field(default_factory=dict)  # saved tensor name -> shape
    scheduler: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0           # seconds of training (wall clock, main process) before this point
    cpu_s: float = 0.0            # CPU seconds of the main process (all its threads) before this point


def trainable_state(task: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: parameters that require grad, plus all buffers."""
    params = {n for n, p in task.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in task.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items() if k in params | buffers}


def _rng_state() -> dict[str, torch.Tensor]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_meta": torch.tensor([py[0], -1 if py[2] is None else 1], dtype=torch.float64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2]], dtype=torch.int64),
    }


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((int(state["python_meta"][0]), tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0))


def save_checkpoint(path: Path, task: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainerState, rank: int = 0, world: int = 1) -> None:
    """Write a checkpoint folder atomically (main process); every process adds its own RNG file first."""
    path = Path(path)
    state.signature = {k: list(v.shape) for k, v in trainable_state(task).items()}
    with atomic_directory(path) as tmp:
        save_file(trainable_state(task), str(tmp / WEIGHTS_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        (tmp / "world.json").write_text(json.dumps({"processes": world}))
        for r in range(world):
            rng_file = path.parent / f".rng-{path.name}-{r}.safetensors"
            if rng_file.exists():
                rng_file.replace(tmp / f"rng_{r}.safetensors")
        # the state, last: it records every other file's sha256 and a checksum of itself
        files = file_digests(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))
        (tmp / STATE_FILE).write_text(json.dumps(seal({**asdict(state), "files": files}), indent=2, sort_keys=True))


def save_rng(path: Path, rank: int) -> None:
    """Each process leaves its RNG state beside the checkpoint; the main process moves it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_rng_state(), str(path.parent / f".rng-{path.name}-{rank}.safetensors"))


def read_state(path: Path) -> TrainerState:
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a vlkit checkpoint (no {STATE_FILE}); pass a run folder or its "
            f"checkpoints/last or checkpoints/best folder"
        )
    fix = "resume from another checkpoint (checkpoints/best or checkpoints/last), or train again"
    body = unseal(read_json_file(file, CheckpointError, fix), file, fix)
    files = body.pop("files", None)  # checkpoints written before checksums existed have none
    if files is not None:
        verify_digests(path, files, fix)
    try:
        return TrainerState(**body)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint state {str(file)!r} is corrupt ({exc}): {fix}") from None


def check_compatible(state: TrainerState, task: nn.Module | None, plugin: str, model: str, source: Path) -> None:
    """The checkpoint was written by this plugin on this model (and, given ``task``, fits its tensors)."""
    if state.plugin and state.plugin != plugin:
        raise CheckpointError(
            f"checkpoint {str(source)!r} was written by plugin {state.plugin!r}, not {plugin!r}: "
            f"use plugin={state.plugin} or another checkpoint"
        )
    if state.model and state.model != model:
        raise CheckpointError(
            f"checkpoint {str(source)!r} was trained on model {state.model!r}, not {model!r}: "
            f"use model.name={state.model} or another checkpoint"
        )
    if task is None:
        return
    own = {k: list(v.shape) for k, v in trainable_state(task).items()}
    for key, shape in state.signature.items():
        if own.get(key) != shape:
            raise CheckpointError(
                f"checkpoint {str(source)!r} does not fit this task: tensor {key!r} is {shape} in the "
                f"checkpoint and {own.get(key, 'absent')} here (a different model or plugin config?)"
            )


def load_checkpoint(path: Path, task: nn.Module, optimizer: torch.optim.Optimizer | None,
                    plugin: str, model: str, rank: int = 0, restore_rng: bool = True) -> TrainerState:
    """Restore task weights (and optimizer and this process's RNG when given) from a checkpoint."""
    path = Path(path)
    state = read_state(path)
    check_compatible(state, task, plugin, model, path)
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:
        raise CheckpointError(f"checkpoint weights {str(path / WEIGHTS_FILE)!r} are unreadable: {exc}") from exc
    missing = task.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise CheckpointError(f"checkpoint {str(path)!r} has tensors this task lacks: {missing.unexpected_keys[:3]}")
    if optimizer is not None and (path / OPTIM_FILE).is_file():
        try:
            optim_state = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code; a truncated file fails to unzip
            raise CheckpointError(
                f"{str(path / OPTIM_FILE)!r} cannot be read as an optimizer state ({type(exc).__name__}); it is "
                f"damaged or not one vlkit wrote (nothing in it was run). Resume from another checkpoint") from None
        optimizer.load_state_dict(optim_state)
    rng_file = path / f"rng_{rank}.safetensors"
    if restore_rng and rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)))
    return state


def find_checkpoint(path: str | Path, prefer: str = "last") -> Path:
    """A run folder resolves to its checkpoints/<prefer> (falling back to the other); a checkpoint folder to itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for name in (prefer, "best" if prefer == "last" else "last"):
        if (path / "checkpoints" / name / STATE_FILE).is_file():
            return path / "checkpoints" / name
    raise CheckpointError(
        f"no checkpoint in {str(path)!r}: expected {path}/checkpoints/last (or best) with {STATE_FILE}"
    )
