"""Attention, forward and forward+backward: dinotron vs torch SDPA (flash, cuDNN, memory-efficient,
math backends), torch.compile of the plain math, and xformers, on DINOv2's ViT shapes.

    python benchmarks/bench_attention.py                       # GPU: the shapes below; CPU: small ones
    python benchmarks/bench_attention.py --cases vit-s-global packed --dtype bfloat16

GPU cases (q, k, v as timm makes them: views into one (B, N, 3, H, D) qkv tensor):
ViT-S/14 global B256 H6 N257 D64, local B1024 H6 N50 D64, ViT-L/14 global B128 H16 N257 D64,
ViT-L/14 at 518 px B32 H16 N1370 D64, ViT-L/14's width as 8 heads of 128 (the kernel's other head dim)
B128 H8 N257 D128, and a packed step of ViT-S global + local crops: dinotron and
xformers (BlockDiagonalMask, as dinov2) in one call, the others as two calls. On CPU the batch
sizes shrink and the dinotron row is what a CPU user gets: the eager fallback, not the Triton
interpreter. TFLOP/s count 4 N^2 D per head for the forward and 3.5x that for forward+backward
(the backward does 2.5x the forward's matmul work), as flash-attn's benchmarks do (benchmarks/roofline.py);
on CUDA each row also gets the op's roofline time and roofline_share, the fraction of it the row reached.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import roofline
from common import add_roofline, add_speedups, peak_mib, save, time_ms
from dinotron.kernels import attention, attention_varlen, make_cu_seqlens, packed_sequences

# name: (groups of (batch, tokens), heads, head dim); CPU batches are divided by CPU_SHRINK
CASES = {
    "vit-s-global": ("ViT-S/14 global", [(256, 257)], 6, 64),
    "vit-s-local": ("ViT-S/14 local", [(1024, 50)], 6, 64),
    "vit-l-global": ("ViT-L/14 global", [(128, 257)], 16, 64),
    "vit-l-518": ("ViT-L/14 518px", [(32, 1370)], 16, 64),
    "vit-l-global-d128": ("ViT-L/14 global, head dim 128", [(128, 257)], 8, 128),
    "packed": ("ViT-S/14 packed global+local", [(256, 257), (1024, 50)], 6, 64),
}
CPU_SHRINK = 32
SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
CUDA_ONLY = ("sdpa_cudnn", "sdpa_efficient")


def heads_first(qkv: torch.Tensor):
    """(B, N, 3, H, D) -> q, k, v of (B, H, N, D), as timm's Attention makes them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def tokens_first(qkv: torch.Tensor):
    """(B, N, 3, H, D) -> q, k, v of (B, N, H, D), xformers' layout."""
    return qkv.unbind(2)


def math_attention(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1) @ v


def load_xformers(device: str):
    """(xformers.ops, None) if its kernels run here, else (None, the reason)."""
    try:
        import xformers.ops as xops
    except Exception as e:  # not installed, or built against another torch
        return None, f"xformers does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        x = torch.randn(1, 8, 1, 64, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        xops.memory_efficient_attention(x, x, x)
    except Exception as e:
        return None, (f"xformers' kernels do not run on {device}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")
    return xops, None


def dense_impls(args, xops):
    """impl name -> fn(qkv) computing attention on one (B, N, 3, H, D) tensor."""
    impls = {"dinotron": lambda qkv: attention(*heads_first(qkv))}
    for name, backend in args.sdpa_backends.items():
        impls[name] = lambda qkv, backend=backend: _sdpa(backend, *heads_first(qkv))
    if args.compile:
        compiled = torch.compile(math_attention)
        impls["torch_compile"] = lambda qkv: compiled(*heads_first(qkv))
    if xops is not None:
        impls["xformers"] = lambda qkv: xops.memory_efficient_attention(*tokens_first(qkv))
    return impls


