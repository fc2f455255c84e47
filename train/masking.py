"""iBOT block masking of the student's global crops, as dinov2 (data/masking.py + collate)."""
from __future__ import annotations

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


def sample_masks(
    n_images: int,
    generator: BlockMaskGenerator,
    rng: random.Random,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """(n_images, H*W) bool masks: int(n_images * mask_probability) images get a block mask whose
    ratio is drawn from consecutive slices of ratio_min_max (so ratios spread over the range), the
    rest none; the order is shuffled. As dinov2's collate_data_and_cast."""
    n_patches = generator.height * generator.width
    n_masked = int(n_images * mask_probability)
    bounds = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1).tolist()
    masks = [generator(int(n_patches * rng.uniform(bounds[i], bounds[i + 1])), rng).flatten() for i in range(n_masked)]
    masks += [torch.zeros(n_patches, dtype=torch.bool)] * (n_images - n_masked)
    rng.shuffle(masks)
    return torch.stack(masks)
