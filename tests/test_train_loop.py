"""The training loop on a deterministic in-memory loader: exact resume, SIGTERM save, NaN stop, logging.

The trainer reads a step's metrics once the next step is queued (and before any checkpoint): a NaN stops it one
step late, naming its step; a stop signal rides in the next step's all_reduce, so the ranks stop together two steps
after it. The GPU test checks with torch.cuda's sync debug mode that a step queues without a host sync.
"""
import json
import math
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinotron.train import checkpoint as ckpt
from dinotron.train import loop
from dinotron.train.config import load_config
from helpers import TINY, MemoryLoader, join_trainer_ranks, leave_ranks


@pytest.fixture
def memory_loader(monkeypatch):
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader())


def config(tmp_path, *overrides):
    return load_config(
        None,
        TINY
        + [
            f"train.output_dir={tmp_path}",
            "train.epoch_length=4",
            "optim.epochs=2",
            "optim.warmup_epochs=1",
            "teacher.warmup_teacher_temp_epochs=1",
            "data.batch_size_per_gpu=4",
            "data.train_shards=[unused]",
            "train.checkpoint_every=3",
            "train.progress=false",
        ]
        + list(overrides),
    )


def teacher_state(trainer):
    return {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}


def test_exact_resume(tmp_path, memory_loader):
    straight = loop.Trainer(config(tmp_path / "a", "train.max_steps=6"))
    straight.fit()
    first = loop.Trainer(config(tmp_path / "b", "train.max_steps=3"))
    first.fit()
    resumed = loop.Trainer(config(tmp_path / "b", "train.max_steps=6"), resume=True)
    assert resumed.step == 3 and resumed.loader.state_dict() == {"epoch": 0, "position": 3}
    resumed.fit()
    assert resumed.step == straight.step == 6
    a, b = teacher_state(straight), teacher_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(straight.model.dino_center, resumed.model.dino_center)
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s",
                "teacher_entropy", "prototypes_in_use", "feature_std"):
        assert key in lines[0], key
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "a")] == ["checkpoint-00000003", "checkpoint-00000006"]


def test_sigterm_stops_two_steps_later_and_saves(tmp_path, memory_loader, monkeypatch):
    trainer = loop.Trainer(config(tmp_path, "train.checkpoint_every=100"))
    real_step = trainer.train_step

    def step_then_sigterm(batch):
        out = real_step(batch)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    trainer.fit()
    # the flag rides in step 3's all_reduce, whose metrics are read once step 4 is queued
    assert trainer.step == 4
    assert ckpt.load_meta(ckpt.latest_checkpoint(tmp_path))["step"] == 4
    assert metric_steps(tmp_path) == [1, 2, 3, 4], "every step is logged, the last one too"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is restored"


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, memory_loader, monkeypatch):
    trainer = loop.Trainer(config(tmp_path))
    real_forward = trainer.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if trainer.step == 4:
            out["ibot_loss"] = out["ibot_loss"] * float("nan")
            out["loss"] = out["loss"] + out["ibot_loss"]
        return out

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(loop.TrainingDiverged, match=r"non-finite ibot_loss = nan, loss = nan at step 5"):
        trainer.fit()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.load_meta(latest)["step"] == 3
    saved = {"model": {k: torch.full_like(v, float("nan")) for k, v in trainer.model.state_dict().items()}}
    ckpt.load_sharded(latest, saved)
    for v in saved["model"].values():
        assert torch.isfinite(v).all()


