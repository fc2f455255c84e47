"""Every dinotron Triton kernel compiled for sm_90 (H100 / H200) as the JIT specialises it at the benchmark shapes,
without a GPU: registers, spills, shared memory, occupancy, grid against the SMs, load widths, cp.async, wgmma.

    python benchmarks/static_report.py              # writes benchmarks/results/static/kernels.json
    python benchmarks/static_report.py --check      # the same, then exit 1 on a failed check (check())
    python benchmarks/static_report.py --only koleo attention --out /tmp/kernels.json

How: each public op runs with backend="triton" on CPU tensors at the shapes of bench_losses.py, bench_koleo.py
and bench_attention.py while every `kernel[grid](...)` launch is intercepted (triton's JITFunction.run and
Autotuner.run are patched), so no kernel executes: outputs stay uninitialised memory, which the ops never
read on the host. For each launch the specialisation is computed by the JIT's own binder and argument packing,
with Triton's CUDA backend for sm_90: pointer and argument dtypes, tt.divisibility 16 for 16-byte-aligned
pointers and ints divisible by 16, ints equal to 1 and None arguments as constants, the constexprs, num_warps
and num_stages (the rules of triton's specialize.cc, the same in 3.6, the GPU machine's Triton, as in 3.8).
An autotuned kernel launches once per config its pruning keeps, so every config it could pick is compiled.
Each distinct specialisation is compiled once (triton.compile, its bundled ptxas; Triton's cache makes reruns
fast) and cuobjdump reads the cubin: REG, SHARED, LOCAL and STACK, and the SASS's STL/LDL (spill stores
and loads). The PTX gives the global loads by width (ld.global.v4 / .v2 / scalar), cp.async and wgmma.
On the GPU side the layout module's num_sms is 132 (an H100 SXM; an H200 has 132 too), the count the
launchers size their grids with; nothing else about the device is assumed.

Occupancy on sm_90: 65,536 registers per SM allocated per warp in units of 256, 228 KiB of shared memory per
SM with 1 KiB reserved per CTA (227 KiB at most for one CTA), 64 warps and 32 CTAs per SM. CTAs per SM is
the least of the three limits; waves = CTAs / (132 * CTAs per SM).

Each op also gets its analytic bytes and flops and its roofline time (benchmarks/roofline.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402
import bench_koleo  # noqa: E402
import bench_losses  # noqa: E402
import dinotron.kernels as dk  # noqa: E402
import roofline  # noqa: E402
from common import versions  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "static" / "kernels.json"
TARGET = GPUTarget("cuda", 90, 32)
SMS = 132
REGS_PER_SM, REG_UNIT = 65536, 256  # registers per SM; a warp's registers are allocated in units of 256
SMEM_PER_SM, SMEM_PER_CTA, SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024  # bytes; 1 KiB per CTA is the system's
WARPS_PER_SM, CTAS_PER_SM = 64, 32
# kernels that stream contiguous rows of logits: the global loads in their loops must be vector loads
LOSS_MODULES = ("cross_entropy", "softmax_center", "sinkhorn_knopp", "fused_head")
WAVE_MIN_BATCH = 128  # from this batch (images, masked patches, sequences) every launch must fill one wave
# kernels allowed a grid under one wave, with the reason
SMALL_GRID_OK = {
    "_ce_combine_kernel": "one program folds the S x B per-split partials (80 KB at B=128) into the loss: "
                          "a few microseconds, single-program for a deterministic sum",
    "_schedule_kernel": "one program per varlen tile size (4) prefix-sums the sequences' tile counts into the "
                        "attention's work schedule: about a microsecond, a sequential scan over the sequences",
}
IBOT_ROWS = 16384  # masked patches of a B=128 step: 2 global crops x 128 images x 256 patches x 25% masked
IBOT_PATCHES = 256  # 224 px / 14 px patches = 16 x 16
HEAD_BOTTLENECK = 256  # DINOHead's bottleneck: the fused head's D
GRAM_SHAPES = ((128, 256, 384), (32, 1369, 1024))  # (B, N, D): ViT-S at 224 px, ViT-L at 518 px (patch 14)


# ----------------------------------------------------------------------------------------------
# Cases: one public op at one benchmark shape
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op at one shape: run() calls the public op (forward + backward where it has one)."""

    op: str
    shape: str
    batch: int  # B: images (masked patches for iBOT, sequences for attention), for the wave check
    cost: roofline.Cost
    run: Callable[[], object]

    @property
    def name(self) -> str:
        return f"{self.op} {self.shape}"


