"""vlkit csp plugin: compositional soft prompts (CSP), with CoOp and CLIP baselines, for compositional zero-shot learning."""

from __future__ import annotations

from vlkit.config import config_dir
from vlkit.plugins import Plugin
from vlkit_csp.config import METHODS, CSPConfig
from vlkit_csp.data import build_data
from vlkit_csp.model import PromptModel, encode_text_from_embeddings, predict_pairs
from vlkit_csp.task import CSPTask, after_fit, build_task, report
from vlkit_csp.vocab import SoftVocab, VocabError, name_embeddings, parse_pairs

# The model option configs/plugin/csp.yaml selects by default (a defaults-list override, so that
# `model=tiny-test` on the command line or in an experiment still wins). Registered here only while
# no configs/model/tiny-shapes.yaml exists.
DEFAULT_MODEL_OPTION = "tiny-shapes"
DEFAULT_MODEL = "cached:vlkit-tiny-shapes"


def _register_default_model() -> None:
    if (config_dir() / "model" / f"{DEFAULT_MODEL_OPTION}.yaml").is_file():
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="model", name=DEFAULT_MODEL_OPTION,
                                 node={"name": DEFAULT_MODEL, "pretrained": None})


_register_default_model()

plugin = Plugin(
    name="csp",
    config=CSPConfig,
    build_data=build_data,
    build_task=build_task,
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
