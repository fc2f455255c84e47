"""DINOv3's high-resolution adaptation: crop sizes that change from batch to batch, following a schedule of steps.

A schedule is a list of phases (ResolutionPhase, data.resolution_schedule): phase i runs from its from_step (the
first from step 0) to the next phase's. In a phase, each optimiser step's crops come from one (global, local) size
pair, pair k = (global_crops_size[k], local_crops_size[k]) with probability global_local_crop_pairs_ratios[k] / their
sum: dinov3's crops.global_crops_size / local_crops_size / global_local_crop_pairs_ratios lists and its
CombinedDataLoader's homogeneous mode (a batch has one global size and one local size; sizes change between batches).

The draw: step s's pair is draw_pair(seed, s, ratios), one uniform from (seed, s) alone turned into an index through
the ratios' running sum. No rank, world size, batch size or resume point enters it, so every rank runs the same shapes
in a step (its collectives and the iBOT masks of the step's global batch need them) and a resumed run draws what an
uninterrupted one draws. (dinov3's CombinedDataLoader draws from one generator seeded once per run, which a resume
restarts from its first draw.)

The loader: MultiResolutionLoader holds one multi-crop loader per distinct pair of the schedule (dinov3: one per pair,
seeded train.seed + k + 1), built when the first phase holding its pair starts and closed when a phase without it
starts (its state kept, for a later phase and for checkpoints). Each sub-loader runs its own epochs over the whole
data, advancing only when drawn, so one epoch of the combined stream may show a sample at two sizes, as in dinov3.
All micro-batches of one optimiser step (train.grad_accum_steps) come from the step's pair: the trainer draws a
step's iBOT masks on one patch grid.

Cost: one small numpy Generator per batch on the host (tens of microseconds), no device work. Memory and threads: a
phase of P pairs holds P live loaders, each with its own prefetched batches, background feeder and (DALI) pipeline
or (torchvision) num_threads worker processes.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from dinotron.pipeline.augment import MultiCropConfig

log = logging.getLogger(__name__)

_DRAW_KEY = 0x4E5  # the draws' own stream of (seed, step), apart from the loaders' (seed, epoch) shuffles


@dataclass
class ResolutionPhase:
    """One phase of a resolution schedule (data.resolution_schedule[i]), dinov3's crops.* names.

    From optimiser step `from_step` on (until the next phase's), each step's crops have the sizes of one pair
    (global_crops_size[k], local_crops_size[k]), drawn with probability global_local_crop_pairs_ratios[k] / their
    sum. Sizes are crop sides in pixels, multiples of the model's patch size (the trainer checks them against it).
    """

    from_step: int = 0  # the optimiser step the phase starts at; the first phase's is 0
    global_crops_size: list[int] = field(default_factory=list)  # the global crops' side of each pair (px)
    local_crops_size: list[int] = field(default_factory=list)  # the local crops' side of each pair (px)
    global_local_crop_pairs_ratios: list[float] = field(default_factory=list)  # each pair's share of the steps

    def __post_init__(self):
        if self.from_step < 0:
            raise ValueError(f"from_step must be >= 0, got {self.from_step}")
        lengths = [len(self.global_crops_size), len(self.local_crops_size), len(self.global_local_crop_pairs_ratios)]
        if not lengths[0] or len(set(lengths)) > 1:
            raise ValueError("global_crops_size, local_crops_size and global_local_crop_pairs_ratios must be lists of "
                             f"one length, one entry per (global, local) size pair and at least one; got lengths "
                             f"{', '.join(map(str, lengths))}")
        for key in ("global_crops_size", "local_crops_size"):
            if min(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be crop sides >= 1 px, got {getattr(self, key)}")
        ratios = self.global_local_crop_pairs_ratios
        if not all(math.isfinite(r) and r > 0 for r in ratios):
            raise ValueError(f"global_local_crop_pairs_ratios must be positive numbers, got {ratios}")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The (global, local) crop sides of each pair, in order."""
        return list(zip(self.global_crops_size, self.local_crops_size, strict=True))


def check_schedule(schedule: list[ResolutionPhase]) -> None:
    """ValueError naming resolution_schedule[i].from_step unless the phases start at step 0, in increasing order."""
    for i, phase in enumerate(schedule):
        if i == 0 and phase.from_step != 0:
            raise ValueError(f"resolution_schedule[0].from_step must be 0 (the first phase starts the run), got "
                             f"{phase.from_step}")
        if i and phase.from_step <= schedule[i - 1].from_step:
            raise ValueError(f"resolution_schedule[{i}].from_step must be greater than resolution_schedule[{i - 1}]"
                             f".from_step ({schedule[i - 1].from_step}), got {phase.from_step}")


def check_patch_multiples(schedule: list[ResolutionPhase], patch_size: int) -> None:
    """ValueError naming data.resolution_schedule[i].<key> where a crop side is not a multiple of `patch_size`."""
    for i, phase in enumerate(schedule):
        for key in ("global_crops_size", "local_crops_size"):
            bad = [s for s in getattr(phase, key) if s % patch_size]
            if bad:
                near = ", ".join(f"{max(s // patch_size, 1) * patch_size} or {(s // patch_size + 1) * patch_size}"
                                 for s in bad)
                raise ValueError(f"data.resolution_schedule[{i}].{key}: {bad} are not multiples of the model's patch "
                                 f"size {patch_size} (multiples near them: {near})")


def draw_pair(seed: int, step: int, ratios) -> int:
    """The pair index of optimiser step `step`: k with probability ratios[k] / sum(ratios), from (seed, step) alone
    (one float64 uniform u, then the k with cumsum[k-1] <= u * sum < cumsum[k])."""
    u = np.random.default_rng([seed & 0xFFFFFFFF, int(step), _DRAW_KEY]).random()
    bounds = np.cumsum(np.asarray(ratios, np.float64))
    return min(int(np.searchsorted(bounds, u * bounds[-1], side="right")), len(bounds) - 1)


class MultiResolutionLoader:
    """Multi-crop batches whose crop sizes follow `schedule`, from one sub-loader per (global, local) size pair, with
    the loader state protocol (iteration, set_epoch, state_dict, load_state_dict; len, close, backend).

    schedule: [ResolutionPhase], at least one (check_schedule). make_loader(*, augment, seed): a multi-crop loader
    (MultiCropLoader, TorchvisionMultiCropLoader, or anything with the protocol and len()) of `augment`'s crops,
    called with `augment` of the pair's global_size / local_size and seed + k + 1 for the k-th distinct pair of the
    schedule (dinov3's seeds). micro_batches: batches per optimiser step (train.grad_accum_steps), all of one pair.

    Each batch is its sub-loader's: {"global_crops": (n_global*B, 3, G, G), "local_crops": (n_local*B, 3, L, L),
    "labels"}, G and L those of pair_at(step). An epoch here is len(self) batches, the sub-loaders' epoch length (the
    same for every size); each sub-loader goes through its own epochs as it is drawn. state_dict() holds the step, the
    micro-batch within it and every sub-loader's state (closed ones too): load_state_dict continues exactly, and a
    sub-loader re-derives its position where the batch size or rank count changed (ShardLoader.load_state_dict).
    """

    def __init__(self, schedule: list[ResolutionPhase], make_loader, augment: MultiCropConfig, *, seed: int,
                 micro_batches: int = 1):
        if not schedule:
            raise ValueError("the resolution schedule is empty: give at least one ResolutionPhase (without a "
                             "schedule, build one loader of data.augment's sizes)")
        check_schedule(schedule)
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.schedule, self.make_loader, self.augment = schedule, make_loader, augment
        self.seed, self.micro_batches = int(seed), micro_batches
        self.pairs = list(dict.fromkeys(p for phase in schedule for p in phase.pairs))  # distinct, first seen first
        self.step, self.micro_batch = 0, 0  # the optimiser step of the next batch, and its micro-batch in that step
        self.epoch, self.position = 0, 0
        self.loaders: dict[tuple[int, int], object] = {}  # the current phase's sub-loaders, by (global, local) pair
        self._iters: dict = {}  # their open epochs (iterators)
        self._saved: dict[tuple[int, int], dict] = {}  # the states of the closed ones
        self._initial: dict[tuple[int, int], dict] = {}  # each built sub-loader's state as built (a pair never drawn)
        self._phase = -1
        self._enter(0)
        self._len = len(next(iter(self.loaders.values())))

    def __len__(self) -> int:
        """Batches per epoch on this rank (a sub-loader's)."""
        return self._len

    @property
    def backend(self) -> str:
        """What produces the batches: the sub-loaders' backend ("dali-gpu", "dali-cpu", "torchvision")."""
        return next(iter(self.loaders.values())).backend

    @property
    def fallback_reason(self) -> str | None:
        return getattr(next(iter(self.loaders.values())), "fallback_reason", None)

    def phase_index(self, step: int) -> int:
        """The index of the phase `step` is in."""
        return bisect.bisect_right([phase.from_step for phase in self.schedule], step) - 1

    def pair_at(self, step: int) -> tuple[int, int]:
        """The (global, local) crop sides of optimiser step `step`: its phase's pair drawn from (seed, step)."""
        phase = self.schedule[self.phase_index(step)]
        return phase.pairs[draw_pair(self.seed, step, phase.global_local_crop_pairs_ratios)]

    def _enter(self, index: int) -> None:
        """Make phase `index` the current one: close the sub-loaders of pairs it lacks (keeping their states), build
        those of its pairs (from their kept states)."""
        phase = self.schedule[index]
        for pair in [p for p in self.loaders if p not in phase.pairs]:
            self._saved[pair] = self.loaders[pair].state_dict()
            self._iters.pop(pair, None)
            loader = self.loaders.pop(pair)
            if hasattr(loader, "close"):
                loader.close()
        for pair in phase.pairs:
            if pair not in self.loaders:
                loader = self.make_loader(augment=replace(self.augment, global_size=pair[0], local_size=pair[1]),
                                          seed=self.seed + self.pairs.index(pair) + 1)
                self._initial[pair] = loader.state_dict()
                if pair in self._saved:
                    loader.load_state_dict(self._saved.pop(pair))
                self.loaders[pair] = loader
        self._phase = index
        log.info(f"resolution phase {index} from step {phase.from_step}: (global, local) crops "
                 f"{', '.join(f'{g}/{loc} px' for g, loc in phase.pairs)} with ratios "
                 f"{phase.global_local_crop_pairs_ratios}")

    def _next(self, pair: tuple[int, int]) -> dict:
        """The next batch of `pair`'s sub-loader, on into its next epoch where one ends."""
        loader = self.loaders[pair]
        for _ in range(2):
            if pair not in self._iters:
                self._iters[pair] = iter(loader)
            try:
                return next(self._iters[pair])
            except StopIteration:
                del self._iters[pair]
                loader.set_epoch(loader.state_dict()["epoch"] + 1)
        raise RuntimeError(f"the {pair[0]}/{pair[1]} px sub-loader yielded no batch in a whole epoch")

    def __iter__(self):
        """One epoch (len(self) batches) from the current position; an exhausted epoch moves on to the next."""
        if self.position >= len(self):
            self.set_epoch(self.epoch + 1)
        while self.position < len(self):
            index = self.phase_index(self.step)
            if index != self._phase:
                self._enter(index)
            batch = self._next(self.pair_at(self.step))
            self.position += 1
            self.micro_batch += 1
            if self.micro_batch >= self.micro_batches:
                self.step, self.micro_batch = self.step + 1, 0
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` of this stream from its first batch (the step and the sub-loaders go on)."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """{"step", "micro_batch", "epoch", "position", "seed", "loaders": {"<global>x<local>": sub-loader state}}."""
        states = {**self._saved, **{pair: loader.state_dict() for pair, loader in self.loaders.items()}}
        return {"step": self.step, "micro_batch": self.micro_batch, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "loaders": {f"{g}x{loc}": s for (g, loc), s in states.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch is the one an uninterrupted run would yield next. A pair
        the state lacks (a schedule changed since) starts from its sub-loader's first batch."""
        if "loaders" not in state:
            raise ValueError("the loader state was saved without data.resolution_schedule (one loader's); a "
                             "resolution schedule continues only a run saved with one: start the phase as a new run "
                             "from the exported model (model.pretrained)")
        self.seed = int(state.get("seed", self.seed))
        self.step, self.micro_batch = int(state["step"]), int(state["micro_batch"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        saved = {tuple(int(s) for s in key.split("x")): sub for key, sub in state["loaders"].items()}
        self._iters = {}
        for pair, loader in self.loaders.items():
            loader.load_state_dict(saved.pop(pair, self._initial[pair]))
        self._saved = saved  # the step's phase is entered (its sub-loaders built) at the next batch

    def close(self, wait: bool = True) -> None:
        """Stop the sub-loaders' background reading (they start again when iterated)."""
        self._iters = {}
        for loader in self.loaders.values():
            if hasattr(loader, "close"):
                loader.close(wait)