def _empty(*shape, dtype=torch.bfloat16, grad=False) -> torch.Tensor:
    """Uninitialised memory: no kernel runs, so no value is ever read."""
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _dino_cases(B: int, K: int, n_local: int) -> list[Case]:
    S, T = 2 + n_local, 2
    itemsize = torch.bfloat16.itemsize
    shape = f"B={B} K={K} views=2+{n_local} bf16"

    def views(n, grad=False):  # separate (B, K) tensors, as lightly's users and bench_losses pass them
        return [_empty(B, K, grad=grad) for _ in range(n)]

    def loss_module(centering):
        def run():
            fn = dk.DINOLoss(K, bench_losses.TEACHER_TEMP, bench_losses.TEACHER_TEMP,
                             student_temp=bench_losses.STUDENT_TEMP, centering=centering, backend="triton")
            fn(views(T), views(S, grad=True)).backward()
        return run

    def loss_function():
        dk.dino_loss(views(S, grad=True), views(T), backend="triton").backward()

    return [
        Case("dino_loss fwd+bwd", shape, B, roofline.dino_loss(S, T, B, K, itemsize, None), loss_function),
        Case("DINOLoss softmax fwd+bwd", shape, B, roofline.dino_loss(S, T, B, K, itemsize, "softmax"),
             loss_module("softmax")),
        Case("DINOLoss sinkhorn_knopp fwd+bwd", shape, B,
             roofline.dino_loss(S, T, B, K, itemsize, "sinkhorn_knopp"), loss_module("sinkhorn_knopp")),
    ]


def _teacher_cases(B: int, K: int) -> list[Case]:
    R = 2 * B  # both global crops, as dinov2
    itemsize = torch.bfloat16.itemsize
    shape = f"B={B} rows={R} K={K} bf16"
    temp = bench_losses.TEACHER_TEMP
    center = torch.zeros(1, K)
    return [
        Case("softmax_center_teacher", shape, B, roofline.softmax_center_teacher(R, K, itemsize),
             lambda: dk.softmax_center_teacher(_empty(R, K), center, temp, backend="triton")),
        Case("softmax_center_and_update_teacher", shape, B,
             roofline.softmax_center_teacher(R, K, itemsize, update=True),
             lambda: dk.softmax_center_and_update_teacher(_empty(R, K), center, temp, backend="triton")),
        Case("update_center", shape, B, roofline.update_center(R, K, itemsize),
             lambda: dk.update_center(center, _empty(R, K), backend="triton")),
        Case("sinkhorn_knopp_teacher", shape, B, roofline.sinkhorn_knopp_teacher(R, K, itemsize),
             lambda: dk.sinkhorn_knopp_teacher(_empty(R, K), temp, backend="triton")),
    ]


