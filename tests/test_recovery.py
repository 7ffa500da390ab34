"""Recovery by distillation after pruning: the loss, the retrieval task's teacher, `vlkit prune recover_steps=N`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlkit.backbone import load_backbone
from vlkit.cli import main, resolve_config
from vlkit.compress.distill import DistillWeights, distillation_loss
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import evaluate, train
from vlkit.errors import VlkitError


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_loss_is_zero_for_the_teacher_itself_and_matches_a_hand_computation():
    img, txt = _unit(4, 8, 0), _unit(5, 8, 1)
    same = distillation_loss(img, txt, img, txt, 10.0)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-6)
    s_img, s_txt = _unit(4, 8, 2), _unit(5, 8, 3)
    got = distillation_loss(s_img, s_txt, img, txt, 10.0, DistillWeights(relation=2.0, feature=3.0))
    s, t = 10 * s_img @ s_txt.T, 10 * img @ txt.T

    def kl(a, b):  # rows of softmax(b) against softmax(a), by hand
        p, q = b.softmax(-1), a.softmax(-1)
        return (p * (p.log() - q.log())).sum(-1).mean()

    relation = 0.5 * (kl(s, t) + kl(s.T, t.T))
    feature = 0.5 * ((1 - (s_img * img).sum(-1)).mean() + (1 - (s_txt * txt).sum(-1)).mean())
    assert float(got["kd_relation"]) == pytest.approx(float(relation), rel=1e-5)
    assert float(got["kd_feature"]) == pytest.approx(float(feature), rel=1e-5)
    assert float(got["loss"]) == pytest.approx(float(2 * relation + 3 * feature), rel=1e-5)
    with pytest.raises(ValueError, match="differ in width"):
        distillation_loss(_unit(4, 6, 0), _unit(5, 6, 1), img, txt, 10.0)


def test_the_cross_term_reads_the_student_against_the_teachers_anchors_and_the_bank():
    img, txt, bank_img, bank_txt = _unit(4, 8, 0), _unit(5, 8, 1), _unit(6, 8, 4), _unit(7, 8, 5)
    weights = DistillWeights(relation=0.0, feature=0.0, cross=1.0)
    same = distillation_loss(img, txt, img, txt, 10.0, weights, bank_img, bank_txt)
    assert float(same["kd_cross"]) == pytest.approx(0.0, abs=1e-6)
    s_img, s_txt = _unit(4, 8, 2), _unit(5, 8, 3)
    got = distillation_loss(s_img, s_txt, img, txt, 10.0, weights, bank_img, bank_txt)
    anchors_t, anchors_i = torch.cat([txt, bank_txt]), torch.cat([img, bank_img])

    def kl(a, b):
        p, q = b.softmax(-1), a.softmax(-1)
        return (p * (p.log() - q.log())).sum(-1).mean()

    want = 0.5 * (kl(10 * s_img @ anchors_t.T, 10 * img @ anchors_t.T)
                  + kl(10 * s_txt @ anchors_i.T, 10 * txt @ anchors_i.T))
    assert float(got["kd_cross"]) == pytest.approx(float(want), rel=1e-5)
    assert float(got["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert "kd_cross" not in distillation_loss(s_img, s_txt, img, txt, 10.0)  # off by default


def test_block_outputs_are_recorded_only_while_asked_and_their_loss_is_relative():
    from vlkit.compress.distill import BlockOutputs, block_loss

    torch.manual_seed(0)
    bb = load_backbone("vlkit-tiny-test").eval()
    rec = BlockOutputs(bb.model)
    images, tokens = torch.randn(2, 3, bb.image_size, bb.image_size), bb.tokenize(["a red circle", "a square"])
    bb.encode_image(images)
    assert rec.take() == []  # not recording: nothing kept
    rec.recording = True
    bb.encode_image(images)
    bb.encode_text(tokens)
    outs = rec.take()
    layers = len(bb.model.visual.transformer.resblocks) + len(bb.model.transformer.resblocks)
    assert len(outs) == layers and rec.take() == []
    assert float(block_loss(outs, outs)) == 0.0
    assert float(block_loss([torch.zeros_like(o) for o in outs], outs)) == pytest.approx(1.0, rel=1e-5)
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])  # by hand: |a-b|^2 / |b|^2 = 8 / 25
    assert float(block_loss([a], [b])) == pytest.approx(8 / 25)
    with pytest.raises(ValueError, match="same blocks"):
        block_loss(outs[:-1], outs)
    rec.remove()
    rec.recording = True
    bb.encode_image(images)
    assert rec.take() == []  # the hooks are gone


TEACHER = "cached:vlkit-tiny-shapes"  # the shipped backbone: a dense model that knows the shapes world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery-world")
    generate_shapes(root, n_train=256, n_val=48, n_test=48, image_size=64, seed=2, n_czsl_per_pair=1,
                    progress=False, workers=1)
    return root


def _r1(metrics: dict) -> float:
    return (metrics["t2i_R@1"] + metrics["i2t_R@1"]) / 2


def _test_r1(world, model) -> float:
    plugin, cfg = resolve_config(["plugin=retrieval", f"model.name={model}", f"data.root={world}", "split=test",
                                  "train.progress=false"], name="eval")
    return _r1(evaluate(cfg, plugin)["test"])


@pytest.mark.slow  # multi-process or over ~15 s on two cores; CI runs it
def test_prune_then_recover_raises_recall_and_leaves_the_recovered_model_in_out(world, tmp_path):
    teacher = TEACHER
    dense = _test_r1(world, teacher)
    out = tmp_path / "pruned"
    assert main(["prune", f"model={teacher}", "method=magnitude", "flops=0.4", f"out={out}"]) == 0
    before = _test_r1(world, out)
    assert before < dense  # pruning cost recall
    recovered = tmp_path / "recovered"
    code = main(["prune", f"model={teacher}", "method=magnitude", "flops=0.4", f"out={recovered}",
                 "recover_steps=40", "recover_batch=32", "recover_lr=5e-4", f"recover_data={world}",
                 "recover_task_weight=0"])
    assert code == 0
    report = json.loads((recovered / "prune_report.json").read_text())
    after = _r1(report["recovery"]["test"])
    assert after > before + 5  # distillation alone (no labels) brings recall back
    assert load_backbone(recovered).pruned_spec() == load_backbone(out).pruned_spec()  # still the pruned shape
    assert (tmp_path / "recovered.recover" / "checkpoints" / "last").is_dir()  # a resumable run


def test_a_teacher_of_another_width_is_refused(world, tmp_path):
    plugin, cfg = resolve_config(["plugin=retrieval", "model=tiny-test", f"data.root={world}", "train.max_steps=1",
                                  f"retrieval.distill_from={TEACHER}", f"run.dir={tmp_path / 'r'}"])
    with pytest.raises(VlkitError, match="cannot teach"):
        train(cfg, plugin)


def test_recovery_of_an_already_pruned_model_names_its_teacher_and_takes_further_train_keys(world, tmp_path):
    """Pruning in stages: model= is the previous stage's output, recover_teacher= the original dense model;
    recover_train= adds `vlkit train` overrides that win over the recipe's."""
    first = tmp_path / "stage1"
    assert main(["prune", f"model={TEACHER}", "method=magnitude", "flops=0.8", f"out={first}"]) == 0
    second = tmp_path / "stage2"
    code = main(["prune", f"model={first}", "method=magnitude", "flops=0.8", f"out={second}", "recover_steps=2",
                 "recover_batch=8", f"recover_data={world}", f"recover_teacher={TEACHER}",
                 "recover_train=retrieval.distill_feature=3 optim.weight_decay=0"])
    assert code == 0
    cfg = (tmp_path / "stage2.recover" / "config.yaml").read_text()
    assert f"distill_from: {TEACHER}" in cfg and "distill_feature: 3.0" in cfg and "weight_decay: 0" in cfg
    assert "task_weight: 0.2" in cfg  # the default: the captions' own loss at a fifth beside the teacher's terms
    report = json.loads((second / "prune_report.json").read_text())
    dense = report["towers"]["image"]["flops_before_counted"]
    assert dense < json.loads((first / "prune_report.json").read_text())["towers"]["image"]["flops_before_counted"]
    assert report["recovery"]["steps"] == 2
