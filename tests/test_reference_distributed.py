"""The all_reduce-aware reference ops on two gloo ranks equal one process holding every row.

Oracle: the same reference ops (kernels/reference.py) in one process on all rows.
Tolerances: Sinkhorn-Knopp's all-reduced log-sum-exp (max, then a sum of exps) adds the ranks'
terms in another order than one logsumexp over all rows, and |logits| / temp reaches ~70, so the
exponents carry fp32 rounding of ~4e-6: rtol 1e-5, atol 1e-7 for the smallest probabilities
(measured 7.6e-6 relative on small entries, 6.6e-7 absolute); the centre sums rows in another order:
torch.testing's fp32 defaults (rtol 1.3e-6, atol 1e-5). float64 logits are computed in float64 on
both sides: rtol 1e-12 (the same ~4e-6 x 2^-29 float64 rounding, measured below 1e-14).
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinotron.kernels import reference as ref


def _worker(rank, world_size, init_file, logits, center, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = {}
        for dtype in (torch.float32, torch.float64):
            rows = logits.to(dtype).chunk(world_size)[rank]
            out[dtype] = (
                ref.sinkhorn_knopp_teacher(rows, teacher_temp=0.1, n_iterations=3),
                ref.update_center(center.to(dtype), rows, momentum=0.8),
            )
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    logits = torch.randn(12, 20) * 2
    center = torch.randn(1, 20)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), logits, center, results), nprocs=2, join=True)
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-7)), (torch.float64, dict(rtol=1e-12, atol=1e-15))):
        sinkhorn = torch.cat([results[0][dtype][0], results[1][dtype][0]])
        assert sinkhorn.dtype == dtype
        expected = ref.sinkhorn_knopp_teacher(logits.to(dtype), 0.1, 3)
        torch.testing.assert_close(sinkhorn, expected, **tol)
        expected_center = ref.update_center(center.to(dtype), logits.to(dtype), momentum=0.8)
        for rank in range(2):
            assert results[rank][dtype][1].dtype == dtype
            torch.testing.assert_close(results[rank][dtype][1], expected_center, **({} if dtype == torch.float32
                                                                                    else tol))