def _ibot_masks(M: int) -> torch.Tensor:
    """(crops, IBOT_PATCHES) bool masks with M masked patches in all, a quarter of each crop's."""
    masks = torch.zeros(M // (IBOT_PATCHES // 4), IBOT_PATCHES, dtype=torch.bool)
    masks[:, : IBOT_PATCHES // 4] = True
    return masks


def _ibot_cases(M: int, K: int) -> list[Case]:
    itemsize = torch.bfloat16.itemsize
    shape = f"masked={M} K={K} bf16"
    masks = _ibot_masks(M)

    def loss_module(centering):
        def run():
            fn = dk.IBOTPatchLoss(K, bench_losses.TEACHER_TEMP, bench_losses.STUDENT_TEMP, centering=centering,
                                  backend="triton")
            fn(_empty(M, K), _empty(M, K, grad=True), masks).backward()
        return run

    def loss_function():
        dk.ibot_patch_loss(_empty(M, K, grad=True), _empty(M, K), masks, backend="triton").backward()

    return [
        Case("ibot_patch_loss fwd+bwd", shape, M, roofline.ibot_patch_loss(M, K, itemsize, None), loss_function),
        Case("IBOTPatchLoss softmax fwd+bwd", shape, M, roofline.ibot_patch_loss(M, K, itemsize, "softmax"),
             loss_module("softmax")),
        Case("IBOTPatchLoss sinkhorn_knopp fwd+bwd", shape, M,
             roofline.ibot_patch_loss(M, K, itemsize, "sinkhorn_knopp"), loss_module("sinkhorn_knopp")),
    ]


def _koleo_cases(batches, dims, dtypes) -> list[Case]:
    def run(B, D, dtype):
        return lambda: dk.koleo_loss(_empty(B, D, dtype=dtype, grad=True), backend="triton").backward()

    return [
        Case("koleo_loss fwd+bwd", f"B={B} D={D} {str(dtype).removeprefix('torch.')}", B,
             roofline.koleo(B, D, dtype.itemsize), run(B, D, dtype))
        for dtype in dtypes for B in batches for D in dims
    ]


def _attention_cases(keys, dtype=torch.float16) -> list[Case]:
    """bench_attention's GPU cases (full batch sizes), forward + backward, q/k/v views of one qkv tensor."""
    out = []
    for key in keys:
        label, groups, heads, head_dim = bench_attention.CASES[key]
        shape = " + ".join(f"B{b} N{n}" for b, n in groups) + f" H{heads} D{head_dim} fp16"
        cost = roofline.attention(groups, heads, head_dim, dtype.itemsize, backward=True)
        if len(groups) == 1:
            (b, n), = groups

            def run(b=b, n=n, heads=heads, head_dim=head_dim):
                qkv = _empty(b, n, 3, heads, head_dim, dtype=dtype, grad=True)
                out = dk.attention(*bench_attention.heads_first(qkv), backend="triton")
                torch.autograd.grad(out, qkv, torch.empty_like(out))
            out.append(Case(f"attention fwd+bwd ({label})", shape, b, cost, run))
        else:
            def run(groups=groups, heads=heads, head_dim=head_dim):
                cu_seqlens, max_seqlen = dk.make_cu_seqlens([n for b, n in groups for _ in range(b)])
                qkv = _empty(sum(b * n for b, n in groups), 3, heads, head_dim, dtype=dtype, grad=True)
                out = dk.attention_varlen(*qkv.unbind(1), cu_seqlens, max_seqlen, backend="triton")
                torch.autograd.grad(out, qkv, torch.empty_like(out))
            out.append(Case(f"attention_varlen fwd+bwd ({label})", shape, sum(b for b, _ in groups), cost, run))
    return out


def _fused_head_cases(S: int, T: int, B: int, M: int, K: int, D: int) -> list[Case]:
    """fused_head_dino_loss and fused_head_ibot_loss (kernels/fused_head.py) on bf16 bottleneck features of
    D = 256 against fp32 (K, D) prototypes (the trainer's parameters under bf16 autocast)."""
    from dinotron.kernels import fused_head

    itemsize, w_itemsize = torch.bfloat16.itemsize, torch.float32.itemsize
    masks = _ibot_masks(M)

    def weights():
        return _empty(K, D, dtype=torch.float32, grad=True), _empty(K, D, dtype=torch.float32)

    def dino(centering):
        def run():
            loss, _ = fused_head.fused_head_dino_loss(_empty(S, B, D, grad=True), _empty(T, B, D), *weights(),
                                                      torch.zeros(1, K), centering=centering, backend="triton")
            loss.backward()
        return run

    def ibot(centering):
        def run():
            loss, _ = fused_head.fused_head_ibot_loss(_empty(M, D, grad=True), _empty(M, D), *weights(), masks,
                                                      center=torch.zeros(1, K), centering=centering,
                                                      backend="triton")
            loss.backward()
        return run

    return [
        case
        for centering in ("softmax", "sinkhorn_knopp")
        for case in (
            Case(f"fused_head_dino_loss {centering} fwd+bwd", f"B={B} K={K} D={D} views=2+{S - 2} bf16", B,
                 roofline.fused_head_loss(S, T, B, K, D, itemsize, w_itemsize, centering), dino(centering)),
            Case(f"fused_head_ibot_loss {centering} fwd+bwd", f"masked={M} K={K} D={D} bf16", M,
                 roofline.fused_head_loss(1, 1, M, K, D, itemsize, w_itemsize, centering), ibot(centering)),
        )
    ]


def _gram_cases(shapes) -> list[Case]:
    """gram_loss (kernels/gram.py, dinov3's Gram anchoring) at its docstring's shapes, bf16 patches."""
    def run(B, N, D):
        return lambda: dk.gram_loss(_empty(B, N, D, grad=True), _empty(B, N, D), backend="triton").backward()

    return [Case("gram_loss fwd+bwd", f"B={B} N={N} D={D} bf16", B, roofline.gram(B, N, D, torch.bfloat16.itemsize),
                 run(B, N, D)) for B, N, D in shapes]


def _has(module: str) -> bool:
    """Whether dinotron.kernels has `module` (kernels being written appear in the report once they exist)."""
    return importlib.util.find_spec(f"dinotron.kernels.{module}") is not None


def cases(only: list[str] | None = None) -> list[Case]:
    """Every op at the benchmarks' GPU shapes; `only`: keep the cases whose name contains one of these."""
    all_cases = [
        *(c for B in bench_losses.GPU_BATCHES for c in _dino_cases(B, bench_losses.N_PROTOTYPES, bench_losses.N_LOCAL)),
        *(c for B in bench_losses.GPU_BATCHES for c in _teacher_cases(B, bench_losses.N_PROTOTYPES)),
        *_ibot_cases(IBOT_ROWS, bench_losses.N_PROTOTYPES),
        *_koleo_cases(bench_koleo.GPU_BATCHES, bench_koleo.DIMS, (torch.float32, torch.bfloat16)),
        *_attention_cases(bench_attention.CASES),
        *(_fused_head_cases(2 + bench_losses.N_LOCAL, 2, max(bench_losses.GPU_BATCHES), IBOT_ROWS,
                            bench_losses.N_PROTOTYPES, HEAD_BOTTLENECK) if _has("fused_head") else []),
        *(_gram_cases(GRAM_SHAPES) if _has("gram") else []),
    ]
    if not only:
        return all_cases
    return [c for c in all_cases if any(word.lower() in c.name.lower() for word in only)]


# ----------------------------------------------------------------------------------------------
# Intercepting the launches
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as the JIT would compile it for sm_90."""

    kernel: JITFunction
    grid: tuple[int, int, int]
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    autotune_candidate: bool

    @property
    def key(self) -> str:
        """What tells compiled kernels apart: the kernel, its specialisation and its options."""
        return repr((self.kernel.module, self.kernel.__name__, self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.__dict__.items())))

    def config(self) -> dict:
        """Constexpr arguments by name (ints equal to 1 and None arguments included), num_warps, num_stages."""
        names = self.kernel.arg_names
        out = {names[path[0]]: _plain(v) for path, v in self.constexprs.items()}
        return {**out, "num_warps": self.options.num_warps, "num_stages": self.options.num_stages}

    def specialisation(self) -> str:
        """The runtime arguments: 'name:type' with '/16' where Triton assumes divisibility by 16."""
        divisible = {self.kernel.arg_names[path[0]] for path in self.attrs}
        return " ".join(f"{n}:{t}{'/16' if n in divisible else ''}" for n, t in self.signature.items()
                        if t != "constexpr")


def _plain(v):
    v = getattr(v, "value", v)  # tl.constexpr
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


class _Interceptor:
    """Records launches instead of running them, with the specialisation the JIT would make for sm_90."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.binders: dict[JITFunction, Callable] = {}
        self.launches: list[Launch] = []
        self.in_autotuner = False

    def jit_run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        # as JITFunction.run: options from the launch's kwargs, then the binder's specialisation
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = self.binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        grid = grid(bound_args) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append(Launch(fn, grid, signature, constexprs, attrs, options, self.in_autotuner))

    def autotuner_run(self, tuner: Autotuner, *args, **kwargs):
        # every config the autotuner would benchmark: its configs after early pruning and the perf model
        tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
        self.in_autotuner = len(tuner.configs) > 1
        try:
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            tuner.nargs, self.in_autotuner = None, False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Launches recorded, not run; the ops take CPU tensors on backend="triton" and size grids for 132 SMs;
        F.linear gives uninitialised memory."""
        interceptor = self

        def jit_run(fn, *args, **kwargs):
            return interceptor.jit_run(fn, *args, **kwargs)

        def autotuner_run(tuner, *args, **kwargs):
            return interceptor.autotuner_run(tuner, *args, **kwargs)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(JITFunction, "run", jit_run))
            stack.enter_context(mock.patch.object(Autotuner, "run", autotuner_run))
            # an op's eager matmuls (cuBLAS on the GPU: the fused head's teacher logits for Sinkhorn-Knopp, 275
            # GFLOP for iBOT) give uninitialised memory of their shape too: minutes on two CPU cores otherwise
            stack.enter_context(mock.patch.object(torch.nn.functional, "linear", _shape_only_linear))
            for module in _kernel_modules():
                resolve = getattr(module, "resolve_backend", None)
                if resolve is not None:  # backend="triton" on CPU tensors, without the interpreter
                    stack.enter_context(mock.patch.object(module, "resolve_backend", _triton_backend(resolve)))
                if hasattr(module, "num_sms"):
                    stack.enter_context(mock.patch.object(module, "num_sms", lambda device: SMS))
            yield


def _shape_only_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[0])


def _triton_backend(resolve):
    def resolve_backend(backend, *tensors):
        return "triton" if backend == "triton" else resolve(backend, *tensors)
    return resolve_backend


def _kernel_modules() -> list:
    return [m for name, m in sorted(sys.modules.items()) if name.startswith("dinotron.kernels") and m is not None]


def capture(case: Case, interceptor: _Interceptor) -> list[Launch]:
    """The launches of one case, each once per distinct (specialisation, grid), with their counts."""
    start = len(interceptor.launches)
    with interceptor.active():
        case.run()
    return interceptor.launches[start:]


# ----------------------------------------------------------------------------------------------
# Compiling and reading the cubin and the PTX
# ----------------------------------------------------------------------------------------------


_CUOBJDUMP = Path(nvidia_compiler.__file__).parent / "bin" / "cuobjdump"


def compile_stats(launch: Launch) -> dict:
    """triton.compile for sm_90 with the launch's specialisation, and what the cubin and PTX say."""
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
                              target=TARGET, options=launch.options.__dict__)
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        resources = _cuobjdump("--dump-resource-usage", f.name)
        usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", resources)}
        # spills live in the stack frame (or local memory): only then is the SASS (seconds to disassemble) read
        sass = _cuobjdump("--dump-sass", f.name) if usage["STACK"] or usage["LOCAL"] else ""
    ptx = compiled.asm["ptx"]
    loads = _global_loads(ptx)
    return {
        "regs": usage["REG"],
        "spill_stores": len(re.findall(r"\bSTL(?:\.\w+)*\s", sass)),  # SASS stores to the stack frame: spills
        "spill_loads": len(re.findall(r"\bLDL(?:\.\w+)*\s", sass)),
        "local_bytes": usage["LOCAL"],
        "stack_bytes": usage["STACK"],
        "shared_bytes": int(compiled.metadata.shared),
        "ld_v4": sum(width == "v4" for width, _ in loads),
        "ld_v2": sum(width == "v2" for width, _ in loads),
        "ld_scalar": sum(width == "scalar" for width, _ in loads),
        "ld_scalar_in_loop": sum(width == "scalar" and in_loop for width, in_loop in loads),
        "cp_async": "cp.async" in ptx,
        "wgmma": "wgmma.mma_async" in ptx,
        "compile_s": round(seconds, 2),
    }


def _cuobjdump(option: str, path: str) -> str:
    return subprocess.run([str(_CUOBJDUMP), option, path], check=True, capture_output=True, text=True).stdout


def _global_loads(ptx: str) -> list[tuple[str, bool]]:
    """(width "v4" | "v2" | "scalar", inside a loop) of each ld.global in the PTX. A loop is the span from a
    label to a branch back to it: the kernels' loops stream the rows, their other loads are per-row scalars."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L\w+):", line))}
    in_loop = [False] * len(lines)
    for j, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if m and labels.get(m.group(1), j) < j:
            in_loop[labels[m.group(1)]:j + 1] = [True] * (j + 1 - labels[m.group(1)])
    loads = []
    for i, line in enumerate(lines):
        for modifiers in re.findall(r"\bld\.global((?:\.[\w:]+)*)", line):
            parts = set(modifiers.split("."))
            loads.append(("v4" if "v4" in parts else "v2" if "v2" in parts else "scalar", in_loop[i]))
    return loads


def occupancy(regs: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(CTAs per SM, the limit that sets it) on sm_90."""
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps if regs else CTAS_PER_SM,
        "shared": SMEM_PER_SM // (shared + SMEM_RESERVED),
        "warps": WARPS_PER_SM // num_warps,
        "ctas": CTAS_PER_SM,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def kernel_row(case: Case, launch: Launch, count: int, stats: dict) -> dict:
    ctas = launch.grid[0] * launch.grid[1] * launch.grid[2]
    per_sm, limit = occupancy(stats["regs"], stats["shared_bytes"], launch.options.num_warps)
    return {
        "case": case.name,
        "kernel": launch.kernel.__name__,
        "module": launch.kernel.module.removeprefix("dinotron.kernels."),
        "config": launch.config(),
        "autotune_candidate": launch.autotune_candidate,
        "launches": count,
        "grid": list(launch.grid),
        "ctas": ctas,
        "ctas_per_sm": per_sm,
        "occupancy_limit": limit,
        "waves": round(ctas / (SMS * per_sm), 3) if per_sm else None,
        **stats,
        "specialisation": launch.specialisation(),
    }


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------


def check(record: dict) -> list[str]:
    """What fails, one line per failing kernel row with its figures: an op that did not run; a spill (STL/LDL
    in the SASS, a stack frame or local memory); shared memory over 227 KiB; a scalar global load inside a loop
    of a loss kernel (the loops stream contiguous rows; a per-row scalar such as the loss's gradient or a row's
    log-sum-exp, loaded once outside them, is exempt); a grid under one wave (132 CTAs) at a batch of 128 or
    more, for a kernel not in SMALL_GRID_OK."""
    batch_of = {op["case"]: op["batch"] for op in record["ops"]}
    failures = [f"{op['case']}: does not run: {op['error']}" for op in record["ops"] if op.get("error")]
    for r in record["kernels"]:
        where = f"{r['case']} / {r['kernel']} {_short_config(r['config'])}"
        if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"] or r["local_bytes"]:
            failures.append(f"{where}: spills ({r['spill_stores']} STL, {r['spill_loads']} LDL, {r['stack_bytes']} B "
                            f"stack frame, {r['local_bytes']} B local; {r['regs']} registers)")
        if r["shared_bytes"] > SMEM_PER_CTA:
            failures.append(f"{where}: {r['shared_bytes'] / 1024:.1f} KiB shared memory > 227 KiB")
        if r["module"] in LOSS_MODULES and r["ld_scalar_in_loop"]:
            failures.append(f"{where}: {r['ld_scalar_in_loop']} scalar global loads in its loops over the rows "
                            f"(all loads: v4 {r['ld_v4']}, v2 {r['ld_v2']}, scalar {r['ld_scalar']})")
        if batch_of[r["case"]] >= WAVE_MIN_BATCH and r["ctas"] < SMS and r["kernel"] not in SMALL_GRID_OK:
            failures.append(f"{where}: grid {r['grid']} = {r['ctas']} CTAs < one wave ({SMS} SMs)")
    return failures


def _short_config(config: dict) -> str:
    return "[" + " ".join(f"{k}={v}" for k, v in config.items() if k.isupper() or k.startswith("num_")) + "]"


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    ops: list[dict] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)


