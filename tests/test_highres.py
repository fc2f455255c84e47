"""The high-resolution phase (pipeline/multires.py, data.resolution_schedule): crop sizes per step from a schedule.

Oracles: for the draw, the binomial bound on each pair's count over many steps (derived in the test) and the rule
that nothing but (seed, step) enters it; for the loader, an uninterrupted iteration (resume and ranks, batch for
batch) of in-memory sub-loaders whose labels say which (sizes, seed, epoch, position) made each batch, and for the
real loaders (DALI on CPU, torchvision) each pair's loader built alone; for the trainer, an uninterrupted run
(teacher weights bit for bit) and each step's masks against sample_masks_for_rank on a generator of the grid of that
step's crops; for the packed varlen tables at N = 1370, offsets and work-item counts written as plain sums. The
Triton attention itself is not run at N ~ 1,400 here (too slow in the interpreter for this suite): what the crop sizes
change for it is its tables and grid, checked here; test_attention.py runs its tiles at ragged lengths in the
interpreter and at N = 1370 (dense) on a GPU (`-m gpu`).
"""
import copy
import math
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinotron.kernels import flash_attention as fa
from dinotron.pipeline import MultiCropLoader, TorchvisionMultiCropLoader, write_shards
from dinotron.pipeline.multires import MultiResolutionLoader, ResolutionPhase, check_patch_multiples, draw_pair
from dinotron.train import loop
from dinotron.train.config import ConfigError, load_config
from dinotron.train.demo import write_texture_folder
from dinotron.train.masking import BlockMaskGenerator, sample_masks_for_rank
from helpers import TINY, MemoryLoader, requires_dali

DINOV3_RATIOS = [0.3, 0.3, 0.3, 0.05, 0.05]  # dinov3_vit7b16_high_res_adapt.yaml's global_local_crop_pairs_ratios


class SizedLoader(MemoryLoader):
    """helpers.MemoryLoader at `augment`'s crop sizes; labels = (global, local, seed, epoch, position) of the batch."""

    backend = "memory"

    def __init__(self, *, augment, seed, batch_size=4, n_batches=3):
        super().__init__(batch_size=batch_size, n_global=augment.n_global, n_local=augment.n_local,
                         n_batches=n_batches, seed=seed)
        self.sizes, self.closed = (augment.global_size, augment.local_size), 0

    def close(self, wait=True):
        self.closed += 1

    def __iter__(self):
        for batch in super().__iter__():
            yield {"global_crops": F.interpolate(batch["global_crops"], size=self.sizes[0]),
                   "local_crops": F.interpolate(batch["local_crops"], size=self.sizes[1]),
                   "labels": torch.tensor([*self.sizes, self.seed, self.epoch, self.position - 1])}


def phase(from_step, pairs, ratios):
    return ResolutionPhase(from_step, [g for g, _ in pairs], [loc for _, loc in pairs], ratios)


# Phase 1 mixes two pairs; phase 2 brings back phase 0's pair (closed at step 4) and keeps one of phase 1's open.
SCHEDULE = [phase(0, [(32, 16)], [1.0]), phase(4, [(48, 16), (40, 24)], [1.0, 1.0]),
            phase(9, [(32, 16), (48, 16)], [1.0, 3.0])]


def combined(seed=0, micro_batches=2, rank=0, **loader_kwargs):
    """A MultiResolutionLoader of SCHEDULE over SizedLoaders, and the list of those it builds. A rank's sub-loaders
    hold other samples: here other seeds (+ 1000 per rank)."""
    built = []

    def make_loader(*, augment, seed):
        built.append(SizedLoader(augment=augment, seed=seed + 1000 * rank, **loader_kwargs))
        return built[-1]

    return MultiResolutionLoader(SCHEDULE, make_loader, tiny_config().data.augment, seed=seed,
                                 micro_batches=micro_batches), built


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def stream(loader, n):
    """The next n batches, on across epoch ends as Trainer.micro_batch_groups goes."""
    def endless():
        while True:
            yield from loader
            loader.set_epoch(loader.state_dict()["epoch"] + 1)

    return list(islice(endless(), n))


def labels(batches):
    return [tuple(b["labels"].tolist()) for b in batches]


# ---- the draw ------------------------------------------------------------------------------------

