"""vlkit csp plugin: compositional soft prompts (CSP), with CoOp and CLIP baselines, for compositional zero-shot learning."""

from __future__ import annotations

from pathlib import Path

from vlkit.plugins import Plugin
from vlkit_csp.config import METHODS, CSPConfig
from vlkit_csp.data import build_data
from vlkit_csp.model import PromptModel, encode_text_from_embeddings, predict_pairs
from vlkit_csp.task import CSPTask, after_fit, build_task, report
from vlkit_csp.vocab import SoftVocab, VocabError, name_embeddings, parse_pairs

plugin = Plugin(
    name="csp",
    config=CSPConfig,
    build_data=build_data,
    build_task=build_task,
    headline_metric="AUC",
    configs=str(Path(__file__).parent / "configs"),
    after_fit=after_fit,
    report=report,
    description=(f"compositional zero-shot learning on a frozen CLIP: csp.method={'|'.join(METHODS)} "
                 "(soft attribute/object vocabulary, soft context, hand-written prompts); closed- and "
                 "open-world AUC / best HM; csp.pairs='[attr obj,...]' scores any composition at eval"),
)

__all__ = [
    "CSPConfig",
    "CSPTask",
    "PromptModel",
    "SoftVocab",
    "VocabError",
    "encode_text_from_embeddings",
    "name_embeddings",
    "parse_pairs",
    "plugin",
    "predict_pairs",
]
