"""The csp plugin: soft-prompt initialisation, the embedding-path text encoder, training, the vocabulary file, the engine path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlkit.backbone import load_backbone
from vlkit.cli import resolve_config
from vlkit.config import ConfigError
from vlkit.data.shapes import generate_shapes
from vlkit.engine.run import build, evaluate, train
from vlkit.errors import VlkitError
from vlkit.plugins import get_plugin
from vlkit_csp import PromptModel, SoftVocab, VocabError, encode_text_from_embeddings, predict_pairs


@pytest.fixture(scope="session")
def czsl_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n_train=4, n_val=4, n_test=4, image_size=32, n_czsl_per_pair=4, progress=False)
    return out / "czsl"  # 18 train pairs x 4 images; val/test: 6 seen + 6 unseen pairs x 4 images


def _args(root, *extra):
    return ["plugin=csp", "model=tiny-test", "data=czsl", f"data.root={root}", "train.progress=false",
            "train.batch_size=24", "train.eval_batch_size=64", *extra]


@pytest.fixture
def built(czsl_root):
    """(backbone, data, task) of the default csp config on the tiny world, without dropout."""
    plugin, cfg = resolve_config(_args(czsl_root, "csp.attr_dropout=0.0"))
    return build(cfg, plugin)


def _tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("vlkit-tiny-test")


def test_csp_init_is_the_mean_token_embedding():
    bb = _tiny_backbone()
    table = bb.model.token_embedding.weight
    model = PromptModel(bb, ["striped", "checkered"], ["circle"], method="csp")
    striped, circle = int(bb.tokenize(["striped"])[0, 1]), int(bb.tokenize(["circle"])[0, 1])
    assert torch.equal(model.attr_emb[0], table[striped]) and torch.equal(model.obj_emb[0], table[circle])
    ids = bb.tokenize(["checkered"])[0]
    pieces = ids[1:int(ids.argmax())]
    assert len(pieces) == 2  # a two-token name: its vector is the mean of both
    torch.testing.assert_close(model.attr_emb[1], table[pieces].mean(dim=0))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["attr_emb", "obj_emb"]


def test_coop_learns_the_context_and_freezes_the_words():
    bb = _tiny_backbone()
    model = PromptModel(bb, ["striped"], ["circle"], method="coop")
    ctx_ids = bb.tokenize(["a photo of"])[0, 1:4]
    assert torch.equal(model.ctx, bb.model.token_embedding.weight[ctx_ids])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["ctx"]


def test_embedding_path_equals_encode_text():
    clip = _tiny_backbone().model
    ids = load_backbone("vlkit-tiny-test").tokenize(["a photo of striped circle", "dotted star", ""])
    for normalize in (False, True):
        got = encode_text_from_embeddings(clip, clip.token_embedding(ids), ids, normalize=normalize)
        assert torch.equal(got, clip.encode_text(ids, normalize=normalize))


def test_soft_words_sit_just_before_end_of_text():
    bb = _tiny_backbone()
    model = PromptModel(bb, ["striped"], ["circle"], method="csp")  # one-token names: init == hard tokens
    soft = model.pair_features(torch.tensor([0]), torch.tensor([0]))
    hard = bb.encode_text(bb.tokenize(["a photo of striped circle"]), normalize=True)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)


def test_only_the_soft_vocabulary_gets_gradients(built):
    backbone, data, task = built
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=8)))
    task(batch)["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    grads = [task.model.attr_emb.grad, task.model.obj_emb.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_attr_dropout_drops_attribute_and_object_words_only_in_training():
    model = PromptModel(_tiny_backbone(), ["striped", "dotted"], ["circle", "star"], attr_dropout=0.5)
    attr, obj = model.word_vectors(dropout=True)
    assert (attr == 0).any() and (obj == 0).any()  # CSP drops the whole soft vocabulary
    kept = attr != 0
    torch.testing.assert_close(attr[kept], 2 * model.attr_emb[kept])  # rescaled by 1 / (1 - p)
    assert all(torch.equal(a, b) for a, b in zip(model.word_vectors(dropout=False), (model.attr_emb, model.obj_emb)))


def test_a_few_steps_lower_the_loss(built):
    _, data, task = built
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=8, shuffle=True,
                                                  generator=torch.Generator().manual_seed(0))))
    opt = torch.optim.Adam(task.model.soft_parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0], losses  # about 2.7 -> 2.0 on the random tiny-test backbone


def test_vocab_round_trip_and_wrong_backbone(built, tmp_path):
    backbone, data, task = built
    with torch.no_grad():
        for p in task.model.soft_parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = task.model.vocab().save(tmp_path / "vocab")
    meta = json.loads((path / "vocab.json").read_text())
    assert meta["method"] == "csp" and meta["backbone"] == backbone.identity and meta["attrs"] == task.space.attrs
    images = torch.stack([data.test[i]["image"] for i in range(6)])
    pairs = ["striped circle", "dotted star", "checkered ring"]
    before = predict_pairs(images, pairs, task.model.vocab(), backbone)
    after = predict_pairs(images, pairs, SoftVocab.load(path, backbone), backbone)
    assert torch.equal(before, after)
    other = _tiny_backbone(seed=1)
    with pytest.raises(VocabError, match=f"trained on backbone {backbone.identity}, got {other.identity}"):
        SoftVocab.load(path, other)


def test_predict_pairs_without_vocab_is_clip(built):
    backbone, data, _ = built
    images = torch.stack([data.val[i]["image"] for i in range(3)])
    got = predict_pairs(images, "striped circle, wavy star", None, backbone)
    text = backbone.encode_text(backbone.tokenize(["a photo of striped circle", "a photo of wavy star"]))
    torch.testing.assert_close(got, backbone.logit_scale * backbone.encode_image(images) @ text.T)


def test_plugin_loads_by_name_and_composes_config():
    plugin = get_plugin("csp")
    assert plugin.name == "csp" and plugin.after_fit is not None and plugin.report is not None
    _, cfg = resolve_config(["plugin=csp"])
    assert cfg.model.name == "cached:vlkit-tiny-shapes" and cfg.csp.method == "csp" and cfg.train.best_metric == "AUC"
    _, cfg = resolve_config(["plugin=csp", "model=tiny-test", "csp.method=coop", "csp.pairs=[striped circle,dotted star]"])
    assert cfg.model.name == "vlkit-tiny-test" and cfg.csp.method == "coop" and list(cfg.csp.pairs) == ["striped circle", "dotted star"]
    with pytest.raises(ConfigError, match="csp.method"):
        resolve_config(["plugin=csp", "csp.metod=coop"])
    plugin, cfg = resolve_config(["plugin=csp", "model=tiny-test", "csp.method=cspp"])
    with pytest.raises(ConfigError, match="choose one of csp, coop, clip"):
        plugin.build_data(cfg, None)  # before any data is generated


def test_eval_clip_reports_closed_and_open_world(czsl_root, tmp_path):
    plugin, cfg = resolve_config(_args(czsl_root, "csp.method=clip", f"run.dir={tmp_path}",
                                       "csp.pairs=[striped circle,dotted star,wavy star]"), name="eval")
    metrics = evaluate(cfg, plugin)["test"]
    for key in ("AUC", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc", "open_AUC", "open_best_hm"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["pairs_n_images"] == 4  # the 4 test images of 'dotted star' (an unseen test pair)
    for name in ("czsl_test_closed.png", "czsl_test_open.png", "pairs_test.csv", "eval_test.json"):
        assert (tmp_path / name).is_file(), name
    _, _, task = build(cfg, plugin)
    with pytest.raises(VlkitError, match="vlkit eval plugin=csp csp.method=clip"):
        task({"image": torch.zeros(1, 3, 32, 32)})


def test_train_saves_only_the_vocabulary_and_eval_reproduces_it(czsl_root, tmp_path):
    run = tmp_path / "run"
    plugin, cfg = resolve_config(_args(czsl_root, "train.epochs=1", "train.best_metric=", f"run.dir={run}"))
    metrics = train(cfg, plugin)
    assert set(load_file(str(run / "checkpoints/last/task.safetensors"))) == {"model.attr_emb", "model.obj_emb"}
    for name in ("vocab/vocab.safetensors", "czsl_val_closed.png", "czsl_test_open.png", "metrics.json"):
        assert (run / name).is_file(), name
    plugin, cfg = resolve_config(_args(czsl_root, f"checkpoint={run}"), name="eval")
    again = evaluate(cfg, plugin)["test"]
    assert again["AUC"] == metrics["test"]["AUC"] and again["open_AUC"] == metrics["test"]["open_AUC"]