def build(selected: list[Case], jobs: int, log=print) -> Report:
    """Capture every case's launches, compile each distinct specialisation once (`jobs` at a time)."""
    interceptor = _Interceptor()
    per_case: list[tuple[Case, list[Launch], str | None]] = []
    for case in selected:
        start = time.perf_counter()
        try:
            launches, error = capture(case, interceptor), None
        except Exception as e:  # a case that does not run is a failed check, not a stopped report
            launches, error = [], f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        per_case.append((case, launches, error))
        log(f"captured {case.name}: {len(launches)} launches ({time.perf_counter() - start:.1f} s)"
            + (f" ERROR {error}" if error else ""))
    distinct = {launch.key: launch for _, launches, _ in per_case for launch in launches}
    log(f"compiling {len(distinct)} distinct specialisations for sm_90 with {jobs} jobs")
    start = time.perf_counter()
    done = itertools.count(1)

    def compile_one(launch: Launch) -> dict:
        stats = compile_stats(launch)
        if (n := next(done)) % 25 == 0:
            log(f"  {n} / {len(distinct)} compiled ({time.perf_counter() - start:.0f} s)")
        return stats

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        stats = dict(zip(distinct, pool.map(compile_one, distinct.values()), strict=True))
    log(f"compiled in {time.perf_counter() - start:.1f} s")
    report = Report()
    for case, launches, error in per_case:
        counts: dict[tuple, list] = {}
        for launch in launches:
            counts.setdefault((launch.key, launch.grid), [launch, 0])[1] += 1
        report.kernels += [kernel_row(case, launch, n, stats[launch.key]) for launch, n in counts.values()]
        op = {"case": case.name, "op": case.op, "shape": case.shape, "batch": case.batch, **case.cost.as_dict(),
              "kernel_rows": len(counts)}
        report.ops.append({**op, "error": error} if error else op)
    return report


