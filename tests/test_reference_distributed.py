"""The all_reduce-aware reference ops on two gloo ranks equal one process holding every row.

Oracle: the same reference ops (kernels/reference.py) in one process on all rows.
Tolerances: Sinkhorn-Knopp's all-reduced log-sum-exp (max, then a sum of exps) adds the ranks'
terms in another order than one logsumexp over all rows, and |logits| / temp reaches ~70, so the
exponents carry fp32 rounding of ~4e-6: rtol 1e-5, atol 1e-7 for the smallest probabilities
(measured 7.6e-6 relative on small entries, 6.6e-7 absolute); the centre sums rows in another order:
torch.testing's fp32 defaults (rtol 1.3e-6, atol 1e-5).
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinotron.kernels import reference as ref


def _worker(rank, world_size, init_file, logits, center, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = logits.chunk(world_size)[rank]
        results[rank] = (
            ref.sinkhorn_knopp_teacher(rows, teacher_temp=0.1, n_iterations=3),
            ref.update_center(center, rows, momentum=0.8),
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    logits = torch.randn(12, 20) * 2
    center = torch.randn(1, 20)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), logits, center, results), nprocs=2, join=True)
    sinkhorn = torch.cat([results[0][0], results[1][0]])
    torch.testing.assert_close(sinkhorn, ref.sinkhorn_knopp_teacher(logits, 0.1, 3), rtol=1e-5, atol=1e-7)
    expected_center = ref.update_center(center, logits, momentum=0.8)
    for rank in range(2):
        torch.testing.assert_close(results[rank][1], expected_center)
