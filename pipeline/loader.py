"""What the DALI and torchvision loaders share: sample order per epoch and rank, position, resume state, reading
samples (bad ones skipped or raised), and the background feeder that reads ahead.

Order, read_order="random": epoch e visits a permutation of all N samples drawn from (seed, e) (or 0..N-1
unshuffled); rank r of R takes every R-th sample of it (unshuffled: the r-th contiguous block). read_order=
"sequential" (for network storage): the shards in an order drawn from (seed, e), their samples in file order,
rank r takes the r-th contiguous block of that sequence (so it reads whole shards, one after another) and
shuffles it within windows of `shuffle_buffer` samples. With drop_last every rank gets floor(N / R) samples cut
into floor(. / B) full batches, so all ranks run the same number of steps; without it every sample is seen
exactly once per epoch.

Bad samples: a sample whose image does not read (see `BatchReader`) is skipped (on_error="skip") or raises
ShardError naming shard and key (on_error="raise"). A skipped sample i of epoch e is replaced by the first good one
of j_k = hash(seed, e, i, k) mod N, k = 1, 2, ...: its slot gets j_k's image and label, and the crops drawn for i,
so batches stay full and the choice depends only on (seed, epoch, sample) and the data, as the crops do: a resumed
run, another batch size or rank count replaces it the same way.
"""
from __future__ import annotations

import logging
import math
import types
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dinotron.pipeline.augment import MultiCropConfig, sample_params
from dinotron.pipeline.shards import MAX_IMAGE_PIXELS, SampleReader, SampleTable, ShardError, inspect_image

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


class TooManyBadSamples(ShardError):
    """More of a rank's samples of one epoch were bad than max_bad_fraction allows."""


