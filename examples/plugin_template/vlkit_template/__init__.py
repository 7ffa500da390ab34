"""vlkit-plugin-template: a whole vlkit plugin in one file, to copy and rename.

The task: name the colour (or the shape) of the single object in an image of vlkit's shapes world. The
backbone stays frozen; a linear classifier on its image embeddings is trained, starting from CLIP's zero-shot
classifier (one row per class: the text embedding of a caption naming it). At step 0 the run therefore scores
exactly what zero-shot CLIP scores; training can only add what the labels teach.

Reading order: config schema -> data -> task -> hooks -> the ``Plugin`` record (what the entry point names)
-> an optional CLI command. docs/writing-a-plugin.md in the vlkit repository walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vlkit.cli.common import Command, kv_help
from vlkit.config import ConfigError, one_of
from vlkit.plugins import DataBundle, Plugin, settings

NAME = "template"  # the plugin's name: `plugin=template` and the config section `template.*`
TARGETS = ("color", "shape")


# ---- 1. the config schema: every key of `template.*`, typed, with its default ---------------------------
# vlkit checks command-line keys against it (a typo fails before any work) and `vlkit train --help
# plugin=template` lists it. The YAML file configs/plugin/template.yaml may set other defaults.
@dataclass
class TemplateConfig:
    # what to name: the object's "color" (8 classes) or its "shape" (6 classes); one_of makes vlkit refuse any
    # other value before any work (bounded(default, low) does the same for a number's lowest value)
    target: str = one_of("color", *TARGETS)
    # the caption whose text embedding starts each class's row of the classifier; {color} and {shape} are
    # filled in, and the attribute that is not the target is averaged over (a prompt ensemble)
    prompt: str = "there is one {color} {shape} in the image"
    # true: keep the zero-shot classifier as it is (the task then has nothing to learn; `vlkit train`
    # only evaluates it)
    zero_shot_only: bool = False


# ---- 2. data: the shapes world's single-object "colour" split, labelled by the target --------------------
class Labelled(Dataset):
    """Items ``{"image": FloatTensor[3,S,S], "label": int}`` of one split (an evenly spread subset when
    ``limit`` is set: the files are grouped by class, so a prefix would hold only a few classes)."""

    def __init__(self, base: Any, field: str, limit: int = 0) -> None:
        self.base, self.field = base, field
        n = len(base)
        self.indices = list(range(n)) if not limit or limit >= n else [i * n // limit for i in range(limit)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[self.indices[i]]
        return {"image": item["image"], "label": item[self.field]}


def build_data(cfg, backbone) -> DataBundle:
    """Hook ``build_data(cfg, backbone) -> DataBundle``. The world is generated once into vlkit's cache with
    the ``data.*`` parameters (experiment=smoke makes it small); its ``czsl/`` folder holds single-object
    images with their colour and shape."""
    from vlkit.cache import ensure_shapes
    from vlkit.data.czsl import CZSLDataset
    from vlkit.data.shapes import CZSL_COLOUR_SPLIT

    opts = settings(cfg, TemplateConfig)  # the one way to read the plugin's section: a typed instance
    if cfg.data.name != "shapes":
        raise ConfigError(f"plugin {NAME!r} reads the generated shapes world (data=shapes), not data={cfg.data.name}")
    root = ensure_shapes(cfg.data) / "czsl"
    field = "attr" if opts.target == "color" else "obj"  # in this split the attribute is the colour

    def split(name: str, limit: int) -> Labelled:
        # backbone.preprocess: PIL image -> the tensor the backbone expects (preprocess_train augments)
        base = CZSLDataset(root, name, backbone.preprocess, split_name=CZSL_COLOUR_SPLIT)
        return Labelled(base, field, limit)

    train = split("train", cfg.data.limit_train)
    base = train.base
    classes, others = (base.attrs, base.objs) if opts.target == "color" else (base.objs, base.attrs)
    # no collate: torch's default stacks the images and the labels. `info` reaches build_task.
    return DataBundle(train=train, val=split("val", cfg.data.limit_eval), test=split("test", cfg.data.limit_eval),
                      info={"classes": list(classes), "others": list(others)})


# ---- 3. the task: what the engine trains (forward) and evaluates (eval_step, compute_metrics) --------------
@torch.no_grad()
def zero_shot_weights(backbone, target: str, classes: list[str], others: list[str], prompt: str) -> torch.Tensor:
    """[C, D] unit rows: for each class, the mean text embedding of the prompt naming it with every value of
    the other attribute ("... one red circle ...", "... one red square ...")."""
    rows = []
    for name in classes:
        texts = [prompt.format(**{target: name, TARGETS[1 - TARGETS.index(target)]: other}) for other in others]
        emb = backbone.encode_text(backbone.tokenize(texts).to(backbone.device), normalize=True)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


class ProbeTask(nn.Module):
    """A linear classifier on frozen, normalised image embeddings, initialised as CLIP's zero-shot one:
    ``logits = scale * <image, row_c> + bias_c`` with ``row_c`` the text embedding of class c and ``scale`` the
    backbone's logit scale. The rows and the biases learn; at step 0 it is exactly zero-shot CLIP."""

    def __init__(self, backbone, opts: TemplateConfig, classes: list[str], others: list[str]) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)  # frozen: checkpoints then hold only the classifier
        self.classes = classes
        text = zero_shot_weights(backbone, opts.target, classes, others, opts.prompt)
        learn = not opts.zero_shot_only
        self.weight = nn.Parameter(text.clone(), requires_grad=learn)
        self.bias = nn.Parameter(torch.zeros(len(classes)), requires_grad=learn)
        # buffers move with the module (.to(device)); persistent=False: derived from the backbone, never saved
        self.register_buffer("scale", backbone.logit_scale.detach().clone(), persistent=False)
        self.register_buffer("zero_shot", text, persistent=False)  # the untouched start, for comparison
        # the Task protocol's optional attribute: a reason here makes `vlkit train` evaluate only
        self.evaluation_only = None if learn else "template.zero_shot_only=true keeps the zero-shot classifier"

    def train(self, mode: bool = True) -> ProbeTask:
        super().train(mode)
        self.backbone.eval()  # a frozen backbone stays in eval mode (dropout off) while the classifier trains
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # nothing flows back into the backbone
            return self.backbone.encode_image(images, normalize=True)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * feats @ self.weight.T + self.bias

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training step: a dict with the scalar ``loss``; other scalars are logged (train_log.jsonl)."""
        logits = self.logits(self.embed(batch["image"]))
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "acc": (logits.argmax(-1) == batch["label"]).float().mean()}

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample tensors (first dim = batch): the engine gathers them over processes and concatenates."""
        feats = self.embed(batch["image"])
        return {"pred": self.logits(feats).argmax(-1), "zero_shot_pred": (feats @ self.zero_shot.T).argmax(-1),
                "label": batch["label"]}

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Metrics of a whole split. ``chance`` is the majority class's share: what ignoring the image scores."""
        label = outputs["label"]
        return {"acc": float((outputs["pred"] == label).float().mean()),
                "zero_shot_acc": float((outputs["zero_shot_pred"] == label).float().mean()),
                "chance": float(torch.bincount(label, minlength=len(self.classes)).max() / label.numel()),
                "n": int(label.numel())}


