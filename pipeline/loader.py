"""What the DALI and torchvision loaders share: sample order per epoch and rank, position, resume state.

Order: epoch e visits a permutation of all N samples drawn from (seed, e) (or 0..N-1 unshuffled);
rank r of R takes every R-th sample of it (unshuffled: the r-th contiguous block, for sequential
reads). With drop_last every rank gets floor(N / R) samples cut into floor(. / B) full batches, so
all ranks run the same number of steps; without it every sample is seen exactly once per epoch.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from dinotron.pipeline.augment import MultiCropConfig, sample_params
from dinotron.pipeline.shards import SampleReader, SampleTable, decoded_size

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_rank(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard_id, num_shards), each defaulting to torch.distributed's rank / world size (0 / 1 without it)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if num_shards is None:
        num_shards = dist.get_world_size() if initialised else 1
    if shard_id is None:
        shard_id = dist.get_rank() if initialised else 0
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    return shard_id, num_shards


def resolve_dtype(dtype) -> torch.dtype:
    dtype = DTYPES.get(dtype, dtype)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (or 'fp32', 'fp16', 'bf16'), got {dtype!r}")
    return dtype


class ShardLoader:
    """Base of every loader: the sample table, the per-epoch order of this rank and the resume position.

    Building one reads a sample count per shard, not the samples (see shards.SampleTable): O(shards) time and memory.

    Subclasses implement `_batches(epoch, start)`, yielding the batches of `epoch` from batch `start`, and set
    `backend`, what produces the batches: "dali-gpu", "dali-cpu" or "torchvision". `fallback_reason` is None,
    or why a torchvision loader runs where a DALI one was asked for (allow_fallback=True without DALI).
    """

    backend: str
    fallback_reason: str | None = None

    def __init__(self, shards, batch_size: int, *, seed: int = 0, shard_id: int | None = None,
                 num_shards: int | None = None, shuffle: bool = True, drop_last: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.table = SampleTable.from_shards(shards)
        self.reader = SampleReader(self.table)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_id, self.num_shards = resolve_rank(shard_id, num_shards)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            raise ValueError(f"{len(self.table)} samples over {self.num_shards} ranks make no full batch of "
                             f"{batch_size} (drop_last={drop_last}): use fewer ranks, a smaller batch or more data")

    def num_samples(self) -> int:
        """Samples this rank visits per epoch (those in batches)."""
        n, r = len(self.table), self.num_shards
        if self.drop_last:
            return (n // r) // self.batch_size * self.batch_size
        return len(range(self.shard_id, n, r))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids this rank visits in `epoch`, in order: (num_samples(),) int64, cached for the last epoch. Costs
        one shuffle of N int32 (N int64 from 2^31 samples) per epoch, of which N / R int64 are kept."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n, r, k = len(self.table), self.num_shards, self.shard_id
        if self.shuffle:
            # permutation(n) is shuffle(arange(n)): the same draws whatever the dtype, so int32 halves the transient
            # (568 MB at N = 142M), and the rank's copy below frees it (the order is still one for every R).
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5EED]).shuffle(order)
            order = order[: n // r * r][k::r] if self.drop_last else order[k::r]
        else:  # block k of np.array_split(arange(n), r), without the arange
            start = k * (n // r) + min(k, n % r)
            order = np.arange(start, start + n // r + (k < n % r))
            order = order[: n // r] if self.drop_last else order
        order = order[: self.num_samples()].astype(np.int64)  # (N / R,) int64, a copy
        self._order_cache = (epoch, order)
        return order

    def batch_ids(self, epoch: int, b: int) -> np.ndarray:
        return self.epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (its own shuffle) from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """{"epoch", "position" (batches consumed in the epoch), ...}: enough to resume exactly."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.table),
                "batch_size": self.batch_size, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch is the one an uninterrupted run would yield next."""
        if state.get("num_samples", len(self.table)) != len(self.table):
            raise ValueError(f"loader state is for {state['num_samples']} samples, these shards hold {len(self.table)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        same = (state.get("batch_size", self.batch_size) == self.batch_size
                and state.get("num_shards", self.num_shards) == self.num_shards)
        if not same:
            seen = position * state["batch_size"] * state["num_shards"]
            position = seen // (self.batch_size * self.num_shards)
            log.warning("resuming with batch size %d x %d ranks instead of %d x %d: continuing at batch %d of epoch "
                        "%d (samples of the interrupted epoch may repeat or be skipped)", self.batch_size,
                        self.num_shards, state["batch_size"], state["num_shards"], position, epoch)
        self.seed = int(state.get("seed", self.seed))
        self._order_cache = None
        self.epoch, self.position = epoch, min(position, len(self))

    def __iter__(self):
        """One epoch from the current position. An epoch that was already exhausted moves on to the next one."""
        if self.position >= len(self):
            self.set_epoch(self.epoch + 1)
        for batch in self._batches(self.epoch, self.position):
            self.position += 1
            yield batch

    def _batches(self, epoch: int, start: int):
        raise NotImplementedError


class MultiCropSource:
    """Encoded images, their augmentation parameters and labels for a batch of sample ids (picklable)."""

    def __init__(self, reader: SampleReader, augment: MultiCropConfig, seed: int):
        self.reader, self.augment, self.seed = reader, augment, seed

    def encoded(self, ids) -> list[bytes]:
        return [self.reader.image(int(i)) for i in ids]

    def params(self, epoch: int, ids, sizes) -> np.ndarray:
        """(len(ids), n_views, N_PARAMS) float32; sizes: [(height, width)]."""
        hw = np.asarray(sizes, np.int64).reshape(-1, 2)
        return sample_params(self.augment, self.seed, epoch, ids, hw[:, 0], hw[:, 1])

    def sizes(self, ids, data: list[bytes]) -> list[tuple[int, int]]:
        return [decoded_size(d, self.reader.table.where(int(i))) for i, d in zip(ids, data, strict=True)]
