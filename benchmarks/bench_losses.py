"""DINO loss step (teacher centring + cross-entropy + centre update, forward+backward) and Sinkhorn-Knopp:
dinotron vs eager PyTorch and torch.compile.

    python benchmarks/bench_losses.py                     # GPU: B=64,128, K=65536, 2+8 views, fp32 and bf16
    python benchmarks/bench_losses.py --B 128 --dtype bfloat16 --no-compile
    python benchmarks/bench_losses.py --threads 1         # CPU on a shared machine: steadier timings

DINO rows time one training step of the loss, as lightly's DINOLoss is called: `loss =
fn(teacher_out, student_out)` on lists of T=2 teacher and S=2+n_local student (B, K) views (separate
tensors, student ones requiring grad), then `loss.backward()`. Impls: `eager_lightly` is the loop
of facebookresearch/dino's DINOLoss that lightly used before 1.6 (a log_softmax per pair),
`eager_vectorised` lightly 1.6.0's DINOLoss.forward written out (stack, softmax, log_softmax, one
einsum), `torch_compile` that function compiled, `dinotron` dinotron.kernels.DINOLoss (on CUDA the
fused kernels; on CPU what a CPU user gets, the eager fallback, never the Triton interpreter),
`dinotron_checked` the same with check_finite=True (one host sync per step; off by default).
peak_mib (CUDA only) is what the step allocates beyond its inputs: the returned gradient (S x B x K)
is part of it. The student views are separate tensors, as lightly's users pass them: dinotron stacks
them once in forward and once in backward (views of one tensor, or an (S, B, K) tensor, are read in place).
Sinkhorn rows time the teacher targets of 2B rows (both global crops, as dinov2), forward only:
`eager_dinov2` is dinov2's sinkhorn_knopp_teacher (exp of the logits, in place divisions),
`eager_logspace` dinotron's reference, `torch_compile` dinov2's compiled, `dinotron` the public op.
On CUDA each row also gets its op's roofline time (benchmarks/roofline.py: the DINO step's compulsory bytes,
(2 S + T) B K, at 3.0 TB/s) and roofline_share, the fraction of it the row reached.
Targets on one H100 (issue 6, B=128): DINO step <= 0.40 ms with peak memory the gradient plus O(rows);
Sinkhorn <= 0.10 ms.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import roofline
from common import add_speedups, measure, save
from dinotron.kernels import DINOLoss, reference, sinkhorn_knopp_teacher

TEACHER_TEMP, STUDENT_TEMP, MOMENTUM = 0.04, 0.1, 0.9
GPU_BATCHES, CPU_BATCHES = (64, 128), (16, 32)  # default --B (benchmarks/static_report.py compiles at GPU_BATCHES)
N_PROTOTYPES, N_LOCAL = 65536, 8  # default --K and --n-local: dinov2's prototypes and local crops


class EagerDINOLoss:
    """Centre buffer + one of the eager DINO loss formulations; the centre is updated after the loss."""

    def __init__(self, K: int, device, vectorised: bool):
        self.center = torch.zeros(1, 1, K, device=device)
        self.forward = self.vectorised if vectorised else self.loop

    def __call__(self, teacher_out, student_out):
        return self.forward(teacher_out, student_out, self.center)

    @staticmethod
    def loop(teacher_out, student_out, center):
        """facebookresearch/dino's DINOLoss.forward (lightly < 1.6): a log_softmax per pair."""
        teacher = [F.softmax((t - center[0]) / TEACHER_TEMP, dim=-1) for t in teacher_out]
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1).mean()
                n_terms += 1
        with torch.no_grad():
            batch_center = torch.cat(teacher_out).mean(dim=0, keepdim=True)
            center.mul_(MOMENTUM).add_(batch_center * (1 - MOMENTUM))
        return total / n_terms

    @staticmethod
    def vectorised(teacher_out, student_out, center):
        """lightly 1.6.0's DINOLoss.forward: stacked views, one einsum over all pairs."""
        teacher = torch.stack(teacher_out)
        t_out = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1)
        s_out = F.log_softmax(torch.stack(student_out) / STUDENT_TEMP, dim=-1)
        loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
        loss = loss.masked_fill(torch.eye(*loss.shape, dtype=torch.bool, device=loss.device), 0.0)  # fill_diagonal_(0)
        n_terms = loss.numel() - min(loss.shape)
        with torch.no_grad():
            center.mul_(MOMENTUM).add_(teacher.mean(dim=(0, 1), keepdim=True) * (1 - MOMENTUM))
        return loss.sum() / (n_terms * teacher.shape[1])


