"""Distillation: a frozen teacher of another architecture, loaded from a `dinotron export` folder with its heads.

Oracles: the exporting model itself (the loaded teacher's logits equal its teacher's, to fp32 rounding, 1e-5, and
its centres are copied exactly), the teacher's weights before a training step (exactly unchanged after it: no EMA,
no gradient), and the student's weights (they change).
"""
import pytest
import torch

from dinotron.train import loop
from dinotron.train.export import export_backbone
from dinotron.train.masking import masked_patch_indices
from dinotron.train.model import HEADS_FILE, DinoV2
from helpers import MemoryLoader, tiny_config

BIG = "model.timm_kwargs={embed_dim: 48, depth: 3, num_heads: 3, patch_size: 8}"


@pytest.fixture
def teacher_export(tmp_path):
    """A larger tiny model with non-trivial teacher weights and centres, exported."""
    cfg = tiny_config(BIG)
    model = DinoV2(cfg).eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.dino_center.normal_()
        model.ibot_center.normal_()
    return model, export_backbone(model, cfg, tmp_path / "teacher")


def _distilled(folder, *overrides):
    return tiny_config("distillation.enabled=true", f"distillation.teacher={folder}", *overrides)


def test_teacher_is_the_exported_model(teacher_export):
    source, folder = teacher_export
    model = DinoV2(_distilled(folder)).eval()
    assert model.teacher.backbone.vit.embed_dim == 48 and model.student.backbone.vit.embed_dim == 32
    images, masks = torch.randn(4, 3, 32, 32), torch.rand(4, 16) < 0.3
    idx = masked_patch_indices(masks)
    with torch.no_grad():
        for got, want in zip(model.teacher(images, masks, idx, mask_input=False),
                             source.teacher(images, masks, idx, mask_input=False), strict=True):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.dino_center, source.dino_center) and torch.equal(model.ibot_center, source.ibot_center)
    assert model.evaluated is model.student


def test_training_leaves_the_teacher_frozen(teacher_export, tmp_path, monkeypatch):
    _, folder = teacher_export
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader())
    cfg = _distilled(folder, "data.train_shards=[memory]", f"train.output_dir={tmp_path / 'run'}",
                     "train.max_steps=2", "train.progress=false", "train.parallel=none",
                     "data.batch_size_per_gpu=4", "optim.epochs=2", "optim.warmup_epochs=1", "train.epoch_length=2")
    trainer = loop.Trainer(cfg)
    teacher = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    trainer.fit()
    for k, v in trainer.model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    changed = [k for k, v in trainer.model.student.state_dict().items() if not torch.equal(v, student[k])]
    assert any(k.startswith("backbone.vit.blocks") for k in changed)
    exported = export_backbone(trainer.model, cfg, tmp_path / "student")
    assert '"student backbone (distilled)"' in (exported / "config.json").read_text()


def test_a_teacher_that_cannot_teach_is_refused(teacher_export, tmp_path):
    _, folder = teacher_export
    with pytest.raises(ValueError, match="centres are .* this student's"):
        DinoV2(_distilled(folder, "dino.head={n_prototypes: 32, hidden_dim: 32, bottleneck_dim: 16, nlayers: 3}"))
    with pytest.raises(ValueError, match="patch size 8, this student 4"):
        DinoV2(_distilled(folder, "model.timm_kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}"))
    (folder / HEADS_FILE).unlink()
    with pytest.raises(ValueError, match="not a `dinotron export` folder with heads"):
        DinoV2(_distilled(folder))
    with pytest.raises(ValueError, match="distillation.enabled needs distillation.teacher"):
        tiny_config("distillation.enabled=true")