def test_draw_follows_the_ratios():
    """Each step's draw is an independent uniform turned into an index, so pair k's count over n steps is
    Binomial(n, p_k), p_k = ratio_k / sum: within 5 standard deviations, sqrt(n p_k (1 - p_k)), but with probability
    5.7e-7 per pair (normal tail; n p_k >= 1000 here, where the normal approximation holds)."""
    n = 20_000
    for ratios in (DINOV3_RATIOS, [3.0, 1.0]):
        counts = torch.bincount(torch.tensor([draw_pair(0, s, ratios) for s in range(n)]), minlength=len(ratios))
        for k, count in enumerate(counts.tolist()):
            p = ratios[k] / sum(ratios)
            assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (ratios, k, count)


def test_draw_depends_on_seed_and_step_only():
    first = [draw_pair(0, s, DINOV3_RATIOS) for s in range(200)]
    assert first == [draw_pair(0, s, DINOV3_RATIOS) for s in range(200)]
    assert first != [draw_pair(1, s, DINOV3_RATIOS) for s in range(200)], "the seed changes the draws"
    assert [draw_pair(0, s, DINOV3_RATIOS) for s in range(150, 200)] == first[150:], "no state between draws"


# ---- the loader ----------------------------------------------------------------------------------

def test_every_rank_draws_the_same_sizes():
    """Ranks differ in their sub-loaders' samples (here their seeds) and may differ in batch size; the crop sizes of
    every batch are the same, two micro-batches per step share them, and they follow the schedule's phases."""
    sizes, samples = [], []
    for rank, batch_size in ((0, 4), (1, 4), (2, 2)):
        loader, _ = combined(micro_batches=2, rank=rank, batch_size=batch_size)
        batches = stream(loader, 30)
        sizes.append([(b["global_crops"].shape[-1], b["local_crops"].shape[-1]) for b in batches])
        samples.append(batches[0]["global_crops"][0])
        assert all(b["global_crops"].shape[0] == 2 * batch_size for b in batches)
    assert sizes[0] == sizes[1] == sizes[2]
    assert not torch.equal(samples[0], samples[1]), "the ranks' batches differ"
    steps = sizes[0][::2]
    assert sizes[0][1::2] == steps, "the micro-batches of a step share its sizes"
    assert set(steps[:4]) == {(32, 16)} and set(steps[4:9]) <= {(48, 16), (40, 24)}
    assert set(steps[9:]) == {(32, 16), (48, 16)}, "phase 2 draws both its pairs in 6 steps"
    assert steps == [loader.pair_at(s) for s in range(15)]


def test_resume_is_exact_and_sub_loaders_are_lazy():
    straight, built = combined()
    assert [b.sizes for b in built] == [(32, 16)], "only the first phase's sub-loader is built up front"
    expected = labels(stream(straight, 30))
    assert [(b.sizes, b.seed) for b in built] == [((32, 16), 1), ((48, 16), 2), ((40, 24), 3), ((32, 16), 1)], \
        "one sub-loader per pair, seeded seed + k + 1 (dinov3), rebuilt when a phase brings its pair back"
    assert [b.closed for b in built] == [1, 0, 1, 0], "a phase closes the sub-loaders of pairs it lacks"
    for cut in (1, 7, 8, 9, 17, 18, 23):
        first, _ = combined()
        done = labels(stream(first, cut))
        state = copy.deepcopy(first.state_dict())
        resumed, _ = combined()
        resumed.load_state_dict(state)
        assert done + labels(stream(resumed, 30 - cut)) == expected, cut


def test_state_names_its_parts_and_refuses_a_single_loaders():
    loader, _ = combined()
    stream(loader, 9)  # step 4 (micro-batch 1 of it): phase 1
    state = loader.state_dict()
    assert (state["step"], state["micro_batch"], state["epoch"], state["position"]) == (4, 1, 2, 3)
    assert set(state["loaders"]) == {"32x16", "48x16", "40x24"} and state["loaders"]["32x16"]["position"] == 2
    with pytest.raises(ValueError, match="saved without data.resolution_schedule"):
        loader.load_state_dict({"epoch": 0, "position": 3})
    stream(loader, 1)  # the end of step 4: a checkpoint's point
    one, _ = combined(micro_batches=1)  # train.grad_accum_steps changed on resume (a free key)
    one.load_state_dict(loader.state_dict())
    assert [b["global_crops"].shape[-1] for b in stream(one, 3)] == [one.pair_at(s)[0] for s in (5, 6, 7)]


# ---- the trainer ---------------------------------------------------------------------------------

SIZE_CHANGE = ("data.resolution_schedule=[{from_step: 0, global_crops_size: [32], local_crops_size: [16], "
               "global_local_crop_pairs_ratios: [1]}, {from_step: 2, global_crops_size: [48, 40], "
               "local_crops_size: [16, 24], global_local_crop_pairs_ratios: [1, 1]}]")


