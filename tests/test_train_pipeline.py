"""The trainer through the real pipeline: DALI on CPU from shards, exact resume across an epoch end, k-NN."""
import pytest
import torch

from dinotron.pipeline import write_shards
from dinotron.train import checkpoint as ckpt
from dinotron.train.config import load_config
from dinotron.train.demo import write_texture_folder
from dinotron.train.loop import Trainer, evaluate_knn
from test_train_units import TINY


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    write_texture_folder(root / "images", n_per_class=2, size=40, seed=0)  # 10 classes x 2 = 20 images
    write_shards(root / "images", root / "shards", shard_size=8, prefix="train", progress=False)
    return sorted(str(p) for p in (root / "shards").glob("train-*.tar"))


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


def test_exact_resume_through_dali(tmp_path, shards):
    straight = Trainer(config(tmp_path / "a", shards, "train.max_steps=5"))
    straight.fit()
    Trainer(config(tmp_path / "b", shards, "train.max_steps=2")).fit()
    resumed = Trainer(config(tmp_path / "b", shards, "train.max_steps=5"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    assert straight.loader.state_dict()["epoch"] == 1, "the runs crossed an epoch end"
    for (name, a), b in zip(straight.model.teacher.state_dict().items(), resumed.model.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.model.dino_center, resumed.model.dino_center)


def test_knn_through_eval_loader(tmp_path, shards):
    cfg = config(tmp_path, shards)
    trainer = Trainer(cfg)
    with torch.no_grad():  # weights far from init, so that every image gets its own feature
        for p in trainer.model.teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    result = evaluate_knn(trainer.model, cfg, trainer.device)
    assert 0.0 <= result["top1"] <= 100.0 and 0.0 <= result["top5"] <= 100.0
    # memory bank == queries: with k=1 every image finds itself
    cfg.evaluation.k = 1
    assert evaluate_knn(trainer.model, cfg, trainer.device)["top1"] == 100.0
    assert ckpt.latest_checkpoint(tmp_path) is None