def record_of(report: Report, seconds: float) -> dict:
    """The JSON object: the results format's keys (rows: one per op case, for benchmarks/report.py), the
    machine model, and the per-kernel rows."""
    return {
        "bench": "static_kernels",
        "device": "sm_90 compile, no GPU (H100/H200 limits)",
        **versions(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/static_report.py", *sys.argv[1:]]),
        "compiled_by": f"triton {triton.__version__} (its bundled ptxas) for GPUTarget('cuda', 90, 32); "
                       "the GPU machine runs triton 3.6, whose specialisation rules are the same",
        "machine": {"sms": SMS, "regs_per_sm": REGS_PER_SM, "smem_per_sm": SMEM_PER_SM, "smem_per_cta": SMEM_PER_CTA,
                    "warps_per_sm": WARPS_PER_SM, "hbm_bytes_per_s": roofline.HBM_BYTES_PER_S,
                    "peak_flops": roofline.PEAK_FLOPS},
        "seconds": round(seconds, 1),
        "rows": [{"case": op["case"], "impl": "dinotron sm_90 static", "roofline_ms": op["roofline_ms"],
                  "kernel_rows": op["kernel_rows"]} for op in report.ops],
        "ops": report.ops,
        "kernels": report.kernels,
    }


def print_summary(record: dict) -> None:
    head = ("kernel", "case", "grid", "warps", "regs", "spill", "smem_KiB", "cta/SM", "waves", "v4/v2/scalar(loop)",
            "cp.async", "wgmma")
    print("  ".join(head))
    for r in record["kernels"]:
        loads = f"{r['ld_v4']}/{r['ld_v2']}/{r['ld_scalar']}({r['ld_scalar_in_loop']})"
        print("  ".join(str(x) for x in (
            r["kernel"], r["case"], r["ctas"], r["config"]["num_warps"], r["regs"],
            f"{r['spill_stores']}/{r['spill_loads']}", round(r["shared_bytes"] / 1024, 1), r["ctas_per_sm"],
            r["waves"], loads, r["cp_async"], r["wgmma"])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="+", default=None, help="keep the cases whose name contains one of these")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles at a time")
    parser.add_argument("--check", action="store_true", help="exit 1 if check() finds a failure")
    parser.add_argument("--quiet", action="store_true", help="no per-kernel table")
    args = parser.parse_args(argv)
    if knobs.runtime.interpret:  # the kernels would be the interpreter's, which nothing compiles
        sys.exit("static_report.py compiles for sm_90: run it without TRITON_INTERPRET")
    start = time.perf_counter()
    report = build(cases(args.only), args.jobs)
    record = record_of(report, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if not args.quiet:
        print_summary(record)
    failures = check(record)
    for line in failures:
        print("FAIL", line)
    print(f"{len(record['kernels'])} kernel rows, {len(failures)} failures, {record['seconds']} s: wrote {args.out}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
