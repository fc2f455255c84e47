"""How the loss kernels address their inputs: view tables, grid sizing.

A view table lets one kernel read V views of (B, K) rows wherever they live in one allocation
(lightly passes lists of per-crop outputs, dinov2 chunks one tensor, a (V, B, K) tensor is V views
too) without stacking them into a copy: row b of view v, column k, is at
base + v * view_stride + b * row_stride + k (elements). Views spread over separate allocations, or
unevenly spaced in one, are stacked (one copy). The table is built from tensor metadata alone
(storages and storage offsets): no offset table goes from host to device, nothing is read back, so
it runs inside a torch.library op under CUDA graphs. Integer strides divisible by 16 are specialised
by Triton, which then vectorises the loads. Row r of the table's R = V * B rows is row r % B of view r // B.
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
    base + v * view_stride + b * row_stride + k (in elements)."""

    base: torch.Tensor  # view 0 (its storage holds every view)
    n_views: int
    view_stride: int
    row_stride: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_views, *self.base.shape)


def evenly_spaced(views) -> bool:
    """Whether (B, K) views share one storage, a unit column stride, one row stride and one spacing."""
    v0 = views[0]
    B, K = v0.shape
    storage = v0.untyped_storage().data_ptr()
    spacing = views[1].storage_offset() - v0.storage_offset()
    return all(
        v.untyped_storage().data_ptr() == storage
        and (v.stride(1) == 1 or K == 1)
        and (v.stride(0) == v0.stride(0) or B == 1)
        and v.storage_offset() - v0.storage_offset() == i * spacing
        for i, v in enumerate(views)
    )


def scattered(views) -> bool:
    """Whether a view table would stack `views` (separate allocations, or uneven spacing): callers then
    stack them once themselves rather than have every op that reads them do it. False under
    torch.compile, whose tracer does not look at storages (the ops then stack scattered views)."""
    return not torch.compiler.is_compiling() and len(views) > 1 and not evenly_spaced(views)


def in_place_views(views) -> list[torch.Tensor]:
    """`views`, or the views of one stacked copy of them if they are scattered."""
    return list(torch.stack(views).unbind(0)) if scattered(views) else list(views)


def view_table(views: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> ViewTable:
    """A table over already-checked (B, K) views of one shape, dtype and device (read in place when
    evenly_spaced, else stacked into one contiguous copy)."""
    B, K = views[0].shape
    if len(views) == 1:
        base = views[0] if views[0].stride(1) == 1 or K == 1 else views[0].contiguous()
        return ViewTable(base, 1, 0, base.stride(0) if B > 1 else K)
    if not evenly_spaced(views):
        views = torch.stack(views).unbind(0)
    base = views[0]
    return ViewTable(base, len(views), views[1].storage_offset() - base.storage_offset(),
                     base.stride(0) if B > 1 else K)


def rows_table(x: torch.Tensor) -> ViewTable:
    """The rows of x (..., K) as one view of (R, K) rows."""
    return view_table([x.reshape(-1, x.shape[-1])])


@triton.jit
def lse_pivot(m):
    """The shift of an online log-sum-exp step whose running max is m: m, or 0 where m is -inf, so that a
    leading block of -inf entries adds exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def row_pointers(base_ptr, r, rows_per_view, view_stride, row_stride):
    """Pointers to the first element of rows r (a block of row indices) of a view table."""
    view = r // rows_per_view
    return base_ptr + view.to(tl.int64) * view_stride + (r - view * rows_per_view).to(tl.int64) * row_stride


@dataclass(frozen=True)
class TeacherTargets:
    """Teacher targets for the cross-entropy op, as T views of (B, K), in the tensors and numbers an op takes.

    With row_lse None the views hold the probabilities. Otherwise they hold logits and the targets
    are p[r, k] = exp(x[r, k] * logit_scale + col_scale * col[k] - row_lse[r]), recomputed where
    they are read: softmax centring has col = centre and col_scale = -1 / teacher_temp, Sinkhorn-Knopp
    col = the prototypes' log-sum-exp and col_scale = -1; row_lse normalises each row to sum 1.
    """

    views: list[torch.Tensor]
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


def k_splits(rows: int, K: int, block_k: int, device: torch.device, ctas_per_sm: int) -> tuple[int, int]:
    """(splits, blocks per split): split each row's K columns (cdiv(K, block_k) blocks) between programs so
    that the rows x splits grid fills one wave, ctas_per_sm resident programs on each SM, without exceeding
    it (no tail wave); one split per row when the rows alone fill it. Split boundaries are block boundaries."""
    n_blocks = triton.cdiv(K, block_k)
    splits = max(1, min(n_blocks, ctas_per_sm * num_sms(device) // max(rows, 1)))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split