def _sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def packed_impls(args, xops, groups):
    """impl name -> fn(qkv) on one packed (total_tokens, 3, H, D) tensor: global crops' tokens, then
    local crops' (what the trainer's qkv Linear makes); one call where the impl can, else one per group."""
    lengths = [n for b, n in groups for _ in range(b)]
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    stack = contextlib.ExitStack()
    packing = stack.enter_context(packed_sequences(cu_seqlens.to(args.device), max_seqlen))  # offsets on the device

    def per_group(qkv):
        """Views (B, N, 3, H, D) of each group's tokens."""
        views, start = [], 0
        for b, n in groups:
            views.append(qkv[start:start + b * n].unflatten(0, (b, n)))
            start += b * n
        return views

    impls = {
        "dinotron": lambda qkv: attention_varlen(*qkv.unbind(1), packing, max_seqlen),
        "dinotron_two_calls": lambda qkv: [attention(*heads_first(t)) for t in per_group(qkv)],
    }
    for name, backend in args.sdpa_backends.items():
        impls[name] = lambda qkv, backend=backend: [_sdpa(backend, *heads_first(t)) for t in per_group(qkv)]
    if xops is not None:
        bias = xops.fmha.BlockDiagonalMask.from_seqlens(lengths)
        impls["xformers"] = lambda qkv: xops.memory_efficient_attention(*(t[None] for t in qkv.unbind(1)),
                                                                        attn_bias=bias)
    return impls, stack


def run_case(key: str, args, device: str, xops) -> list[dict]:
    label, groups, heads, head_dim = CASES[key]
    if device == "cpu":
        groups = [(max(1, b // CPU_SHRINK), n) for b, n in groups]
    shape = " + ".join(f"B{b} N{n}" for b, n in groups) + f" H{heads} D{head_dim}"
    if key == "packed":
        impls, stack = packed_impls(args, xops, groups)
        qkv_shape = (sum(b * n for b, n in groups), 3, heads, head_dim)
    else:
        impls, stack = dense_impls(args, xops), contextlib.nullcontext()
        qkv_shape = (groups[0][0], groups[0][1], 3, heads, head_dim)
    rows = []
    with stack:
        for mode in ("fwd", "fwd+bwd"):
            case = f"{label} {shape} {mode}"
            cost = roofline.attention(groups, heads, head_dim, args.dtype.itemsize, backward=mode == "fwd+bwd")
            qkv = torch.randn(qkv_shape, dtype=args.dtype, device=device, requires_grad=mode == "fwd+bwd")
            for impl, fn in impls.items():
                rows.append(measure(case, impl, fn, qkv, cost, device, args))
    return rows


def measure(case, impl, fn, qkv, cost: roofline.Cost, device, args) -> dict:
    def step():
        out = fn(qkv)
        if qkv.requires_grad:
            outs = out if isinstance(out, list) else [out]
            torch.autograd.grad(outs, qkv, [torch.ones_like(o) for o in outs])

    row = {"case": case, "impl": impl}
    try:
        step()  # compiles / autotunes, and surfaces "no kernel for these inputs" before timing
        ms = time_ms(step, device, warmup=args.warmup, rep=args.rep)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        row["note"] = f"does not run: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return row
    row.update(ms=round(ms, 4), tflops=round(cost.flops / ms / 1e9, 3), peak_mib=_round(peak_mib(step, device)))
    add_roofline(row, cost, device)
    return row


def _round(x):
    return None if x is None else round(x, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add torch.compile rows (default: on CUDA only)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rep", type=int, default=None)
    args = parser.parse_args(argv)
    device = args.device
    on_cuda = device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "float32"))
    args.compile = on_cuda if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 3)
    args.rep = args.rep if args.rep is not None else (50 if on_cuda else 15)
    skipped = {} if on_cuda else {name: "a CUDA-only SDPA backend" for name in CUDA_ONLY}
    args.sdpa_backends = {name: b for name, b in SDPA_BACKENDS.items() if name not in skipped}
    xops, skipped["xformers"] = load_xformers(device)
    skipped = {name: reason for name, reason in skipped.items() if reason}
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")
    rows = []
    for key in args.cases:
        rows += run_case(key, args, device, xops)
    add_speedups(rows, ours="dinotron")
    dinotron_path = "triton kernels" if on_cuda and args.dtype != torch.float32 else "eager reference (fallback)"
    extra = {"dtype": str(args.dtype).removeprefix("torch."), "dinotron_path": dinotron_path, "skipped": skipped}
    save("attention", rows, device, metric="tflops", extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
