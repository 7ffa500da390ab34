"""The csp task: cross-entropy over the seen pairs for training, the standard CZSL evaluation (closed and open world)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlkit.backbone import Backbone
from vlkit.errors import VlkitError
from vlkit.metrics.czsl import (
    CZSLResult,
    ThresholdChoice,
    choose_threshold,
    evaluate,
    feasibility_scores,
    plot_curve,
)
from vlkit.plugins import DataBundle, settings
from vlkit_csp.config import CSPConfig, resolve_auto
from vlkit_csp.model import PromptModel
from vlkit_csp.vocab import Pair, clean_name, parse_pairs

# the scalar fields of a CZSL result that become metrics (the curves stay in task.results for plots)
SCALARS = ("AUC", "best_hm", "best_seen", "best_unseen", "hm_seen", "hm_unseen", "best_bias", "attr_acc",
           "obj_acc", "unbiased_seen", "unbiased_unseen")
CLIP_ONLY_EVAL = "csp.method=clip scores hand-written prompts and learns nothing"
EVAL_HINT = "evaluate it with `vlkit eval plugin=csp csp.method=clip` (add run.dir=DIR for the seen/unseen curves)"


class PairSpace:
    """Index bookkeeping: open-world pairs (every attr x obj, attribute-major), the closed-world pairs
    and the train/val/test pairs as [K, 2] (attr, obj) index tensors."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.attrs, self.objs = list(info["attrs"]), list(info["objs"])
        a_ix, o_ix = {a: i for i, a in enumerate(self.attrs)}, {o: i for i, o in enumerate(self.objs)}

        def index(pairs: list[Pair]) -> torch.Tensor:
            return torch.tensor([[a_ix[a], o_ix[o]] for a, o in pairs], dtype=torch.long).reshape(-1, 2)

        n_a, n_o = len(self.attrs), len(self.objs)
        self.open = torch.cartesian_prod(torch.arange(n_a), torch.arange(n_o))
        self.closed = index(info["pairs"])
        self.split = {s: index(info[f"{s}_pairs"]) for s in ("train", "val", "test")}
        self.closed_cols = self.flat(self.closed[:, 0], self.closed[:, 1])
        self.closed_col_of = torch.full((n_a * n_o,), -1, dtype=torch.long)  # open index -> closed column
        self.closed_col_of[self.closed_cols] = torch.arange(len(self.closed))

    def flat(self, attr: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
        return attr * len(self.objs) + obj


class CSPTask(nn.Module):
    """Trains a PromptModel on the seen pairs and evaluates it with the CZSL protocol of CSP's
    evaluate.py; ``results[split]`` keeps the full closed/open results (curves) for the plots."""

    def __init__(self, cfg: CSPConfig, backbone: Backbone, data: DataBundle, eval_batch_size: int = 256) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = PromptModel(backbone, data.info["attrs"], data.info["objs"], cfg.method, cfg.template,
                                 cfg.attr_dropout)
        self.space = PairSpace(data.info)
        train_col = torch.full((len(self.space.open),), -1, dtype=torch.long)
        train_col[self.space.flat(*self.space.split["train"].T)] = torch.arange(len(self.space.split["train"]))
        self.register_buffer("train_pairs", self.space.split["train"], persistent=False)
        self.register_buffer("train_col", train_col, persistent=False)
        self.eval_pairs = self.space.open if cfg.open_world else self.space.closed
        self.user_pairs = parse_pairs(cfg.pairs) if cfg.pairs else []
        # read by the engine (proposed): a task that only evaluates
        self.evaluation_only = CLIP_ONLY_EVAL if cfg.method == "clip" else None
        self._splits: dict[str, Dataset | None] = {"val": data.val, "test": data.test}
        self._collate, self._eval_batch_size = data.collate, eval_batch_size
        self._cache: dict[str, tuple[Any, torch.Tensor]] = {}
        self._threshold: tuple[Any, float] | None = None
        self._feasibility: torch.Tensor | None = None
        self.results: dict[str, dict[str, CZSLResult]] = {}
        self.pair_predictions: dict[str, list[dict[str, Any]]] = {}

    # ---- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.evaluation_only:
            raise VlkitError(f"{self.evaluation_only}; {EVAL_HINT}")
        with torch.no_grad():  # the image tower is frozen: no graph through it
            img = self.model.encode_images(batch["image"])
        text = self.model.pair_features(self.train_pairs[:, 0], self.train_pairs[:, 1], dropout=self.training)
        logits = self.model.logit_scale * img.to(text.dtype) @ text.T
        target = self.train_col[self.space.flat(batch["attr"], batch["obj"])]
        loss = F.cross_entropy(logits.float(), target)
        return {"loss": loss, "train_acc": (logits.argmax(dim=1) == target).float().mean().detach()}

    # ---- evaluation --------------------------------------------------------------------------
    def _version(self) -> tuple:
        """Changes whenever a soft parameter is modified (optimizer step, checkpoint load)."""
        return (self.model.template_ids.device,) + tuple((id(p), p._version) for p in self.model.soft_parameters())

    def _cached(self, name: str, compute) -> torch.Tensor:
        key = self._version()
        if name not in self._cache or self._cache[name][0] != key:
            self._cache[name] = (key, compute())
        return self._cache[name][1]

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.model.template_ids.device
        img = self.model.encode_images(batch["image"].to(dev))
        text = self._cached("pairs", lambda: self.model.all_pair_features(self.eval_pairs, self.cfg.text_batch_size))
        scale = self.model.logit_scale
        out = {"scores": (scale * img.to(text.dtype) @ text.T).float(), "attr": batch["attr"].to(dev),
               "obj": batch["obj"].to(dev), "index": batch["index"].to(dev)}
        if self.user_pairs:
            user = self._cached("user", lambda: self.model.named_pair_features(self.user_pairs))
            out["pair_scores"] = (scale * img.to(user.dtype) @ user.T).float()
        return out

    def compute_metrics(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        if split not in ("val", "test"):
            raise VlkitError(f"plugin csp evaluates split=val or split=test (unseen pairs live there), not {split!r}")
        sp = self.space
        attr, obj = outputs["attr"].long().cpu(), outputs["obj"].long().cpu()
        scores, gt = outputs["scores"].float().cpu(), sp.flat(attr, obj)
        closed_scores = scores[:, sp.closed_cols] if self.cfg.open_world else scores
        closed = evaluate(closed_scores, sp.closed, sp.split["train"], sp.split[split], attr, obj, sp.closed_col_of[gt])
        self.results[split] = {"closed": closed}
        metrics = {k: float(closed[k]) for k in SCALARS}
        if self.cfg.open_world:
            result, threshold = self._open_world(scores, attr, obj, split)
            self.results[split]["open"] = result
            metrics.update({f"open_{k}": float(result[k]) for k in SCALARS}, open_threshold=threshold)
        if "pair_scores" in outputs:
            metrics.update(self._report_pairs(outputs, split))
        return metrics

    def _open_world(self, scores: torch.Tensor, attr: torch.Tensor, obj: torch.Tensor,
                    split: str) -> tuple[CZSLResult, float]:
        """CSP's open world: every attr x obj is a candidate, minus unseen pairs whose feasibility is
        below a threshold chosen on val (max AUC), then applied unchanged to test."""
        sp, feas = self.space, self._feasibility_scores()
        if split == "val":
            choice = self._choose(scores, attr, obj)
            return choice.result, choice.threshold
        threshold = self._val_threshold()
        result = evaluate(scores, sp.open, sp.split["train"], sp.split[split], attr, obj, sp.flat(attr, obj),
                          open_world=True, feasible=feas >= threshold)
        return result, threshold

    def _choose(self, scores: torch.Tensor, attr: torch.Tensor, obj: torch.Tensor) -> ThresholdChoice:
        sp = self.space
        choice = choose_threshold(scores, sp.open, sp.split["train"], sp.split["val"], attr, obj, sp.flat(attr, obj),
                                  self._feasibility_scores(), n_thresholds=self.cfg.n_thresholds)
        self._threshold = (self._version(), choice.threshold)
        return choice

    def _val_threshold(self) -> float:
        """The threshold chosen on val for the current vocabulary; scores val first if it was not
        evaluated since the last change (e.g. `vlkit eval split=test`)."""
        if self._threshold is None or self._threshold[0] != self._version():
            out = self._predict("val")
            self._choose(out["scores"].float().cpu(), out["attr"].long().cpu(), out["obj"].long().cpu())
        return self._threshold[1]

    @torch.no_grad()
    def _predict(self, split: str) -> dict[str, torch.Tensor]:
        dataset = self._splits.get(split)
        if dataset is None:
            raise VlkitError("open-world evaluation picks its feasibility threshold on val, and there is no val split; "
                             "set csp.open_world=false")
        loader = DataLoader(dataset, batch_size=self._eval_batch_size, collate_fn=self._collate)
        outs = [self.eval_step(batch) for batch in loader]
        return {k: torch.cat([o[k] for o in outs]) for k in ("scores", "attr", "obj")}

    @torch.no_grad()
    def _feasibility_scores(self) -> torch.Tensor:
        """CompCos feasibility from the backbone's own text embeddings of "a photo of <word>" (the
        prompt of CSP's clip_embeddings); the backbone is frozen, so computed once."""
        if self._feasibility is None:
            bb, bs = self.model.backbone, self.cfg.text_batch_size

            def embed(words: list[str]) -> torch.Tensor:
                tokens = bb.tokenize([f"{self.cfg.template} {clean_name(w)}".strip() for w in words])
                return torch.cat([bb.encode_text(t.to(bb.device)).float().cpu() for t in tokens.split(bs)])

            sp = self.space
            self._feasibility = feasibility_scores(embed(sp.attrs), embed(sp.objs), sp.open, sp.split["train"])
        return self._feasibility

    def _report_pairs(self, outputs: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Per-image top prediction among the csp.pairs (printed, kept for a CSV), and the accuracy on
        the images whose true pair is one of them."""
        scores, index = outputs["pair_scores"].float().cpu(), outputs["index"].cpu()
        probs = scores.softmax(dim=1)
        names = [f"{a} {o}" for a, o in self.user_pairs]
        dataset, sp = self._splits[split], self.space
        rows = []
        for i in range(len(index)):
            gt = f"{sp.attrs[int(outputs['attr'][i])]} {sp.objs[int(outputs['obj'][i])]}"
            top = int(probs[i].argmax())
            rows.append({"image": dataset.image_name(int(index[i])), "true": gt, "top": names[top],
                         "p_top": float(probs[i, top]), **{n: float(scores[i, j]) for j, n in enumerate(names)}})
        self.pair_predictions[split] = rows
        _print_pairs(rows, names, self.model.unknown_words(self.user_pairs), self.cfg.show, split)
        hits = [r["top"] == r["true"] for r in rows if r["true"] in names]
        return {"pairs_n_images": float(len(hits)), **({"pairs_acc": sum(hits) / len(hits)} if hits else {})}


def _print_pairs(rows: list[dict[str, Any]], names: list[str], unknown: list[str], show: int, split: str) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return  # every process computes the same metrics; one prints
    print(f"csp.pairs on {split}: {len(rows)} images scored against {', '.join(names)}", flush=True)
    if unknown:
        print(f"  (not in the learned vocabulary, pretrained embeddings used: {', '.join(unknown)})")
    for r in rows[:show]:
        print(f"  {r['image']:<40} true: {r['true']:<20} top: {r['top']:<20} p={r['p_top']:.3f}")


def build_task(cfg: DictConfig, backbone: Backbone, data: DataBundle) -> CSPTask:
    if "attrs" not in data.info:
        raise VlkitError("plugin csp's task needs the data from its own build_data (attrs, objs, pair splits in info)")
    csp = settings(cfg, CSPConfig, "csp")
    csp.split_name, csp.template = resolve_auto(csp, cfg.data.name)
    return CSPTask(csp, backbone, data, cfg.train.eval_batch_size)


def report(cfg: DictConfig, task: CSPTask, out_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """After training and after eval: the seen/unseen curve per evaluated split and world (best-HM
    point marked), and the csp.pairs predictions as CSV; returns where they went."""
    out_dir, method = Path(out_dir), task.cfg.method
    written: dict[str, str] = {}
    for split, worlds in task.results.items():
        for world, result in worlds.items():
            path = plot_curve(result, out_dir / f"czsl_{split}_{world}.png", title=f"{method}: {split}, {world} world")
            written[f"curve_{split}_{world}"] = str(path)
    for split, rows in task.pair_predictions.items():
        path = out_dir / f"pairs_{split}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written[f"pairs_{split}"] = str(path)
    return {"report": written}


def after_fit(cfg: DictConfig, task: CSPTask, run_dir: str | Path, metrics: dict[str, Any],
              backbone: Backbone) -> dict[str, Any]:
    """After training: the learned vocabulary (all that was trained) as <run>/vocab, loadable with
    SoftVocab.load(path, backbone)."""
    if task.cfg.method == "clip":
        return {}
    return {"vocab": str(task.model.vocab().save(Path(run_dir) / "vocab"))}