ON_ERROR = ("skip", "raise")
READ_ORDERS = ("random", "sequential")
# Replacement candidates tried for one bad sample before giving up: with a bad fraction f under max_bad_fraction
# (0.01 by default) all of them are bad with probability f^16, never in practice; a dataset where it happens is
# mostly bad.
MAX_REPLACEMENTS = 16


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
                 num_shards: int | None = None, shuffle: bool = True, drop_last: bool = True, on_error: str = "skip",
                 max_bad_fraction: float = 0.01, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 read_order: str = "random", shuffle_buffer: int = 10_000, read_ahead: int = 2, read_threads: int = 2):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not 1 <= max_image_pixels <= MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels must be in [1, {MAX_IMAGE_PIXELS}] (PIL refuses larger images), got "
                             f"{max_image_pixels}")
        if read_order not in READ_ORDERS:
            raise ValueError(f"read_order must be 'random' or 'sequential', got {read_order!r}")
        if shuffle_buffer < 1 or read_ahead < 1 or read_threads < 1:
            raise ValueError(f"shuffle_buffer, read_ahead and read_threads must be >= 1, got {shuffle_buffer}, "
                             f"{read_ahead}, {read_threads}")
        self.table = SampleTable.from_shards(shards)
        self.reader = SampleReader(self.table, sequential=read_order == "sequential")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_id, self.num_shards = resolve_rank(shard_id, num_shards)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.read_order, self.shuffle_buffer = read_order, shuffle_buffer
        self.read_ahead, self.read_threads = read_ahead, read_threads
        self.on_error, self.max_bad_fraction = on_error, max_bad_fraction
        self.batch_reader = BatchReader(self.reader, seed=self.seed, on_error=on_error,
                                        max_image_pixels=max_image_pixels)
        self.bad_counts: dict[str, int] = {}  # {shard: distinct bad samples met}, by this process
        self.bad_in_epoch = 0  # bad samples met in self._bad_epoch's consumed batches (what max_bad_fraction caps)
        self._bad_epoch = 0
        self._bad_seen: set[int] = set()
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
        if self.read_order == "sequential":
            order = self._sequential_order(epoch)
        elif self.shuffle:
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

    def _sequential_order(self, epoch: int) -> np.ndarray:
        """Block k of the samples of the shards in an order drawn from (seed, epoch) (file order unshuffled), each
        window of shuffle_buffer samples permuted by (seed, epoch, rank). O(S + N / R)."""
        n, r, k, counts = len(self.table), self.num_shards, self.shard_id, self.table.counts
        perm = np.arange(len(counts))
        if self.shuffle:
            np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5E9]).shuffle(perm)
        lo = k * (n // r) + (0 if self.drop_last else min(k, n % r))
        hi = lo + n // r + (0 if self.drop_last or k >= n % r else 1)
        ends = np.cumsum(counts[perm])  # end of each shard of the sequence
        first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
        parts = [np.arange(self.table.starts[s], self.table.starts[s + 1]) for s in perm[first:last + 1]]
        skip = lo - (int(ends[first - 1]) if first else 0)
        order = np.concatenate(parts)[skip:skip + hi - lo].astype(np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, k, 0xB0F])
            for w in range(0, len(order), self.shuffle_buffer):
                rng.shuffle(order[w:w + self.shuffle_buffer])
        return order

    def batch_ids(self, epoch: int, b: int) -> np.ndarray:
        return self.epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (its own shuffle) from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """{"epoch", "position" (batches consumed in the epoch), ...}: enough to resume exactly."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.table),
                "batch_size": self.batch_size, "num_shards": self.num_shards, "read_order": self.read_order,
                "bad_in_epoch": self.bad_in_epoch if self._bad_epoch == self.epoch else 0}

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
        if state.get("read_order", self.read_order) != self.read_order:
            log.warning("resuming with read_order=%s instead of %s: the rest of epoch %d follows the new order "
                        "(samples of it may repeat or be skipped)", self.read_order, state["read_order"], epoch)
        self.seed = self.batch_reader.seed = int(state.get("seed", self.seed))
        self._order_cache = None
        self.epoch, self.position = epoch, min(position, len(self))
        self._bad_epoch, self.bad_in_epoch = epoch, int(state.get("bad_in_epoch", 0))

    def __iter__(self):
        """One epoch from the current position. An epoch that was already exhausted moves on to the next one."""
        if self.position >= len(self):
            self.set_epoch(self.epoch + 1)
        for batch in self._batches(self.epoch, self.position):
            self.position += 1
            yield batch

    def _batches(self, epoch: int, start: int):
        raise NotImplementedError

    def _account(self, epoch: int, bad: list[tuple[int, str]]) -> None:
        """Count and log (once per sample and process) the bad samples `bad` [(sample, reason)] that a batch of
        `epoch` about to be yielded met; TooManyBadSamples where the epoch's count passes max_bad_fraction."""
        if epoch != self._bad_epoch:
            self._bad_epoch, self.bad_in_epoch = epoch, 0
        for i, reason in bad:
            self.bad_in_epoch += 1
            if i not in self._bad_seen:
                self._bad_seen.add(i)
                shard = self.table.shards[self.table.locate(i)[0]]
                self.bad_counts[shard] = self.bad_counts.get(shard, 0) + 1
                log.warning("skipping a bad sample (on_error=skip): %s: %s", self.table.where(i), reason)
        if bad and self.bad_in_epoch > self.max_bad_fraction * self.num_samples():
            i, reason = bad[-1]
            raise TooManyBadSamples(
                f"{self.bad_in_epoch} bad samples in epoch {epoch} on rank {self.shard_id}, more than "
                f"max_bad_fraction={self.max_bad_fraction} of its {self.num_samples()} samples (data.max_bad_fraction);"
                f" the last: {self.table.where(i)}: {reason}. List them all with `dinotron check-shards`, then fix "
                "or drop the shards, or raise the limit")

    def close(self, wait: bool = True) -> None:
        """Stop background reading; the loader can still be iterated (it starts again)."""


