"""How the loss kernels address their inputs: view tables, lazy teacher targets, grid sizing.

A view table lets one kernel read V views of (B, K) rows wherever they live (lightly passes lists of
per-crop outputs, dinov2 chunks one tensor, a (V, B, K) tensor is V views too) without stacking
them into a copy: the kernel takes the first view's pointer and, per view, the element offset of
that view from it. Row r of the table's R = V * B rows is row r % B of view r // B.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dinotron.kernels.backend import interpreter_enabled


@dataclass(frozen=True)
class ViewTable:
    """V views of (B, K) rows of one dtype: kernels read view v's row b, column k at
    base_ptr + offsets[v] + b * row_stride + k (in elements)."""

    views: tuple[torch.Tensor, ...]  # kept alive while kernels read them; views[0] is the base pointer
    offsets: torch.Tensor  # (V,) int64 on the views' device
    row_stride: int
    align: int  # every offset is a multiple of it (elements; up to 16 bytes): lets the GPU vectorise loads

    @property
    def base(self) -> torch.Tensor:
        return self.views[0]

    @property
    def n_views(self) -> int:
        return len(self.views)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.views), *self.views[0].shape)


def view_table(views: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> ViewTable:
    """A table over already-checked (B, K) views of one shape, dtype and device.

    Views with a unit column stride and one common row stride are read in place; otherwise all are
    made contiguous (a copy). Offsets between separate allocations are exact multiples of the element
    size on every allocator torch has, and are checked.
    """
    B, K = views[0].shape
    strided = all(v.stride(1) == 1 or K == 1 for v in views) and len({v.stride(0) if B > 1 else K for v in views}) == 1
    if not strided:
        views = [v.contiguous() for v in views]
    itemsize = views[0].element_size()
    starts = [v.data_ptr() - views[0].data_ptr() for v in views]
    if any(s % itemsize for s in starts):
        views = [v.contiguous() for v in views]
        starts = [v.data_ptr() - views[0].data_ptr() for v in views]
    offsets = [s // itemsize for s in starts]
    align = 16 // itemsize
    while any(o % align for o in offsets):
        align //= 2
    row_stride = views[0].stride(0) if B > 1 else K
    offsets = torch.tensor(offsets, dtype=torch.int64).to(views[0].device, non_blocking=True)
    return ViewTable(tuple(views), offsets, row_stride, align)


def rows_table(x: torch.Tensor) -> ViewTable:
    """The rows of x (..., K) as one view of (R, K) rows."""
    rows = x.reshape(-1, x.shape[-1])
    return view_table([rows])


@triton.jit
def row_pointers(base_ptr, offsets_ptr, r, rows_per_view, row_stride, ALIGN: tl.constexpr):
    """Pointers to the first element of rows r (a block of row indices) of a view table."""
    view = r // rows_per_view
    offsets = tl.multiple_of(tl.load(offsets_ptr + view), ALIGN)
    return base_ptr + offsets + (r - view * rows_per_view).to(tl.int64) * row_stride


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher targets for the cross-entropy kernel, as T views of (B, K).

    With row_lse None the views hold the probabilities. Otherwise they hold logits and the targets
    are p[r, k] = exp(x[r, k] * logit_scale + col_scale * col[k] - row_lse[r]), recomputed where
    they are read: softmax centring has col = centre and col_scale = -1 / teacher_temp, Sinkhorn-Knopp
    col = the prototypes' log-sum-exp and col_scale = -1; row_lse normalises each row to sum 1.
    """

    views: ViewTable
    row_lse: torch.Tensor | None = None  # (T * B,) float32
    col: torch.Tensor | None = None  # (K,) any float dtype
    col_scale: float = 0.0
    logit_scale: float = 1.0


def tile(elements: int) -> int:
    """Elements per tile: `elements` on a GPU, 16x more in the Triton interpreter, whose cost is per
    program and per op, not per element (same code paths, fewer loop trips)."""
    return elements * 16 if interpreter_enabled() else elements


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def k_splits(rows: int, K: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split): split each row's K columns between programs until there are
    about four programs per SM, keeping at least one block per split."""
    n_blocks = triton.cdiv(K, block_k)
    splits = max(1, min(n_blocks, triton.cdiv(4 * num_sms(device), rows)))
    cols_per_split = triton.cdiv(n_blocks, splits) * block_k
    return triton.cdiv(K, cols_per_split), cols_per_split
