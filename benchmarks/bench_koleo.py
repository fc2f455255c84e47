"""KoLeo forward+backward: dinotron vs the eager reference, lightly's eager formula and torch.compile.

    python benchmarks/bench_koleo.py                          # GPU: B=128 and B=4096 at D=384
    python benchmarks/bench_koleo.py --B 128 1024 --dtype bfloat16
    python benchmarks/bench_koleo.py --threads 1                # CPU on a shared machine: steadier timings

Each row times loss = koleo(x); loss.backward() on x (B, D) with requires_grad, as the trainer calls it
on the student's cls features of one global crop. Impls: `eager` is dinotron.kernels.reference
(dinov2's math: the B x B similarity matrix), `eager_lightly` lightly 1.6.0's KoLeoLoss.forward
written out (mm, fill_diagonal_(-2), argmax, PairwiseDistance), `torch_compile` that function
compiled, `dinotron` the public koleo_loss (Triton on CUDA; on CPU what a CPU user gets, the eager
fallback, never the Triton interpreter). peak_mib is the memory the call allocates beyond its inputs
(CUDA only): O(B^2) for the eager rows, O(B*D) for the kernel. On CUDA each row also gets the op's
roofline time (benchmarks/roofline.py) and roofline_share, the fraction of it the row reached.
fp32 inputs follow torch.backends.cuda.matmul.allow_tf32 in the eager and compiled rows (--tf32 turns it on, as
dinov2's train.py does; by default it is off); the kernel ignores it: exact fp32 products up to 384 rows, above
that a tf32 candidate search whose candidates are re-ranked in fp32 (kernels/koleo.py), the same neighbours.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import roofline
from common import add_speedups, measure, save
from dinotron.kernels import koleo_loss, reference

GPU_BATCHES, CPU_BATCHES = (128, 4096), (128, 1024)  # default --B (benchmarks/static_report.py compiles at GPU ones)
DIMS = (384, 768)  # ViT-S and ViT-B widths: --D's default is the first; static_report.py compiles both


def lightly_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """lightly 1.6.0's KoLeoLoss(p=2, eps).forward, written out."""
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    cos_sim = torch.mm(x, x.t())
    cos_sim.fill_diagonal_(-2)
    nn_dist = F.pairwise_distance(x, x[cos_sim.argmax(dim=1)], p=2, eps=eps)
    return -(nn_dist + eps).log().mean()


def impls(args) -> dict:
    out = {
        "dinotron": koleo_loss,
        "dinotron_checked": lambda x: koleo_loss(x, check_finite=True),  # NaN/inf check (off by default): a host sync
        "eager": reference.koleo_loss,
        "eager_lightly": lightly_koleo,
    }
    if args.compile:
        out["torch_compile"] = torch.compile(lightly_koleo)
    return out


def measure_step(case: str, impl: str, fn, x: torch.Tensor, device: str, args) -> dict:
    def step():
        x.grad = None
        fn(x).backward()

    return measure(case, impl, step, device, args.warmup, args.rep, cost=roofline.koleo(*x.shape, x.dtype.itemsize))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--B", type=int, nargs="+", default=None,
                        help=f"batch sizes (default: {GPU_BATCHES} on CUDA, {CPU_BATCHES} on CPU)")
    parser.add_argument("--D", type=int, default=DIMS[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--tf32", action="store_true",
                        help="torch.backends.cuda.matmul.allow_tf32 = True (dinov2's setting)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="add the torch.compile row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rep", type=int, default=None)
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.B = args.B or list(GPU_BATCHES if on_cuda else CPU_BATCHES)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 3)
    args.rep = args.rep if args.rep is not None else (50 if on_cuda else 20)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows = []
    fns = impls(args)
    for B in args.B:
        case = f"B={B} D={args.D} {args.dtype} fwd+bwd"
        x = torch.randn(B, args.D, device=args.device).to(dtype).requires_grad_()
        for impl, fn in fns.items():
            rows.append(measure_step(case, impl, fn, x, args.device, args))
    add_speedups(rows, ours="dinotron")
    dinotron_path = "triton kernels" if on_cuda else "eager reference (CPU fallback)"
    save("koleo", rows, args.device, extra={"dtype": args.dtype, "D": args.D, "tf32": args.tf32,
                                            "threads": torch.get_num_threads(), "dinotron_path": dinotron_path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