class BatchReader:
    """Reads the samples of a batch, replacing or raising on bad ones (see the module docstring); picklable.

    A sample is bad where its image is over `max_image_pixels`, is not an image, is a JPEG cut short (see
    shards.inspect_image: from the header, before any decoding), or fails the loader's decoder: `decode` for the
    torchvision loaders, and for DALI a sample of a failed batch that PIL cannot decode, remembered in `known_bad`.
    """

    def __init__(self, reader: SampleReader, *, seed: int, on_error: str, max_image_pixels: int):
        self.reader, self.seed, self.on_error, self.max_image_pixels = reader, seed, on_error, max_image_pixels
        self.known_bad: dict[int, str] = {}  # sample -> reason, found by the consumer (DALI's decoder failing)

    def __getstate__(self):
        return {**self.__dict__, "known_bad": {}}

    def replacement(self, epoch: int, i: int, k: int) -> int:
        """The k-th candidate (k >= 1) to replace sample i in `epoch`: uniform over all samples, from (seed, epoch,
        i, k) alone."""
        key = [self.seed & 0xFFFFFFFF, epoch, i, k, 0xBAD]
        return int(np.random.default_rng(key).integers(len(self.reader.table)))

    def read(self, epoch: int, ids, decode=None):
        """(used, data, sizes, decoded, bad) for the samples `ids` of `epoch`: used[j] is the sample filling slot j
        (ids[j], or its replacement), data[j] its encoded image (uint8 array, a copy: reading it is done here),
        sizes[j] its (height, width), decoded[j] decode(data[j], where) (None without `decode`, which raises
        ShardError on a bad image), bad [(sample, reason)] the bad samples met. ShardError naming shard and key at
        the first bad sample with on_error="raise"."""
        used, data, sizes, decoded, bad = [], [], [], [], []
        table = self.reader.table
        for i in (int(i) for i in ids):
            candidate = i
            for k in range(1, MAX_REPLACEMENTS + 2):
                raw = np.frombuffer(self.reader.image(candidate).tobytes(), np.uint8)
                size, reason = inspect_image(raw, self.max_image_pixels)
                reason = reason or self.known_bad.get(candidate)
                image = None
                if reason is None and decode is not None:
                    try:
                        image = decode(raw, table.where(candidate))
                    except ShardError as e:
                        reason = str(e).removeprefix(table.where(candidate) + ": ")
                if reason is None:
                    break
                if self.on_error == "raise":
                    raise ShardError(f"{table.where(candidate)}: {reason}")
                bad.append((candidate, reason))
                candidate = self.replacement(epoch, i, k)
            else:
                raise ShardError(f"{table.where(i)} and {MAX_REPLACEMENTS} replacements for it are all bad (the last: "
                                 f"{table.where(bad[-1][0])}: {bad[-1][1]}): most of the data is unreadable")
            used.append(candidate)
            data.append(raw)
            sizes.append(size)
            decoded.append(image)
        return np.array(used, np.int64), data, sizes, decoded, bad


def _weak(fn):
    """A callable returning fn: a weak reference for a bound method (None once its object is gone)."""
    return weakref.WeakMethod(fn) if isinstance(fn, types.MethodType) else lambda: fn


class ReadAhead:
    """A background feeder: fn(position) for `first` and the positions after it (advance(position) -> the next, or
    None at the end) on `threads` threads, at most `depth` of them ahead of the consumer (a bounded queue).

    next() -> (position, fn's result) in order, blocking until it is ready, and re-raises there what fn raised (on
    the consumer's thread, with its traceback). close() cancels what has not started and waits for what has.
    """

    def __init__(self, fn, first, advance, *, depth: int, threads: int):
        # Bound methods are held weakly: a loader keeping its own feeder would otherwise be a reference cycle, freed
        # only by the garbage collector, which may run in a forked DataLoader worker; there a DALI pipeline's
        # finaliser crashes the worker (seen: SIGSEGV in Pipeline._shutdown under PIL's import in the worker).
        self._fn, self._advance = _weak(fn), _weak(advance)
        self.depth = depth
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dinotron-read")
        self._queue: deque = deque()
        self._next = first
        self._fill()

    def _fill(self) -> None:
        fn, advance = self._fn(), self._advance()
        while self._next is not None and len(self._queue) < self.depth:
            self._queue.append((self._next, self._pool.submit(fn, self._next)))
            self._next = advance(self._next)

    def __iter__(self):
        return self

    def __next__(self):
        if not self._queue:
            raise StopIteration
        position, future = self._queue.popleft()
        try:
            result = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return position, result

    def close(self, wait: bool = True) -> None:
        """Cancel the queued work; with `wait`, return once the running calls have ended (wait=False from a
        finaliser, which may run on a feeder thread)."""
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self._next = None
        self._pool.shutdown(wait=wait, cancel_futures=True)


class MultiCropSource:
    """Encoded images, their augmentation parameters and labels for a batch of sample ids (picklable)."""

    def __init__(self, batch_reader: BatchReader, augment: MultiCropConfig, seed: int):
        self.batch_reader, self.augment, self.seed = batch_reader, augment, seed
        self.reader = batch_reader.reader

    def params(self, epoch: int, ids, sizes) -> np.ndarray:
        """(len(ids), n_views, N_PARAMS) float32 for the slots of sample `ids` (a replaced sample's slot keeps its
        crops); sizes: [(height, width)] of the images that fill them."""
        hw = np.asarray(sizes, np.int64).reshape(-1, 2)
        return sample_params(self.augment, self.seed, epoch, ids, hw[:, 0], hw[:, 1])