@pytest.fixture
def sized_loaders(monkeypatch):
    """build_train_loader's sub-loaders are SizedLoaders (the loader class, shards and rank arguments unused)."""
    monkeypatch.setattr(loop, "_build_loader", lambda cls, shards, batch_size, *, augment, seed, **kwargs:
                        SizedLoader(augment=augment, seed=seed, batch_size=batch_size))


def trainer_config(out, *overrides):
    return tiny_config(f"train.output_dir={out}", "train.epoch_length=4", "optim.epochs=2", "optim.warmup_epochs=1",
                       "teacher.warmup_teacher_temp_epochs=1", "data.batch_size_per_gpu=4", "data.train_shards=[x]",
                       "train.checkpoint_every=2", "train.progress=false", "model.attention=dinotron",
                       "model.pack_crops=true", "train.grad_accum_steps=2", SIZE_CHANGE, *overrides)


def test_training_changes_size_mid_run_and_resumes_exactly(tmp_path, sized_loaders):
    """32 px global crops (4 x 4 patches of 8 px) for steps 0-1, then 48 or 40 px (6 x 6 or 5 x 5) drawn per step, two
    micro-batches each, packed; every step's masks come from a generator of its grid. Resumed at step 2, where the
    size changes: the same teacher as the straight run, bit for bit."""
    straight = loop.Trainer(trainer_config(tmp_path / "a", "train.max_steps=4"))
    assert isinstance(straight.loader, MultiResolutionLoader)
    seen, real_forward = [], straight.model.forward

    def forward(global_crops, local_crops, masks, *args):
        seen.append((global_crops.shape[-1], local_crops.shape[-1], masks.clone()))
        return real_forward(global_crops, local_crops, masks, *args)

    straight.model.forward = forward
    straight.fit()
    sides = [(g, loc) for g, loc, _ in seen]
    assert sides[:4] == [(32, 16)] * 4 and sides[4:] == [straight.loader.pair_at(s) for s in (2, 2, 3, 3)]
    assert {g for g, _ in sides[4:]} <= {48, 40}
    for k, (g, _, masks) in enumerate(seen):
        step, micro = divmod(k, 2)
        grid = g // 8
        expected = sample_masks_for_rank(step, 0, BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
                                         2, 8).view(2, 2, 4, -1)[:, micro].flatten(0, 1)  # view-major, micro-batch k
        assert masks.shape == (8, grid * grid) and torch.equal(masks, expected), k

    loop.Trainer(trainer_config(tmp_path / "b", "train.max_steps=2")).fit()
    resumed = loop.Trainer(trainer_config(tmp_path / "b", "train.max_steps=4"), resume=True)
    assert resumed.step == 2 and resumed.loader.state_dict()["step"] == 2
    resumed.fit()
    a, b = straight.model.teacher.state_dict(), resumed.model.teacher.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("loader_cls", [pytest.param(MultiCropLoader, marks=requires_dali), TorchvisionMultiCropLoader])
def test_build_train_loader_gives_each_pair_its_own_real_loader(tmp_path, loader_cls):
    """Through the real loaders (DALI on CPU, torchvision) on 20 texture images: every batch has its step's sizes, and
    the batches of a pair are those of that loader built alone with the pair's sizes and seed train.seed + k + 1 (the
    oracle), though the sub-loaders are iterated by turns."""
    write_texture_folder(tmp_path / "images", n_per_class=2, size=40, seed=0)
    write_shards(tmp_path / "images", tmp_path / "shards", shard_size=8, progress=False)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    dali = loader_cls is MultiCropLoader
    kwargs = {"device": "cpu", "num_threads": 1} if dali else {"num_threads": 0}
    cfg = tiny_config(f"data.train_shards={shards}", f"data.loader={'dali' if dali else 'torchvision'}",
                      "data.device=cpu", f"data.num_threads={kwargs['num_threads']}", "data.batch_size_per_gpu=4",
                      "train.seed=3", SIZE_CHANGE)
    loader = loop.build_train_loader(cfg, 0, 1)
    assert isinstance(loader, MultiResolutionLoader) and len(loader) == 5
    assert loader.backend == ("dali-cpu" if dali else "torchvision")
    batches = stream(loader, 12)
    sides = [(b["global_crops"].shape[-1], b["local_crops"].shape[-1]) for b in batches]
    assert sides == [loader.pair_at(step) for step in range(12)] and sides[:2] == [(32, 16)] * 2
    assert {type(sub) for sub in loader.loaders.values()} == {loader_cls}
    for k, pair in ((1, (48, 16)), (2, (40, 24))):
        mine = [b for b, side in zip(batches, sides, strict=True) if side == pair]
        alone = loader_cls(shards, 4, augment=replace(cfg.data.augment, global_size=pair[0], local_size=pair[1]),
                           seed=3 + k + 1, **kwargs)
        assert mine, pair
        for a, b in zip(stream(alone, len(mine)), mine, strict=True):
            assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
        alone.close()
    loader.close()


