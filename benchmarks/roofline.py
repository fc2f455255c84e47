"""Analytic bytes and FLOPs of each dinotron op at a shape, and its roofline time on one H100 / H200.

    roofline time = max(bytes / 3.0 TB/s, flops / 700 TFLOP/s)

the least time the op can take on the machine, whatever the kernels. `bytes` is the op's compulsory traffic:
each input read once and each output written once, what a kernel that kept everything else on chip would move
(the kernels may move more: the cross-entropy reads the logits again in its backward, Sinkhorn-Knopp reads the
teacher once per half-iteration). `flops` counts the math as written, an exp, a log or a max as one; the
elementwise ones run on the CUDA cores, not the tensor cores the 700 TFLOP/s peak is for, but every loss op
here is bounded by its bytes many times over (the DINO step at B=128: 123 us of bytes, 1.4 us of flops), so
the peak matters only for the matmuls: the fused head's, KoLeo's search, the Gram matrices and attention. The
benchmark rows divide this time by the measured one (`roofline_share`, CUDA only); benchmarks/static_report.py
writes it per op beside the sm_90 compile.

Letters: S student views, T teacher views, B rows (images, or masked patches for iBOT), K prototypes, D
features, N tokens, H heads; `itemsize` is the logits' (features', q/k/v's) bytes per element.
"""
from __future__ import annotations

from dataclasses import dataclass

HBM_BYTES_PER_S = 3.0e12  # H100 SXM HBM3 3.35 TB/s, H200 4.8 TB/s: 3.0 is what a streaming kernel reaches
PEAK_FLOPS = 700e12  # dense bf16 tensor cores, 989 TFLOP/s on paper, ~700 sustained
FP32 = 4  # bytes: centres, log-sum-exps and probabilities are float32


@dataclass(frozen=True)
class Cost:
    """An op's compulsory bytes and its FLOPs at one shape."""

    bytes: float
    flops: float

    @property
    def roofline_ms(self) -> float:
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / PEAK_FLOPS) * 1e3

    def share(self, ms: float) -> float:
        """Fraction of the roofline a measured time reaches (1 = at the roofline)."""
        return self.roofline_ms / ms

    def as_dict(self) -> dict:
        return {"bytes": int(self.bytes), "flops": int(self.flops), "roofline_ms": round(self.roofline_ms, 5)}


def _cross_entropy(S: int, T: int, B: int, K: int, itemsize: int) -> Cost:
    """The fused cross-entropy, forward + backward, given its targets: reads the S student and T teacher
    views once, writes the (S, B, K) gradient. Forward per student element 6 (scale, max, exp, sum of the
    log-sum-exp; multiply-add of the dot with the targets; add of their mass), plus T per (b, k) to sum the
    teacher views; backward 5 per student element (exp, multiply, subtract, scale, cast)."""
    return Cost(bytes=(2 * S + T) * B * K * itemsize, flops=(11 * S + T) * B * K)


def _targets(T: int, B: int, K: int, centering: str, sinkhorn_iterations: int) -> Cost:
    """Teacher targets from T views of (B, K) logits, bytes already counted by _cross_entropy (the logits
    it reads): softmax centring reads and writes the fp32 centre and does 4 flops per logit (multiply-add
    with the centre, exp, sum, the centre's column sum); Sinkhorn-Knopp 2 log-sum-exp passes of 3 flops
    (multiply-add with the other scaling, exp, sum) per iteration."""
    if centering == "softmax":
        return Cost(bytes=2 * K * FP32, flops=4 * T * B * K)
    return Cost(bytes=0, flops=6 * sinkhorn_iterations * T * B * K)


def _plus(a: Cost, b: Cost) -> Cost:
    return Cost(a.bytes + b.bytes, a.flops + b.flops)


def dino_loss(S: int, T: int, B: int, K: int, itemsize: int, centering: str | None = "softmax",
              sinkhorn_iterations: int = 3) -> Cost:
    """DINOLoss forward + backward (bench_losses' step): the targets of T teacher views with `centering`
    ("softmax", "sinkhorn_knopp", or None for dino_loss given probabilities), then the cross-entropy against
    S student views of (B, K)."""
    ce = _cross_entropy(S, T, B, K, itemsize)
    return ce if centering is None else _plus(ce, _targets(T, B, K, centering, sinkhorn_iterations))


