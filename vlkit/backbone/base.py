"""What every backbone kind shares (CLIP in vlkit.backbone.core, MLLM in vlkit.backbone.mllm): the error, the
warning for a cut text and the identity digest of a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from vlkit.errors import VlkitError


class TextTruncatedWarning(UserWarning):
    """A text was longer than the text encoder's context and was cut to it."""


class BackboneError(VlkitError, RuntimeError):
    """A backbone could not be built or loaded; the message says how to fix it."""


def model_identity(name: str, config: Any, spec: Any, model: nn.Module) -> str:
    """``name:digest`` of an architecture description and every tensor of ``model``'s state dict."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(json.dumps([name, config, spec], sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"{name}:{digest.hexdigest()}"
