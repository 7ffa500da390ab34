"""The `csp:` config section: which prompting method, its regularisation, and how it is evaluated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS: tuple[str, ...] = ("csp", "coop", "clip")


@dataclass
class CSPConfig:
    # csp = learned attribute/object vocabulary; coop = learned context "a photo of";
    # clip = hand-written prompts "a photo of attr obj" (nothing to train: use `vlkit eval`)
    method: str = "csp"
    # dropout on the soft vocabulary while training (CSP's --attr_dropout: every element of every
    # attribute *and* object vector, rescaled by 1/(1-p)); ignored by coop and clip
    attr_dropout: float = 0.3
    # prompt prefix; the attribute and object (soft or hard) come right after it, before end-of-text.
    # auto: on the shapes world the start of a caption the backbone was trained on ("a picture of exactly
    # one shape: a red circle"), elsewhere CLIP's "a photo of"
    template: str = "auto"
    # also report open-world metrics (every attr x obj, feasibility threshold chosen on val)
    open_world: bool = True
    # thresholds tried on val for the open-world feasibility filter (CSP's --threshold_trials)
    n_thresholds: int = 50
    # prompts per text-encoder batch when every pair is scored at evaluation
    text_batch_size: int = 512
    # the pair-split folder of the CZSL root (CSP layout). auto: on the shapes world the colour x shape split
    # (captions name every colour: CSP's premise), elsewhere compositional-split-natural. The shapes world's
    # harder split, patterns that captions never name: csp.split_name=compositional-split-natural
    split_name: str = "auto"
    # eval: also score every image against these pairs and print the top ones: any composition of the
    # vocabulary (words it lacks use their pretrained token embeddings). A Hydra list or a quoted string:
    # csp.pairs="[striped circle,dotted star]" or csp.pairs="'striped circle,dotted star'"
    pairs: Any = ""
    # how many images' predictions to print when csp.pairs is set
    show: int = 10


SHAPES_TEMPLATE = "a picture of exactly one shape: a"  # + "red circle" is one of the world's captions
CLIP_TEMPLATE = "a photo of"


def resolve_auto(cfg: Any, data_name: str) -> tuple[str, str]:
    """(split_name, template) with ``auto`` replaced by the choice for this data set."""
    from vlkit.data.shapes import CZSL_COLOUR_SPLIT, CZSL_SPLIT_NAME

    shapes = data_name == "shapes"
    split = cfg.split_name if cfg.split_name != "auto" else (CZSL_COLOUR_SPLIT if shapes else CZSL_SPLIT_NAME)
    template = cfg.template if cfg.template != "auto" else (SHAPES_TEMPLATE if shapes else CLIP_TEMPLATE)
    return split, template


def check_config(cfg: Any) -> None:
    """Fail on a bad csp section before any data is generated or read."""
    from vlkit.config import ConfigError

    if cfg.method not in METHODS:
        raise ConfigError(f"csp.method={cfg.method!r} is not a method; choose one of {', '.join(METHODS)}")
    if not 0.0 <= cfg.attr_dropout < 1.0:
        raise ConfigError(f"csp.attr_dropout={cfg.attr_dropout} must be in [0, 1)")
    for key in ("n_thresholds", "text_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"csp.{key}={getattr(cfg, key)} must be >= 1")