def build_task(cfg, backbone, data: DataBundle) -> ProbeTask:
    """Hook ``build_task(cfg, backbone, data) -> Task``."""
    return ProbeTask(backbone, settings(cfg, TemplateConfig), data.info["classes"], data.info["others"])


# ---- 4. an optional hook: report(cfg, task, out_dir, metrics) after training and after `vlkit eval` -------
def report(cfg, task, out_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A small Markdown table next to metrics.json; the returned keys are added to metrics.json."""
    rows = [f"| {split} | {m['acc']:.3f} | {m['zero_shot_acc']:.3f} | {m['chance']:.3f} | {m['n']} |"
            for split, m in metrics.items() if isinstance(m, dict) and "zero_shot_acc" in m]
    path = Path(out_dir) / "template_summary.md"
    path.write_text("| split | accuracy | zero-shot | chance | images |\n|---|---|---|---|---|\n"
                    + "\n".join(rows) + "\n")
    return {"summary": str(path)}


# ---- 5. the record the entry point `template = "vlkit_template:plugin"` names -----------------------------
plugin = Plugin(
    name=NAME,
    config=TemplateConfig,
    build_data=build_data,
    build_task=build_task,
    report=report,
    backbones=("clip",),       # open_clip backbones (encode_image / encode_text / tokenize / logit_scale)
    headline_metric="acc",     # the val metric that picks the 'best' checkpoint and leads summaries
    configs=str(Path(__file__).parent / "configs"),  # configs/plugin/template.yaml: the defaults
    description="name the colour (or shape) of a shapes-world object: a zero-shot-initialised linear probe "
                "on frozen image embeddings; accuracy against chance and against zero-shot",
)


# ---- 6. optional: a `vlkit zeroshot` command (entry-point group vlkit.commands) ---------------------------
@dataclass
class ZeroShotArgs:
    image: str = ""
    model: str = "cached:vlkit-tiny-shapes"
    target: str = one_of("color", *TARGETS)
    prompt: str = TemplateConfig.prompt


def _zeroshot(args: list[str]) -> int:
    from vlkit.cli.common import load_model_arg
    from vlkit.config import parse_kv
    from vlkit.data.images import load_image
    from vlkit.data.shapes import COLORS, SHAPES

    opts = parse_kv(args, ZeroShotArgs)  # typed key=value arguments; unknown keys fail with did-you-mean
    if not opts.image:
        raise ConfigError("vlkit zeroshot needs image=PATH")
    backbone = load_model_arg(opts.model).eval()
    classes, others = (list(COLORS), list(SHAPES)) if opts.target == "color" else (list(SHAPES), list(COLORS))
    text = zero_shot_weights(backbone, opts.target, classes, others, opts.prompt)
    with torch.no_grad():
        feats = backbone.encode_image(backbone.preprocess(load_image(opts.image))[None], normalize=True)
        probs = (backbone.logit_scale * feats @ text.T).softmax(-1)[0]
    for p, k in zip(*probs.topk(3)):
        print(f"{classes[int(k)]:8s} {float(p):.3f}")
    return 0


ZEROSHOT = Command(_zeroshot, "zero-shot colour or shape of one image: vlkit zeroshot image=PATH [model=...] "
                              "[target=color|shape]", lambda args: kv_help("zeroshot", ZeroShotArgs))
