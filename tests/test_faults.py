"""Faults: a run SIGKILLed inside a step or a checkpoint write resumes exactly; a NaN loss stops training and leaves
the last checkpoint whole; a sample corrupted on disk is skipped and counted, or stops training naming it.

Oracles:
- kills (benchmarks/fault_soak.py, three of its trials): the same config run uninterrupted in the same kind of child
  process, whose final model and optimiser state the resumed run must equal bit for bit and whose losses it must
  log; and the killed process's own record of the last checkpoint renamed to its final name (save_checkpoint's
  commit point), the step every resume must start from. No tolerance: one process, one thread, the same ops in the
  same order, so a resume that restores everything leaves no difference at all.
- NaN: a run stopped before the NaN step (its weights and optimiser state, bit for bit, equal those the checkpoint
  restores).
- corrupted shard: the bytes written over the sample, whose shard and key the error and the counts must name.
"""
import logging
import random
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from dinotron.pipeline import write_shards
from dinotron.train import checkpoint as ckpt
from dinotron.train import loop
from dinotron.train.config import load_config
from dinotron.train.demo import write_texture_folder
from helpers import TINY, MemoryLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fault_soak  # noqa: E402

# ---- SIGKILL at chosen and random points, then resume ------------------------------------------------------------


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """(multiprocessing context, work folder, the uninterrupted run's record), in-memory data."""
    work = tmp_path_factory.mktemp("soak")
    ctx = fault_soak.context("forkserver")
    return ctx, work, fault_soak.reference(ctx, work, None)


TRIALS = [
    # meta.pt written into .checkpoint-00000006.tmp, killed before the rename: the folder looks complete inside
    pytest.param([{"kind": "save", "point": "meta", "step": 6}], ["save:meta@6"], 4, [2, 4],
                 {".checkpoint-00000006.tmp": True}, id="save-meta-written-not-renamed"),
    # halfway through step 5's backward, then right after checkpoint 8's rename (before pruning) in the resumed run
    pytest.param([{"kind": "step", "point": "backward", "step": 5, "fraction": 0.5},
                  {"kind": "save", "point": "renamed", "step": 8}], ["step:backward@5", "save:renamed@8"], 8,
                 [4, 6, 8], {}, id="backward-then-renamed"),
    # a random moment of the run (seeded), wherever it lands
    pytest.param([lambda start: fault_soak.plan_fault(random.Random(3), start, ("timer",))], None, None, None, None,
                 id="timer"),
]


@pytest.mark.parametrize("faults,hits,final_from,complete_left,tmp_left", TRIALS)
def test_killed_run_resumes_from_the_last_complete_checkpoint_exactly(soak, tmp_path, faults, hits, final_from,
                                                                       complete_left, tmp_left):
    ctx, _, ref = soak
    record = fault_soak.run_trial(ctx, tmp_path, None, ref, faults)
    assert record["pass"], record["problems"]
    assert all(f["hit"] for f in record["faults"]), "every fault killed the run"
    assert record["max_abs_difference"] == 0.0 and record["final_step"] == fault_soak.STEPS
    if hits is not None:
        assert [f["hit"] for f in record["faults"]] == hits
        assert record["final_resumed_from"] == record["final_expected_from"] == final_from
        assert record["faults"][-1]["complete_left"] == complete_left
        assert record["faults"][-1]["tmp_left"] == tmp_left


def test_the_oracles_see_a_difference(soak):
    """The checks above can fail: one ulp in one weight, another step, a resume from the wrong checkpoint."""
    _, _, ref = soak
    state = ref["state"]
    assert fault_soak.compare_states(state, state) == 0.0
    name, weight = next((k, v) for k, v in state["model"].items() if v.is_floating_point() and v.numel())
    nudged = {**state, "model": {**state["model"], name: weight.clone()}}
    nudged["model"][name].view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    assert 0 < fault_soak.compare_states(nudged, state) < 1e-6
    assert fault_soak.compare_states({**state, "step": state["step"] - 1}, state) == float("inf")
    good = {"resumed": 4, "loaded": 1}
    assert fault_soak.check_resume({"expected_from": 4, "loaded_final_name": True}, good) == []
    assert fault_soak.check_resume({"expected_from": 6, "loaded_final_name": True}, good)
    assert fault_soak.check_resume({"expected_from": 4, "loaded_final_name": False}, {**good, "loaded": -1})


# ---- NaN at a chosen step -----------------------------------------------------------------------------------------

NAN_STEP = 4  # the trainer's step counter when the NaN batch is fed: its 5th step, after checkpoint 4


def config(out, *overrides):
    return load_config(None, TINY + [
        f"train.output_dir={out}", "train.epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", "data.batch_size_per_gpu=4", "data.train_shards=[unused]",
        "train.checkpoint_every=2", "train.progress=false", *overrides,
    ])