def ibot_patch_loss(M: int, K: int, itemsize: int, centering: str | None = "softmax",
                    sinkhorn_iterations: int = 3) -> Cost:
    """IBOTPatchLoss / ibot_patch_loss forward + backward on M masked patch rows: DINO's with S = T = 1,
    plus the (M,) fp32 row weights."""
    return _plus(dino_loss(1, 1, M, K, itemsize, centering, sinkhorn_iterations), Cost(M * FP32, M))


def softmax_center_teacher(R: int, K: int, itemsize: int, update: bool = False) -> Cost:
    """softmax((x - c) / temp) of R rows: reads the logits and the centre, writes fp32 probabilities; 7 flops
    per logit (multiply-add, max, exp, sum; multiply-add, exp for the output). With update (also
    softmax_center_and_update_teacher) the centre's column sum (1 flop) and the new centre written."""
    return Cost(bytes=R * K * (itemsize + FP32) + (2 if update else 1) * K * FP32, flops=(8 if update else 7) * R * K)


def update_center(R: int, K: int, itemsize: int) -> Cost:
    """The centre's EMA with the mean of R rows: reads the rows and the centre, writes the centre; one add
    per logit."""
    return Cost(bytes=R * K * itemsize + 2 * K * FP32, flops=R * K + 3 * K)


def sinkhorn_knopp_teacher(R: int, K: int, itemsize: int, n_iterations: int = 3) -> Cost:
    """Sinkhorn-Knopp targets of R rows: reads the logits, writes fp32 probabilities; per iteration two
    log-sum-exp passes of 3 flops per logit, then 2 (multiply-add, exp) for the output."""
    return Cost(bytes=R * K * (itemsize + FP32), flops=(6 * n_iterations + 2) * R * K)


def koleo(B: int, D: int, itemsize: int) -> Cost:
    """koleo_loss forward + backward on (B, D): reads x, writes its gradient; 2 B^2 D for the similarities,
    B^2 to scale and compare them, about 30 B D for the norms, the distances and the gradient."""
    return Cost(bytes=2 * B * D * itemsize, flops=2 * B * B * D + B * B + 30 * B * D)


def attention(groups: list[tuple[int, int]], H: int, D: int, itemsize: int, backward: bool) -> Cost:
    """Attention over sequences of (count, tokens) groups, H heads of D: forward 4 N^2 D flops per head
    (QK^T and PV), reading q, k, v and writing out and the fp32 log-sum-exp; with backward 3.5x the
    forward's flops (flash-attn's count) and also reading q, k, v, out, dout and the log-sum-exp and
    writing dq, dk, dv."""
    tokens = sum(b * n for b, n in groups) * H
    fwd_flops = 4 * D * H * sum(b * n * n for b, n in groups)
    fwd_bytes = 4 * tokens * D * itemsize + tokens * FP32
    if not backward:
        return Cost(fwd_bytes, fwd_flops)
    return Cost(fwd_bytes + 8 * tokens * D * itemsize + 2 * tokens * FP32, 3.5 * fwd_flops)


def fused_head_loss(S: int, T: int, B: int, K: int, D: int, itemsize: int, weight_itemsize: int,
                    centering: str = "softmax", sinkhorn_iterations: int = 3) -> Cost:
    """fused_head_dino_loss / fused_head_ibot_loss (S = T = 1, B masked rows) forward + backward: reads the
    (S + T) B D bottleneck features and both (K, D) prototype weights, writes d f (S B D) and d W (K, D).
    flops: the head's matmuls as an unfused head computes them, 2 (S + T) B K D for the logits and 4 S B K D
    for d f and d W, plus the loss's elementwise work on the logits (_cross_entropy's and _targets')."""
    elementwise = _plus(Cost(0, (11 * S + T) * B * K), _targets(T, B, K, centering, sinkhorn_iterations))
    return Cost(bytes=(2 * S + T) * B * D * itemsize + 3 * K * D * weight_itemsize + elementwise.bytes,
                flops=2 * (S + T) * B * K * D + 4 * S * B * K * D + elementwise.flops)


def gram(B: int, N: int, D: int, itemsize: int) -> Cost:
    """gram_loss forward + backward on (B, N, D) student and teacher patches: reads both, writes the student's
    gradient; 2 N^2 D flops per image for each of the two Gram matrices and 2 N^2 D for the gradient's
    product with the features."""
    return Cost(bytes=3 * B * N * D * itemsize, flops=6 * B * N * N * D)