def loss_impls(K: int, device: str, compile_: bool) -> dict:
    vectorised = EagerDINOLoss(K, device, vectorised=True)
    out = {
        "dinotron": DINOLoss(K, TEACHER_TEMP, TEACHER_TEMP, student_temp=STUDENT_TEMP).to(device),
        "dinotron_checked": DINOLoss(K, TEACHER_TEMP, TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                     check_finite=True).to(device),
        "eager_lightly": EagerDINOLoss(K, device, vectorised=False),
        "eager_vectorised": vectorised,
    }
    if compile_:
        compiled = EagerDINOLoss(K, device, vectorised=True)
        compiled.forward = torch.compile(EagerDINOLoss.vectorised)
        out["torch_compile"] = compiled
    return out


def sinkhorn_impls(compile_: bool) -> dict:
    out = {
        "dinotron": lambda x: sinkhorn_knopp_teacher(x, TEACHER_TEMP),
        "eager_dinov2": lambda x: reference.dinov2_sinkhorn_knopp(x, TEACHER_TEMP),
        "eager_logspace": lambda x: reference.sinkhorn_knopp_teacher(x, TEACHER_TEMP),
    }
    if compile_:
        compiled = torch.compile(reference.dinov2_sinkhorn_knopp)
        out["torch_compile"] = lambda x: compiled(x, TEACHER_TEMP)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--B", type=int, nargs="+", default=None,
                        help=f"batch sizes (default: {GPU_BATCHES} on CUDA, {CPU_BATCHES} on CPU)")
    parser.add_argument("--K", type=int, default=N_PROTOTYPES)
    parser.add_argument("--n-local", type=int, default=N_LOCAL, help="local crops: the student has 2 + n_local views")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=None,
                        help="logits dtype (default: float32 bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="add the torch.compile rows")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rep", type=int, default=None)
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.B = args.B or list(GPU_BATCHES if on_cuda else CPU_BATCHES)
    args.dtype = args.dtype or (["float32", "bfloat16"] if on_cuda else ["float32"])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.rep = args.rep if args.rep is not None else (50 if on_cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    K, S, T = args.K, 2 + args.n_local, 2

    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for B in args.B:
            case = f"B={B} K={K} views=2+{args.n_local} {dtype_name} fwd+bwd"
            dino_cost = roofline.dino_loss(S, T, B, K, dtype.itemsize, "softmax")
            teacher = [torch.randn(B, K, device=args.device).to(dtype) for _ in range(T)]
            student = [torch.randn(B, K, device=args.device).to(dtype).requires_grad_() for _ in range(S)]
            for impl, loss_fn in loss_impls(K, args.device, args.compile).items():
                def step(loss_fn=loss_fn, teacher=teacher, student=student):
                    for s in student:
                        s.grad = None
                    loss_fn(teacher, student).backward()
                rows.append(measure(case, impl, step, args.device, args.warmup, args.rep, cost=dino_cost))
            del teacher, student
            case = f"B={B} sinkhorn rows={T * B} K={K} {dtype_name} fwd"
            logits = torch.randn(T * B, K, device=args.device).to(dtype)
            for impl, fn in sinkhorn_impls(args.compile).items():
                rows.append(measure(case, impl, lambda fn=fn, logits=logits: fn(logits), args.device, args.warmup,
                                    args.rep, cost=roofline.sinkhorn_knopp_teacher(T * B, K, dtype.itemsize)))
            del logits
    add_speedups(rows, ours="dinotron")
    dinotron_path = "triton kernels" if on_cuda else "eager reference (CPU fallback)"
    save("losses", rows, args.device, extra={
        "K": K, "views": f"2+{args.n_local}", "teacher_temp": TEACHER_TEMP, "student_temp": STUDENT_TEMP,
        "threads": torch.get_num_threads(), "dinotron_path": dinotron_path,
        "targets_h100_B128": {"dino_step_ms": 0.40, "dino_step_peak": "gradient + O(rows)", "sinkhorn_ms": 0.10},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
