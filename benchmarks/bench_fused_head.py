"""DINOHead's prototype layer + the DINO / iBOT loss, forward+backward: head then loss vs the fused op.

    python benchmarks/bench_fused_head.py                 # GPU: B=128 (2+8 views), 16384 iBOT rows, K=65536, bf16
    python benchmarks/bench_fused_head.py --smoke         # a few seconds anywhere: tiny shapes, writes the JSON
    python benchmarks/bench_fused_head.py --threads 1     # CPU on a shared machine: steadier timings

Each row times one training step of the head's last layer and the loss, from the L2-normalised
bottleneck features (student ones requiring grad) and the (K, D) prototype weight (requiring grad;
the teacher's is another (K, D) weight): softmax centring with the centre's update, then the
backward to the features and the weight. Cases: DINO on cls tokens (B images, 2 global + n_local
student views, the 2 global teacher views; the trainer's pairing: different crops, averaged) and
iBOT on `--ibot-rows` masked patches. Impls:
- `eager`: F.linear to (rows, K) logits, then kernels/reference.py's softmax_center_teacher,
  update_center and dino_loss / ibot_patch_loss (plain PyTorch, autograd).
- `head_dinotron_loss`: F.linear to logits, then dinotron's softmax_center_and_update_teacher and
  dino_loss / ibot_patch_loss (the trainer's path before the fused head).
- `fused`: dinotron.kernels.fused_head_dino_loss / fused_head_ibot_loss (on CUDA the fused kernels; on
  CPU the eager backend, which makes the logits: CPU rows say nothing of the kernels).
peak_mib (CUDA only) is what the step allocates beyond its inputs (the weight gradient, K x D fp32,
is part of it). Logits are in the features' dtype (bf16 on CUDA, as autocast gives them; fp32 on CPU).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import add_speedups, measure, save
from dinotron import kernels
from dinotron.kernels import fused_head_dino_loss, fused_head_ibot_loss, reference

TEACHER_TEMP, STUDENT_TEMP, MOMENTUM = 0.04, 0.1, 0.9
N_PATCHES = 196  # a 224-pixel global crop at patch 16: masks of (images, 196)


def _eager_dino(s, t, w, wt, center):
    S, B, D = s.shape
    logits = F.linear(s.flatten(0, 1), w.to(s.dtype)).unflatten(0, (S, B))
    with torch.no_grad():
        t_logits = F.linear(t.flatten(0, 1), wt.to(t.dtype))
        probs = reference.softmax_center_teacher(t_logits, center, TEACHER_TEMP).unflatten(0, (t.shape[0], B))
        center.copy_(reference.update_center(center, t_logits, MOMENTUM))
    return reference.dino_loss(logits, probs, student_temp=STUDENT_TEMP, ignore_diagonal=True, reduction="mean")


def _dinotron_dino(s, t, w, wt, center):
    S, B, D = s.shape
    logits = F.linear(s.flatten(0, 1), w.to(s.dtype)).unflatten(0, (S, B))
    with torch.no_grad():
        t_logits = F.linear(t.flatten(0, 1), wt.to(t.dtype)).unflatten(0, (t.shape[0], B))
        probs, new = kernels.softmax_center_and_update_teacher(t_logits, center, TEACHER_TEMP, MOMENTUM)
        center.copy_(new)
    return kernels.dino_loss(logits, probs, student_temp=STUDENT_TEMP, ignore_diagonal=True, reduction="mean")


def _fused_dino(s, t, w, wt, center):
    loss, new = fused_head_dino_loss(s, t, w, wt, center, teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP,
                                     center_momentum=MOMENTUM, ignore_diagonal=True, reduction="mean")
    center.copy_(new)
    return loss


def _ibot(loss_fn, teacher_fn):
    def run(s, t, w, wt, center, masks):
        logits = F.linear(s, w.to(s.dtype))
        with torch.no_grad():
            t_logits = F.linear(t, wt.to(t.dtype))
            probs, new = teacher_fn(t_logits, center)
            center.copy_(new)
        return loss_fn(logits, probs, masks, student_temp=STUDENT_TEMP)
    return run


def _fused_ibot(s, t, w, wt, center, masks):
    loss, new = fused_head_ibot_loss(s, t, w, wt, masks, center=center, teacher_temp=TEACHER_TEMP,
                                     student_temp=STUDENT_TEMP, center_momentum=MOMENTUM)
    center.copy_(new)
    return loss


IMPLS = {
    "dino": {"eager": _eager_dino, "head_dinotron_loss": _dinotron_dino, "fused": _fused_dino},
    "ibot": {
        "eager": _ibot(reference.ibot_patch_loss, lambda x, c: (reference.softmax_center_teacher(x, c, TEACHER_TEMP),
                                                                reference.update_center(c, x, MOMENTUM))),
        "head_dinotron_loss": _ibot(kernels.ibot_patch_loss, lambda x, c: kernels.softmax_center_and_update_teacher(
            x, c, TEACHER_TEMP, MOMENTUM)),
        "fused": _fused_ibot,
    },
}


def _features(*shape, device, dtype, grad=False):
    return F.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype).requires_grad_(grad)


def _masks(rows: int, device) -> torch.Tensor:
    """(images, 196) bool with exactly `rows` True, about a third of each image's patches."""
    images = max(1, -(-rows // 64))
    masks = torch.zeros(images * N_PATCHES, dtype=torch.bool)
    masks[torch.randperm(images * N_PATCHES)[:rows]] = True
    return masks.view(images, N_PATCHES).to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--B", type=int, default=None, help="images per DINO step (default: 128 CUDA, 8 CPU)")
    parser.add_argument("--n-local", type=int, default=8, help="local crops: the student has 2 + n_local views")
    parser.add_argument("--ibot-rows", type=int, default=None, help="masked patches (default: 16384 CUDA, 256 CPU)")
    parser.add_argument("--K", type=int, default=65536)
    parser.add_argument("--D", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="features' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one timed repetition")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rep", type=int, default=None)
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.smoke:
        args.B, args.ibot_rows, args.K, args.D = args.B or 2, args.ibot_rows or 32, 1024, 64
        args.warmup, args.rep = 0 if args.warmup is None else args.warmup, args.rep or 1
    args.B = args.B or (128 if on_cuda else 8)
    args.ibot_rows = args.ibot_rows or (16384 if on_cuda else 256)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    args.rep = args.rep or (50 if on_cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device, K, D, B = getattr(torch, args.dtype), args.device, args.K, args.D, args.B
    S, T = 2 + args.n_local, 2

    weight = F.normalize(torch.randn(K, D, device=device), dim=-1).requires_grad_()
    teacher_weight = F.normalize(torch.randn(K, D, device=device), dim=-1)
    inputs = {
        "dino": ((_features(S, B, D, device=device, dtype=dtype, grad=True), _features(T, B, D, device=device,
                                                                                        dtype=dtype)), ()),
        "ibot": ((_features(args.ibot_rows, D, device=device, dtype=dtype, grad=True),
                  _features(args.ibot_rows, D, device=device, dtype=dtype)), (_masks(args.ibot_rows, device),)),
    }
    cases = {"dino": f"DINO B={B} views=2+{args.n_local} (teacher 2) K={K} D={D} {args.dtype} fwd+bwd",
             "ibot": f"iBOT rows={args.ibot_rows} K={K} D={D} {args.dtype} fwd+bwd"}
    rows = []
    for name, impls in IMPLS.items():
        (student, teacher), extra = inputs[name]
        for impl, fn in impls.items():
            center = torch.zeros(1, K, device=device)

            def step(fn=fn, student=student, teacher=teacher, extra=extra, center=center):
                student.grad = weight.grad = None
                fn(student, teacher, weight, teacher_weight, center, *extra).backward()
            rows.append(measure(cases[name], impl, step, device, args.warmup, args.rep))
    add_speedups(rows, ours="fused")
    save("fused_head", rows, device, extra={
        "K": K, "D": D, "B": B, "views": f"2+{args.n_local}", "ibot_rows": args.ibot_rows,
        "teacher_temp": TEACHER_TEMP, "student_temp": STUDENT_TEMP, "threads": torch.get_num_threads(),
        "fused_path": "triton kernels" if on_cuda else "eager reference (CPU fallback)",
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
