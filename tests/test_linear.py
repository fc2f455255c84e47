"""The linear probe (train/linear.py): train_linear on synthetic features, evaluate_linear's features, the config keys.

Oracles: separable features (top-1 100 %); labels independent of the features (chance, within a binomial bound
derived below); each head trained alone (a sweep must equal it); top-1 / top-5 counted directly from the returned
heads' fp64 logits; timm's own forward_features for the features evaluate_linear extracts. Tolerances: beside each.
"""
import math
import re

import pytest
import torch

from dinotron.train import linear
from dinotron.train.config import ConfigError, load_config
from dinotron.train.model import DinoV2
from helpers import tiny_config

LRS = [1e-3, 1e-2, 0.1]  # a subset of dinov2's grid


def clusters(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n features around `classes` fixed random centres (seed 0: the same centres in every split), labels uniform."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


def probe(x_train, y_train, x_val, y_val, **overrides):
    kw = dict(learning_rates=LRS, epochs=4, epoch_length=20, batch_size=64, cls_dim=x_train.shape[1] // 2, seed=0)
    return linear.train_linear(x_train, y_train, x_val, y_val, **{**kw, **overrides})


def test_separable_features_are_classified_exactly():
    # noise 0.1 around centres ~3 sqrt(dim) apart: every class is a linearly separable blob
    results, _ = probe(*clusters(400, 8, 32, 0.1, seed=1), *clusters(200, 8, 32, 0.1, seed=2))
    assert results["top1"] == 100.0 and results["top5"] == 100.0
    # dinov2's names, with the lr scaled to the batch: x 64 / 256
    assert set(results["classifiers"]) == {f"classifier_1_blocks_avgpool_{p}_lr_{lr / 4:g}".replace(".", "_")
                                           for p in (False, True) for lr in LRS}


def test_labels_independent_of_the_features_score_chance():
    """Val labels drawn uniformly, independently of everything the probe saw: each head's correct count is
    Binomial(M, 1/K) whatever it predicts, top-5's Binomial(M, 5/K). With M = 2000, K = 10 the top-1 sd is
    sqrt(M 0.1 0.9) = 13.4 samples (0.67 points), top-5's sqrt(M 0.25) = 22.4 (1.12 points). Bernstein's inequality,
    P(|X - mean| >= t) <= 2 exp(-t^2 / (2 (var + t / 3))), gives 3.0e-5 for t = 5 sd at top-1 and 1.8e-5 at top-5:
    <= 2.9e-4 that any of the 6 heads' 12 scores lies 5 sd or more from chance."""
    x_train, _ = clusters(2000, 10, 16, 1.0, seed=1)
    y_train = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(3))  # the train labels shuffled
    x_val, _ = clusters(2000, 10, 16, 1.0, seed=2)
    y_val = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(4))
    results, _ = probe(x_train, y_train, x_val, y_val)
    for scores in results["classifiers"].values():
        assert abs(scores["top1"] - 10.0) <= 5 * 0.67, scores
        assert abs(scores["top5"] - 50.0) <= 5 * 1.12, scores


