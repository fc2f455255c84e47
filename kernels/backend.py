"""Which implementation an op runs: the Triton kernel or the eager reference.

backend=None reads DINOTRON_BACKEND (default "auto"); "auto" picks Triton for CUDA tensors and the
eager reference otherwise (float64 too: the kernels take fp32, fp16 and bf16); "triton" on CPU tensors
needs the Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported). Either way the
op is the same torch.library op: the choice is one of its arguments.
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
    double = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and not double else "eager"
    if backend == "triton" and double:
        raise ValueError("backend='triton' takes float32, float16 or bfloat16 tensors, got float64: "
                         "use backend='eager'")
    if backend == "triton" and not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {devices}; to run the kernels on CPU set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='eager'"
        )
    return backend