@pytest.mark.parametrize("schedule, match", [
    ("[{from_step: 0, global_crops_size: [32], local_crops_size: [16], global_local_crop_pairs_ratios: [-1]}]",
     r"data.resolution_schedule\[0\]: global_local_crop_pairs_ratios must be positive"),
    ("[{from_step: 0, global_crops_size: [32, 48], local_crops_size: [16], global_local_crop_pairs_ratios: [1]}]",
     r"data.resolution_schedule\[0\]: global_crops_size, local_crops_size and global_local_crop_pairs_ratios must "
     r"be lists of one length.*2, 1, 1"),
    ("[{from_step: 0, global_crops_size: [32], local_crops_size: [16]}]",
     r"data.resolution_schedule\[0\]: .*lists of one length.*1, 1, 0"),
    ("[{from_step: 0, global_crops_size: [0], local_crops_size: [16], global_local_crop_pairs_ratios: [1]}]",
     r"data.resolution_schedule\[0\]: global_crops_size must be crop sides >= 1 px"),
    ("[{from_step: 5, global_crops_size: [32], local_crops_size: [16], global_local_crop_pairs_ratios: [1]}]",
     r"resolution_schedule\[0\].from_step must be 0"),
    ("[{global_crops_size: [32], local_crops_size: [16], global_local_crop_pairs_ratios: [1]}, "
     "{from_step: 0, global_crops_size: [48], local_crops_size: [16], global_local_crop_pairs_ratios: [1]}]",
     r"resolution_schedule\[1\].from_step must be greater than resolution_schedule\[0\].from_step \(0\), got 0"),
    ("[{from_step: 0, global_size: [32]}]", r"unknown config key 'data.resolution_schedule\[0\].global_size'"),
])
def test_bad_schedules_name_the_key(schedule, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(f"data.resolution_schedule={schedule}")


def test_crop_sides_must_be_patch_multiples(tmp_path, sized_loaders):
    bad = ("data.resolution_schedule=[{from_step: 0, global_crops_size: [32, 36], local_crops_size: [16, 16], "
           "global_local_crop_pairs_ratios: [1, 1]}]")
    with pytest.raises(ConfigError, match=r"data.resolution_schedule\[0\].global_crops_size: \[36\] are not "
                                          r"multiples of the model's patch size 8 \(multiples near them: 32 or 40\)"):
        loop.Trainer(trainer_config(tmp_path, bad))


# ---- the packed varlen tables at N ~ 1,400 ------------------------------------------------------

def test_packed_tables_at_high_resolution():
    """The tables Backbone.forward_packed hands the varlen attention for a step of 2 images at each size pair of
    configs/vitl14_highres.yaml (2 global + 8 local crops, (side / 14)^2 patches + the cls token each): the offsets,
    the per-block work-item schedule (tile_schedule, run here in the Triton interpreter) and the grid bound
    (varlen_programs, which must cover every work item). The config's sides are patch multiples, <= 1,370 tokens."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "vitl14_highres.yaml")
    aug = cfg.data.augment
    assert cfg.model.arch.endswith("patch14_dinov2") and (aug.n_global, aug.n_local) == (2, 8)
    check_patch_multiples(cfg.data.resolution_schedule, 14)
    pairs = {pair for phase in cfg.data.resolution_schedule for pair in phase.pairs}
    assert len(pairs) == 6
    for global_side, local_side in sorted(pairs):
        lengths = [(global_side // 14) ** 2 + 1] * 4 + [(local_side // 14) ** 2 + 1] * 16
        assert max(lengths) <= 1370
        cu_seqlens, max_seqlen = fa.make_cu_seqlens(lengths)
        offsets = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == offsets and max_seqlen == max(lengths)
        tiles = fa.tile_schedule(cu_seqlens)
        for row, block in enumerate(fa.SCHEDULE_BLOCKS):
            items = [sum(-(-n // block) for n in lengths[:i]) for i in range(len(lengths) + 1)]
            assert tiles[row].tolist() == items, (global_side, local_side, block)
            assert fa.varlen_programs(block, len(lengths), offsets[-1], max_seqlen) >= items[-1], block