def test_nan_stops_naming_its_step_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    """NaN pixels in step NAN_STEP + 1 (the one after checkpoint NAN_STEP): read a step late, the error names it;
    the save after step NAN_STEP + 2 never happens; checkpoint NAN_STEP restores exactly the state of a run
    stopped there."""
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader())
    straight = loop.Trainer(config(tmp_path / "straight", f"train.max_steps={NAN_STEP}"))
    straight.fit()
    trainer = loop.Trainer(config(tmp_path / "nan"))
    real_forward = trainer.model.forward

    def forward(global_crops, *args):
        return real_forward(global_crops * float("nan") if trainer.step == NAN_STEP else global_crops, *args)

    monkeypatch.setattr(trainer.model, "forward", forward)
    # the NaN goes into the step that starts at trainer.step == NAN_STEP: step NAN_STEP + 1, as metrics.jsonl counts
    with pytest.raises(loop.TrainingDiverged, match=rf"non-finite .* at step {NAN_STEP + 1}\b"):
        trainer.fit()
    assert trainer.step == NAN_STEP + 2, "detected once the next step was queued"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["checkpoint-00000002", "checkpoint-00000004"]
    resumed = loop.Trainer(config(tmp_path / "nan"), resume=True)
    assert resumed.step == NAN_STEP
    assert resumed.loader.state_dict() == straight.loader.state_dict()
    expected = {"step": NAN_STEP, "model": straight.model.state_dict(), "optimizer": straight.optimizer.state_dict()}
    got = {"step": resumed.step, "model": resumed.model.state_dict(), "optimizer": resumed.optimizer.state_dict()}
    assert fault_soak.compare_states(got, expected) == 0.0
    for v in got["model"].values():
        assert torch.isfinite(v).all()


# ---- a shard corrupted while training -----------------------------------------------------------------------------

EPOCH_BATCHES = 5  # 20 images, 4 a batch


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    write_texture_folder(root / "images", n_per_class=2, size=40, seed=0)  # 10 classes x 2 = 20 JPEGs
    write_shards(root / "images", root / "shards", shard_size=8, prefix="train", workers=1, progress=False)
    return root / "shards"


def shard_config(out, shards, on_error):
    return load_config(None, TINY + [
        f"train.output_dir={out}", f"data.train_shards={shards}", "data.loader=torchvision", "data.device=cpu",
        "data.num_threads=0", "data.batch_size_per_gpu=4", "train.epoch_length=4", "optim.epochs=3",
        "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", f"train.max_steps={2 * EPOCH_BATCHES}",
        "train.checkpoint_every=100", "train.progress=false", f"data.on_error={on_error}",
        "data.max_bad_fraction=0.1",  # 1 bad sample of the 20 an epoch visits: 5%
    ])


def corrupt_after_first_epoch(trainer, shard: Path, key: str) -> None:
    """Once the first epoch's last step is done, overwrite the JPEG bytes of sample `key` in `shard` (same length:
    the tar and its index stay valid, the image no longer decodes)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name == f"{key}.jpg")
    real_step = trainer.train_step

    def step(*batches):
        out = real_step(*batches)
        if trainer.step == EPOCH_BATCHES:
            with open(shard, "r+b") as f:
                f.seek(member.offset_data)
                f.write(bytes(range(256)) * (member.size // 256) + b"\0" * (member.size % 256))
        return out

    trainer.train_step = step


def copy_shards(clean: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    """A copy of the clean shards (manifest and index files too), and the shard and key of the sample to corrupt:
    the first of the second shard."""
    shards = tmp_path / "shards"
    shutil.copytree(clean, shards)
    victim = sorted(shards.glob("train-*.tar"))[1]
    with tarfile.open(victim) as tar:
        key = next(m.name for m in tar if m.name.endswith(".jpg")).removesuffix(".jpg")
    return sorted(str(p) for p in shards.glob("train-*.tar")), victim, key


def test_corrupted_sample_is_skipped_and_counted(tmp_path, clean_shards, caplog):
    """on_error=skip: training goes on to its last step; the loader counts one bad sample in its shard and logs
    its key (1 bad sample of the 20 an epoch visits is under data.max_bad_fraction=0.1)."""
    shards, shard, key = copy_shards(clean_shards, tmp_path)
    trainer = loop.Trainer(shard_config(tmp_path / "run", shards, "skip"))
    assert trainer.loader.backend == "torchvision"
    corrupt_after_first_epoch(trainer, shard, key)
    caplog.set_level(logging.WARNING)
    trainer.fit()
    assert trainer.step == 2 * EPOCH_BATCHES, "training went on to the end"
    assert trainer.loader.bad_counts == {str(shard): 1}
    assert any(key in r.getMessage() for r in caplog.records), "the skipped sample's key is logged"


def test_corrupted_sample_stops_training_naming_shard_and_key(tmp_path, clean_shards):
    """on_error=raise: training stops at the second epoch's batch holding the sample, the error naming shard and
    key."""
    shards, shard, key = copy_shards(clean_shards, tmp_path)
    trainer = loop.Trainer(shard_config(tmp_path / "run", shards, "raise"))
    assert trainer.loader.backend == "torchvision"
    corrupt_after_first_epoch(trainer, shard, key)
    with pytest.raises(ValueError, match="undecodable") as err:  # ShardError is a ValueError
        trainer.fit()
    assert str(shard) in str(err.value) and key in str(err.value)
    table = trainer.loader.table
    sample = next(i for i in range(len(table)) if table.key(i) == key)
    batch = list(trainer.loader.epoch_order(1)).index(sample) // 4
    assert trainer.step == EPOCH_BATCHES + batch, "it stopped at the second epoch's batch holding the sample"