def test_nan_from_the_data_stops_through_the_real_kernels(tmp_path, memory_loader, monkeypatch):
    """NaN pixels reach every loss kernel: the trainer (not a kernel's own check) stops, naming the step, before the
    checkpoint that step 3 would have written (its metrics are read before the save)."""
    trainer = loop.Trainer(config(tmp_path))
    real_forward = trainer.model.forward

    def forward(global_crops, *args):
        return real_forward(global_crops * float("nan") if trainer.step == 2 else global_crops, *args)

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(loop.TrainingDiverged, match=r"non-finite dino_loss = nan, .* at step 3"):
        trainer.fit()
    assert trainer.step == 3 and ckpt.latest_checkpoint(tmp_path) is None


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [[], ["train.grad_accum_steps=2", "teacher.centering=sinkhorn_knopp"]])
def test_train_step_queues_without_a_host_sync(tmp_path, memory_loader, overrides):
    """Oracle: torch.cuda's sync debug mode, which raises on every device-to-host sync (item, nonzero, bool of a
    tensor, blocking copies). The first step may sync while it initialises (cuBLAS, optimiser state)."""
    trainer = loop.Trainer(config(tmp_path, *overrides))
    assert trainer.device.type == "cuda"
    groups = trainer.micro_batch_groups()
    trainer.train_step(*next(groups))
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = [trainer.train_step(*next(groups)) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _, mean, norms, seconds = metrics[-1].read()
    assert math.isfinite(mean["loss"]) and set(norms) == {"backbone", "dino_head"} and seconds > 0


def _two_rank_worker(rank, tmp_path, results):
    join_trainer_ranks(rank, 2, tmp_path / "init")
    loop.build_train_loader = lambda cfg, rank, world: MemoryLoader(seed=rank)
    try:
        torch.manual_seed(100 + rank)  # whatever the RNG state before, the ranks start from the same weights
        # DDP: every rank holds whole replicas, so equal weights on both ranks means something
        trainer = loop.Trainer(config(tmp_path / "sigterm", "train.checkpoint_every=100", "train.parallel=ddp"))
        initial = [p.detach().clone() for p in trainer.model.student.parameters()]
        real_step = trainer.train_step

        def step_then_sigterm(batch):  # only rank 1 is signalled
            out = real_step(batch)
            if rank == 1 and trainer.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        trainer.train_step = step_then_sigterm
        trainer.fit()
        out = {"initial": initial, "step": trainer.step, "teacher": teacher_state(trainer)}

        trainer = loop.Trainer(config(tmp_path / "nan", "train.parallel=ddp"))
        real_forward = trainer.model.forward

        def forward(global_crops, *args):  # NaN on rank 1 only
            nan = rank == 1 and trainer.step == 1
            return real_forward(global_crops * float("nan") if nan else global_crops, *args)

        trainer.model.forward = forward
        try:
            trainer.fit()
        except loop.TrainingDiverged as err:
            out["diverged"] = str(err)
        results[rank] = out
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_ranks()


def test_two_ranks_share_weights_and_stop_together(tmp_path):
    """Two gloo ranks: equal initial weights; a SIGTERM on one rank (after step 2) stops both after the same step
    (4) with one checkpoint; a NaN on one rank stops both, naming its step (none is left waiting in a collective)."""
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(tmp_path, results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    for a, b in zip(r0["initial"], r1["initial"], strict=True):
        assert torch.equal(a, b)
    assert r0["step"] == r1["step"] == 4
    for k in r0["teacher"]:  # same start, all-reduced gradients, same updates: bitwise equal on both ranks
        assert torch.equal(r0["teacher"][k], r1["teacher"][k]), k
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "sigterm")] == ["checkpoint-00000004"]
    assert "non-finite loss on another rank at step 2" in r0["diverged"]
    assert "non-finite dino_loss = nan" in r1["diverged"]


def test_train_cli_reports_divergence(tmp_path, memory_loader, monkeypatch, capsys):
    from dinotron.train import cli

    monkeypatch.setattr(loop.Trainer, "train_step", lambda self, batch: (_ for _ in ()).throw(
        loop.TrainingDiverged("non-finite loss = inf at step 0")))
    code = cli.main(["train", *(f"{k}" for k in TINY), f"train.output_dir={tmp_path}", "data.train_shards=[x]",
                     "train.progress=false"])
    assert code == 1
    assert "non-finite loss = inf at step 0" in capsys.readouterr().err
    assert cli.main(["train", "optim.base_lrr=1"]) == 2
    assert "did you mean optim.base_lr" in capsys.readouterr().err


# ---- a used output folder; world-size-free masks ------------------------------------------------

