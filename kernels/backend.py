"""Which implementation an op runs: the Triton kernel or the eager reference.

backend=None reads DINOTRON_BACKEND (default "auto"); "auto" picks Triton for CUDA tensors and the
eager reference otherwise; "triton" on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1
set before triton is first imported).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "eager")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return "triton" or "eager" for an op on `tensors`."""
    if backend is None:
        backend = os.environ.get("DINOTRON_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (argument or DINOTRON_BACKEND)")
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda else "eager"
    if backend == "triton" and not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {devices}; to run the kernels on CPU set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='eager'"
        )
    return backend
