"""iBOT block masking of the student's global crops, as dinov2 (data/masking.py + collate), world-size free.

dinov2's collate masks exactly int(n * mask_probability) of a batch's n global crops, the i-th of them with a
ratio drawn uniformly from the i-th of n_masked equal slices of mask_ratio_min_max, in shuffled order. Here n
is the global batch of a step (every rank's crops), and every random choice is keyed by what it is about, not
by the rank that makes it:

- the assignment (which crops are masked, each one's ratio) is drawn from (seed, step) alone;
- crop (view v, image g) gets its rectangles from a generator keyed by (seed, step, v, g).

Global image g of a step, for rank r of R with B images per rank: g = j * R + r for the rank's row j (the
loaders deal each epoch's permutation round-robin, so row j of rank r is epoch position (b*B + j) * R + r at
batch b). Global crop c = v * (B * R) + g; a rank's rows are view-major, v * B + j. Any R with the same B * R
thus gives every image the same masks. Cost per step and rank: O(n) for the assignment (a randperm of the
global crops) plus the rectangles of the rank's own masked crops; no communication.
"""
from __future__ import annotations

import hashlib
import math
import random

import torch


class BlockMaskGenerator:
    """Masks about `n` patches of an (H, W) grid as a union of random rectangles (BEiT/dinov2).

    Each rectangle has an area in [min_num_patches, remaining budget capped at max_num_patches] and a
    log-uniform aspect ratio in [min_aspect, 1 / min_aspect]; rectangles that would add nothing or
    overshoot the budget are redrawn (10 tries), and generation stops when a round adds nothing.
    """

    def __init__(self, grid: tuple[int, int], max_num_patches: float | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3):
        self.height, self.width = grid
        self.max_num_patches = max_num_patches if max_num_patches is not None else 0.5 * self.height * self.width
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_rectangle(self, mask: torch.Tensor, budget: float, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w >= self.width or h >= self.height:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> torch.Tensor:
        """(H, W) bool mask with at most about `num_masking_patches` True entries."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_rectangle(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def _seed(*key: int) -> int:
    """A 64-bit seed from integers; different keys give unrelated streams (blake2b of the key)."""
    digest = hashlib.blake2b(repr(("dinotron.masking", *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_masks_for_rank(
    step: int,
    seed: int,
    generator: BlockMaskGenerator,
    n_global: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """iBOT masks of this rank's global crops at `step`: (n_global * batch_size, H*W) bool on CPU, rows view-major
    (v * batch_size + j), as the model takes them.

    Of the step's n = n_global * batch_size * world global crops, exactly int(n * mask_probability) are masked,
    with ratios stratified over mask_ratio_min_max, as dinov2's collate_data_and_cast; which crops and which
    ratios depend on (seed, step) only, and a crop's rectangles on (seed, step, view, global image index), so
    the concatenation over ranks (interleaved as the module docstring says) is the same for any `world` with
    the same batch_size * world. CPU work only (Python loops over the rank's masked crops); no collective.
    """
    if n_global < 1 or batch_size < 1:
        raise ValueError(f"n_global and batch_size must be >= 1, got n_global={n_global}, batch_size={batch_size}")
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    n_patches = generator.height * generator.width
    images = batch_size * world
    n = n_global * images
    n_masked = int(n * mask_probability)
    g = torch.Generator().manual_seed(_seed(seed, step))
    bounds = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1, dtype=torch.float64)
    u = torch.rand(n_masked, generator=g, dtype=torch.float64)
    ratios = (bounds[:-1] + (bounds[1:] - bounds[:-1]) * u).tolist()  # the i-th masked crop's ratio, in slice i
    slot = torch.empty(n, dtype=torch.long)
    slot[torch.randperm(n, generator=g)] = torch.arange(n)  # crop c takes ratio slot[c] when slot[c] < n_masked
    slot = slot.tolist()
    masks = torch.zeros(n_global, batch_size, n_patches, dtype=torch.bool)
    for v in range(n_global):
        for j in range(batch_size):
            image = j * world + rank
            i = slot[v * images + image]
            if i < n_masked:
                rng = random.Random(_seed(seed, step, v, image))
                masks[v, j] = generator(int(n_patches * ratios[i]), rng).flatten()
    return masks.flatten(0, 1)


def masked_patch_indices(masks: torch.Tensor) -> torch.Tensor:
    """(M,) int64 flat indices of the True entries of `masks` (any shape), in row-major order: the rows of
    x.flatten(0, masks.ndim - 1) that x[masks] picks, in its order, so that index_select(0, indices) of that equals
    x[masks]. Made on the host with the masks (dinov2's collate makes its mask_indices_list there too), it spares
    the device the nonzero() behind boolean indexing, a host sync; on a device tensor it is that same sync."""
    return masks.flatten().nonzero().squeeze(1)