def metric_steps(out_dir):
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_used_output_dir_needs_resume_or_overwrite(tmp_path, memory_loader):
    """Oracle for --overwrite: the same run into a new folder, bit for bit."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    loop.Trainer(config(run, "train.max_steps=3")).fit()
    assert ckpt.list_checkpoints(run)
    with pytest.raises(loop.OutputDirInUse, match=r"holds checkpoints .* --resume .* --overwrite"):
        loop.Trainer(config(run, "train.max_steps=2"))
    with pytest.raises(ValueError, match="exclude each other"):
        loop.Trainer(config(run), resume=True, overwrite=True)
    assert loop.Trainer(config(run, "train.max_steps=4"), resume=True).step == 3, "--resume is still allowed"

    straight = loop.Trainer(config(fresh, "train.max_steps=2"))
    straight.fit()
    again = loop.Trainer(config(run, "train.max_steps=2"), overwrite=True)
    assert again.step == 0 and not ckpt.list_checkpoints(run) and not (run / "metrics.jsonl").exists()
    again.fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == [p.name for p in ckpt.list_checkpoints(fresh)]
    assert metric_steps(run) == metric_steps(fresh) == [1, 2]
    a, b = teacher_state(straight), teacher_state(again)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_cli_refuses_a_used_output_dir(tmp_path, memory_loader, capsys):
    from dinotron.train import cli

    overrides = [*TINY, f"train.output_dir={tmp_path}", "data.train_shards=[x]", "data.batch_size_per_gpu=4",
                 "train.progress=false", "train.max_steps=2"]
    assert cli.main(["train", *overrides]) == 0
    capsys.readouterr()
    assert cli.main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"ERROR: dinotron train: train.output_dir {tmp_path} holds checkpoints")
    assert "--resume" in err and "--overwrite" in err
    assert cli.main(["train", "--overwrite", *overrides]) == 0
    assert metric_steps(tmp_path) == [1, 2], "the first run's metrics are gone"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--resume", "--overwrite", *overrides])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _record_masks(trainer) -> list:
    masks, real_forward = [], trainer.model.forward

    def forward(global_crops, local_crops, step_masks, *args):
        masks.append(step_masks.cpu().clone())
        return real_forward(global_crops, local_crops, step_masks, *args)

    trainer.model.forward = forward
    return masks


def _two_rank_output_dir_worker(rank, tmp_path, results):
    join_trainer_ranks(rank, 2, tmp_path / "init")
    loop.build_train_loader = lambda cfg, rank, world: MemoryLoader(seed=rank)
    try:
        out = {}
        loop.Trainer(config(tmp_path / "run", "train.max_steps=2")).fit()
        try:
            loop.Trainer(config(tmp_path / "run"))
        except loop.OutputDirInUse as err:
            out["refused"] = str(err)
        trainer = loop.Trainer(config(tmp_path / "run", "train.max_steps=3"), overwrite=True)
        out["masks"] = _record_masks(trainer)
        trainer.fit()
        results[rank] = out
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_ranks()


def test_two_ranks_refuse_or_overwrite_together_and_mask_as_one(tmp_path, monkeypatch):
    """Two gloo ranks of 4 images: a used folder stops both (none hangs); --overwrite empties it once, and
    only rank 0 writes metrics; each step's masks, interleaved (row j of rank r is image 2j + r), equal those
    of one rank of 8 images (the oracle)."""
    results = mp.Manager().dict()
    mp.spawn(_two_rank_output_dir_worker, args=(tmp_path, results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert "--resume" in r0["refused"] and "--overwrite" in r1["refused"]
    assert metric_steps(tmp_path / "run") == [1, 2, 3]

    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader(batch_size=8))
    one = loop.Trainer(config(tmp_path / "one", "train.max_steps=3", "data.batch_size_per_gpu=8"))
    masks = _record_masks(one)
    one.fit()
    assert len(masks) == len(r0["masks"]) == len(r1["masks"]) == 3
    for step, expected in enumerate(masks):
        two = torch.stack([r["masks"][step].view(2, 4, -1) for r in (r0, r1)], dim=2).flatten(0, 2)
        assert expected.any() and torch.equal(two, expected), step

