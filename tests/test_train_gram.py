"""Gram anchoring in the trainer (gram.*): when the Gram teacher is loaded, and what the loss adds.

Oracles: dinov3's train loop's Gram-teacher updates transcribed (dinov3/train/train.py: the load at
it_load_ema_teacher, then an update after iteration `it` when (it + 1) >= it_first_update, (it + 1) % update_frequency
== 0 and fewer than max_updates were made), dinov3's loss written plainly (kernels/reference.py's gram_loss, itself
tested against dinov3's GramLoss in tests/test_gram.py), and the EMA teacher's weights (the Gram teacher equals them
exactly right after a load). fp32 on CPU: 1e-5 relative for the loss.
"""
import pytest
import torch

from dinotron.kernels import reference
from dinotron.train import loop
from dinotron.train.config import GramConfig
from dinotron.train.masking import masked_patch_indices
from helpers import MemoryLoader, tiny_config, tiny_model_off_init


def dinov3_load_steps(g: GramConfig, n_steps: int) -> set[int]:
    """The steps before which dinov3 (re)loads its Gram teacher: train.py's counter logic, transcribed."""
    loads, num_gram_updates = set(), 0
    for it in range(n_steps):
        if it == g.it_load_ema_teacher:
            loads.add(it)
        if (g.rep_update and it + 1 >= g.it_first_update and (it + 1) % g.update_frequency == 0
                and (g.max_updates is None or num_gram_updates < g.max_updates)):
            loads.add(it + 1)
            num_gram_updates += 1
    return {s for s in loads if s < n_steps}


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(it_load_ema_teacher=5, update_frequency=4, it_first_update=10, max_updates=3),
    dict(it_load_ema_teacher=3, update_frequency=7, it_first_update=0, max_updates=None),
    dict(it_load_ema_teacher=2, update_frequency=3, it_first_update=9, max_updates=0),
    dict(it_load_ema_teacher=0, rep_update=False),
])
def test_load_steps_are_dinov3s(kwargs):
    g = GramConfig(enabled=True, **{"update_frequency": 5, **kwargs})
    assert {s for s in range(60) if loop.gram_load_due(g, s)} == dinov3_load_steps(g, 60)


def test_gram_loss_adds_dinov3s_loss_once_loaded():
    model = tiny_model_off_init("gram.enabled=true", "gram.loss_weight=0.5", "model.drop_path_rate=0.0")
    g, local = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[0, :3] = True
    before = model(g, local, masks, 0.04, masked_patch_indices(masks))
    assert before["gram_loss"] == 0
    model.refresh_gram_teacher()
    for mine, teacher in zip(model.gram_teacher.parameters(), model.teacher.backbone.parameters(), strict=True):
        assert torch.equal(mine, teacher)
    model.gram_active = True
    out = model(g, local, masks, 0.04, masked_patch_indices(masks))
    with torch.no_grad():
        expected = reference.gram_loss(model.student.backbone(g, masks).patches, model.teacher.backbone(g).patches,
                                       remove_neg=False)
    torch.testing.assert_close(out["gram_loss"], expected, rtol=1e-5, atol=1e-7)
    rest = out["dino_loss"] + 0.1 * out["koleo_loss"] + out["ibot_loss"]
    torch.testing.assert_close(out["loss"], rest + 0.5 * expected, rtol=1e-5, atol=1e-7)
    out["loss"].backward()
    assert all(p.grad is None for p in model.gram_teacher.parameters())


def test_trainer_loads_the_gram_teacher_on_schedule(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader(n_batches=4))
    cfg = tiny_config("gram.enabled=true", "gram.it_load_ema_teacher=1", "gram.update_frequency=2",
                      "data.train_shards=[memory]", f"train.output_dir={tmp_path}", "train.max_steps=3",
                      "train.progress=false", "train.parallel=none", "data.batch_size_per_gpu=4", "optim.epochs=2",
                      "optim.warmup_epochs=1", "train.epoch_length=2")
    trainer = loop.Trainer(cfg)
    losses = []
    for step in range(3):
        batch = next(iter(trainer.loader))
        metrics = trainer.train_step(batch)
        losses.append(metrics.read()[0]["gram_loss"])
        if step == 1:  # loaded before step 1 and step 2 (1 % 2 != 0, 2 % 2 == 0): the teacher before step 2's EMA
            snapshot = [p.clone() for p in trainer.model.gram_teacher.parameters()]
    assert losses[0] == 0 and losses[1] > 0 and losses[2] > 0
    assert not all(torch.equal(a, b) for a, b in zip(snapshot, trainer.model.gram_teacher.parameters(),
                                                      strict=True)), "reloaded before step 2"