def test_a_sweep_trains_each_head_as_alone():
    """One matmul over every head's weights vs a matmul per head: the same sums in another blocking order, a few
    fp32 ulps (1e-7 relative) per step; over 80 steps of a convex problem at these rates they stay below 1e-6
    absolute for weights of size ~1e-2..1e-1 (measured: 3e-8)."""
    data = (*clusters(300, 7, 16, 2.0, seed=1), *clusters(100, 7, 16, 2.0, seed=2))
    results, sweep = probe(*data)
    for lr in LRS:
        alone_results, alone = probe(*data, learning_rates=[lr])
        for name, head in alone.heads.items():
            torch.testing.assert_close(head.weight, sweep.heads[name].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(head.bias, sweep.heads[name].bias, rtol=1e-5, atol=1e-6)
            assert alone_results["classifiers"][name] == results["classifiers"][name]


def test_top1_top5_and_the_best_head_against_a_direct_count():
    x_train, y_train = clusters(300, 12, 16, 10.0, seed=1)  # overlapping classes: top-1 and top-5 below 100
    x_val, y_val = clusters(150, 12, 16, 10.0, seed=2)
    results, heads = probe(x_train, y_train, x_val, y_val)
    for columns, names in heads.feature_sets:
        for name in names:
            w, b = heads.heads[name].weight.double(), heads.heads[name].bias.double()
            logits = x_val[:, :columns].double() @ w.T + b
            rank = (logits > logits.gather(1, y_val[:, None])).sum(dim=1)  # classes scored above the label
            expected = {"top1": 100.0 * (rank < 1).sum().item() / 150, "top5": 100.0 * (rank < 5).sum().item() / 150}
            # results come from fp32 counts divided in fp32: 1e-4 points
            assert results["classifiers"][name] == pytest.approx(expected, abs=1e-4), name
    best = max(results["classifiers"].values(), key=lambda s: s["top1"])
    assert 0 < results["top5"] < 100 and results["top1"] == best["top1"] and results["top5"] == best["top5"]


def test_deterministic_given_the_seed():
    data = (*clusters(200, 5, 8, 2.0, seed=1), *clusters(50, 5, 8, 2.0, seed=2))
    (r1, h1), (r2, h2), (_, h3) = probe(*data), probe(*data), probe(*data, seed=1)
    assert r1 == r2
    assert all(torch.equal(p, q) for p, q in zip(h1.parameters(), h2.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(h1.parameters(), h3.parameters(), strict=True))


def test_the_global_rng_and_thread_count_are_left_alone(monkeypatch):
    threads, seen = torch.get_num_threads(), []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self: seen.append(torch.get_num_threads()) or real_step(self))
    torch.manual_seed(5)
    probe(*clusters(50, 3, 8, 1.0, seed=1), *clusters(20, 3, 8, 1.0, seed=2))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert set(seen) == {1} and len(seen) == 80 and torch.get_num_threads() == threads


X, Y = torch.randn(10, 8), torch.arange(10) % 3
BAD = {
    "rows": (dict(labels_train=Y[:9]), "labels_train has 9 entries for 10 rows of features_train"),
    "width": (dict(features_val=torch.randn(10, 6)), "features_val has 6 columns, features_train 8"),
    "labels-2d": (dict(labels_val=Y[:, None]), "labels_val must be a 1-D integer tensor"),
    "labels-float": (dict(labels_train=Y.float()), "labels_train must be a 1-D integer tensor"),
    "features-1d": (dict(features_train=torch.randn(10)), "features_train must be a 2-D floating tensor"),
    "negative": (dict(labels_val=Y - 1), "labels must be class ids >= 0, got -1"),
    "empty": (dict(features_val=X[:0], labels_val=Y[:0]), "features_val is empty"),
    "nan": (dict(features_train=X.clone().fill_(math.nan)), "hold NaN or inf"),
    "cls_dim": (dict(cls_dim=8), "cls_dim must be in [1, 7]"),
    "lrs": (dict(learning_rates=[0.1, 0.1]), "learning_rates must be distinct positive numbers"),
    "epochs": (dict(epochs=0), "epochs must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_are_named(case):
    change, message = case
    args = {**dict(features_train=X, labels_train=Y, features_val=X, labels_val=Y, learning_rates=LRS, epochs=1,
                   epoch_length=1, batch_size=4, cls_dim=4), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        linear.train_linear(**args)


def test_evaluate_linear_probes_the_teachers_cls_and_patch_mean(monkeypatch):
    """The features handed to train_linear are timm's forward_features (final norm) cls token and patch-token mean
    of the teacher backbone, in loader order (1e-5: the same fp32 ops, batched alike); the config's linear_* keys
    and train.seed reach it; the model's train mode is restored."""
    cfg = tiny_config("evaluation.knn_train_shards=[train]", "evaluation.knn_val_shards=[val]",
                      "evaluation.linear_learning_rates=[0.01, 0.1]", "evaluation.linear_epochs=2",
                      "evaluation.linear_epoch_length=3", "evaluation.linear_batch_size=4", "train.seed=7")
    model = DinoV2(cfg)
    g = torch.Generator().manual_seed(0)
    data = {split: [{"images": torch.randn(5, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (5,), generator=g)}
                    for _ in range(2)] for split in ("train", "val")}
    monkeypatch.setattr(linear, "build_eval_loader", lambda cfg, shards, rank, world: data[shards[0]])
    seen, real = {}, linear.train_linear
    monkeypatch.setattr(linear, "train_linear", lambda *a, **k: seen.update(args=a, kwargs=k) or real(*a, **k))
    model.train()
    results = linear.evaluate_linear(model, cfg, torch.device("cpu"))
    assert model.training and results["best_classifier"] in results["classifiers"] and "top5" not in results

    model.eval()
    with torch.no_grad():
        for i, split in enumerate(("train", "val")):
            tokens = model.teacher.backbone.vit.forward_features(torch.cat([b["images"] for b in data[split]]))
            expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
            torch.testing.assert_close(seen["args"][2 * i], expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(seen["args"][2 * i + 1], torch.cat([b["labels"] for b in data[split]]))
    assert seen["kwargs"] == dict(learning_rates=[0.01, 0.1], epochs=2, epoch_length=3, batch_size=4, cls_dim=32,
                                  seed=7)


@pytest.mark.parametrize("override, message", [
    ("evaluation.linear_epochs=0", "evaluation: linear_epochs must be >= 1, got 0"),
    ("evaluation.linear_batch_size=0", "evaluation: linear_batch_size must be >= 1, got 0"),
    ("evaluation.linear_learning_rates=[0.1, -1]", "evaluation: linear_learning_rates must be distinct positive"),
    ("evaluation.linear_learning_rates=[]", "evaluation: linear_learning_rates must be distinct positive"),
])
def test_config_keys_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
