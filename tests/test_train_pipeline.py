"""The trainer through the real pipeline: DALI on CPU from shards, exact resume across an epoch end, k-NN.

Oracles: an uninterrupted run (resume, bit for bit); for k-NN, features extracted with a plain torch loop
from `helpers.eval_oracle` images (PIL + torchvision, no dinotron pipeline) and dinov2's weighted k-NN
written as float64 loops, compared for equality of top-1 / top-5. DALI cases are `requires_dali` and
assert the backend the trainer got, so a torchvision fallback cannot pass for them.
"""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dinotron.pipeline import DaliNotInstalledError, MultiCropConfig, dali_loader, write_shards
from dinotron.train import checkpoint as ckpt
from dinotron.train.config import load_config
from dinotron.train.demo import write_texture_folder
from dinotron.train.loop import Trainer, build_eval_loader, build_train_loader, evaluate_knn
from helpers import TINY, eval_oracle, requires_dali

# Loader cases: DALI skips where it is not installed; each asserts the backend that ran.
LOADERS = [pytest.param("dali", marks=requires_dali), "torchvision"]
BACKEND = {"dali": "dali-cpu", "torchvision": "torchvision"}


def write_split(root, name: str, seed: int) -> list[str]:
    write_texture_folder(root / name, n_per_class=2, size=40, seed=seed)  # 10 classes x 2 = 20 images
    write_shards(root / name, root / "shards", shard_size=8, prefix=name, progress=False)
    return sorted(str(p) for p in (root / "shards").glob(f"{name}-*.tar"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("textures"), "train", seed=0)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("textures-val"), "val", seed=1)


def config(out, shards, *overrides):
    return load_config(
        None,
        TINY
        + [
            f"train.output_dir={out}",
            f"data.train_shards={shards}",
            f"evaluation.knn_train_shards={shards}",
            f"evaluation.knn_val_shards={shards}",
            "evaluation.image_size=32",
            "evaluation.resize_size=36",
            "evaluation.batch_size=8",
            "data.batch_size_per_gpu=6",  # 20 images: 3 batches per epoch, the last 2 images dropped
            "data.device=cpu",
            "data.num_threads=1",
            "train.epoch_length=4",
            "optim.epochs=2",
            "optim.warmup_epochs=1",
            "teacher.warmup_teacher_temp_epochs=1",
            "train.checkpoint_every=4",
            "train.progress=false",
        ]
        + list(overrides),
    )


@requires_dali
def test_exact_resume_through_dali(tmp_path, shards, caplog):
    caplog.set_level(logging.INFO, logger="dinotron")
    straight = Trainer(config(tmp_path / "a", shards, "train.max_steps=5"))
    straight.fit()
    Trainer(config(tmp_path / "b", shards, "train.max_steps=2")).fit()
    resumed = Trainer(config(tmp_path / "b", shards, "train.max_steps=5"), resume=True)
    assert straight.loader.backend == resumed.loader.backend == "dali-cpu"
    backends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train loader:")]
    assert backends == ["train loader: dali-cpu (MultiCropLoader, 3 batches per epoch per rank)"] * 3
    assert resumed.step == 2
    resumed.fit()
    assert straight.loader.state_dict()["epoch"] == 1, "the runs crossed an epoch end"
    for (name, a), b in zip(straight.model.teacher.state_dict().items(), resumed.model.teacher.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.model.dino_center, resumed.model.dino_center)


def knn_oracle(train_f, train_l, val_f, val_l, k: int, temperature: float) -> dict[str, float]:
    """dinov2's weighted k-NN in float64 loops: each of the k most cosine-similar memory features votes for its
    label with exp(similarity / temperature); top-1 / top-5 = % of queries whose label ranks first / in the five."""
    train_f, val_f = train_f.double().tolist(), val_f.double().tolist()
    n_classes = max(train_l.tolist() + val_l.tolist()) + 1
    top1 = top5 = 0
    for q, truth in zip(val_f, val_l.tolist(), strict=True):
        sims = sorted(((sum(a * b for a, b in zip(q, f, strict=True)), int(label))
                       for f, label in zip(train_f, train_l.tolist(), strict=True)), reverse=True)
        votes = [0.0] * n_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        assert sum(v > 0 for v in votes) >= 5, "fewer than 5 classes voted: top-5 would be a tie-break"
        ranked = sorted(range(n_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == truth
        top5 += truth in ranked[:5]
    return {"top1": 100.0 * top1 / len(val_f), "top5": 100.0 * top5 / len(val_f)}


@pytest.mark.parametrize("loader", LOADERS)
def test_knn_through_eval_loader(loader, tmp_path, shards, val_shards):
    # k = 12 of 20 memory images, 2 per class: at least 6 classes vote, so top-5 is never a tie-break.
    cfg = config(tmp_path, shards, f"data.loader={loader}", f"evaluation.knn_val_shards={val_shards}",
                 "evaluation.k=12")
    assert build_eval_loader(cfg, shards, 0, 1).backend == BACKEND[loader]
    trainer = Trainer(cfg)
    assert trainer.loader.backend == BACKEND[loader]
    with torch.no_grad():  # weights far from init, so that every image gets its own feature
        for p in trainer.model.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    result = evaluate_knn(trainer.model, cfg, trainer.device)

    backbone, ev = trainer.model.teacher.backbone.eval(), cfg.evaluation
    features = {}
    for split, paths in (("train", shards), ("val", val_shards)):
        images, labels = eval_oracle(paths, ev.image_size, ev.resize_size, MultiCropConfig.mean, MultiCropConfig.std)
        with torch.no_grad():
            cls = torch.cat([backbone(images[i:i + 4]).cls for i in range(0, len(images), 4)])
        features[split] = (F.normalize(cls, dim=-1), labels)
    expected = knn_oracle(*features["train"], *features["val"], k=ev.k, temperature=ev.temperature)
    assert result == expected
    # memory bank == queries: with k=1 every image finds itself
    cfg.evaluation.k, cfg.evaluation.knn_val_shards = 1, shards
    assert evaluate_knn(trainer.model, cfg, trainer.device)["top1"] == 100.0
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_trainer_names_the_fix_without_dali(tmp_path, shards, monkeypatch):
    """data.loader=dali where DALI is missing: an error naming the config key, never a silent fallback."""
    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    cfg = config(tmp_path, shards)
    fix = r"^data\.loader=dali needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130, or set " \
          r"data\.loader=torchvision$"
    with pytest.raises(DaliNotInstalledError, match=fix):
        build_train_loader(cfg, 0, 1)
    with pytest.raises(DaliNotInstalledError, match=fix):
        build_eval_loader(cfg, shards, 0, 1)
    cfg.data.loader = "torchvision"
    assert build_train_loader(cfg, 0, 1).backend == build_eval_loader(cfg, shards, 0, 1).backend == "torchvision"
