"""Two gloo ranks through steps where one rank, then both, have no masked patch (issue 12).

Every collective must run on every rank in every step whatever the data; before the fix the iBOT
centre and Sinkhorn collectives ran only on ranks with masked patches, and gloo failed with "Received
data size doesn't match expected size" (NCCL hung). One spawn of 2 ranks runs every case; a
collective mismatch fails within the 60 s process-group timeout instead of hanging. The ops run on
both backends (Triton in the interpreter); the model on the eager one, as the trainer on CPU: it calls
the same ops, and the interpreter would make the spawn several times slower.

Oracles: the reference ops (kernels/reference.py) in one process on the union of the ranks' rows; the
definitions on an empty batch (no row anywhere: the centre stays, results are (0, K)). Which backend ran
is recorded on each rank (helpers.spy_launches): the Triton kernels on the rank with rows, no kernel on
a rank without rows (an empty grid is an error on a GPU) nor on the eager backend.
Tolerances: eager is compared exactly: a rank with no row adds 0 to the column sums and the row count,
and exp(-inf) = 0 to Sinkhorn's all-reduced log-sum-exps (m + log(exp(lse - m) + 0) = lse for m = lse),
so the one other rank's arithmetic is the single process's. Triton: the kernels' fp32 tolerance of
tests/test_losses.py (rtol 1e-4, atol 1e-6: another summation order than the reference).
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinotron import kernels
from dinotron.kernels import cross_entropy, sinkhorn_knopp, softmax_center
from dinotron.kernels import reference as ref
from dinotron.train.model import DinoV2
from helpers import spy_launches, tiny_config

K, TEMP, MOMENTUM, ITERATIONS = 48, 0.1, 0.8, 3
FP32 = dict(rtol=1e-4, atol=1e-6)  # the kernels against the reference: tests/test_losses.py
BACKENDS = ("eager", "triton")
CENTERINGS = ("softmax", "sinkhorn_knopp")
# iBOT masks per model step, as (rank 0, rank 1): some masked patches, or none
MODEL_STEPS = (("some", "none"), ("none", "none"), ("none", "some"))
KERNELS = {"_ce_fwd_kernel": cross_entropy, "_ce_combine_kernel": cross_entropy, "_ce_bwd_kernel": cross_entropy,
           "_row_lse_kernel": softmax_center, "_center_ema_kernel": softmax_center,
           "_sinkhorn_kernel": sinkhorn_knopp}


def _teacher_ops(rows: torch.Tensor, center: torch.Tensor, backend: str) -> dict:
    """Every rank's calls, in one order: the collective teacher ops on this rank's rows (maybe none)."""
    probs, new = kernels.softmax_center_and_update_teacher(rows, center, TEMP, MOMENTUM, backend=backend)
    return {
        "probs": probs,
        "center": new,
        "update_center": kernels.update_center(center, rows, MOMENTUM, backend=backend),
        "sinkhorn": kernels.sinkhorn_knopp_teacher(rows.reshape(-1, K), TEMP, ITERATIONS, backend=backend),
    }


def _error(call) -> str | None:
    try:
        call()
    except ValueError as err:
        return str(err)
    return None


def _model_steps(rank: int, centering: str) -> dict:
    """The trainer's DinoV2 (same weights on both ranks), forward + backward through MODEL_STEPS."""
    torch.manual_seed(0)
    model = DinoV2(tiny_config(f"teacher.centering={centering}", "ibot.separate_head=true",
                               "ibot.head={n_prototypes: 32, hidden_dim: 32, bottleneck_dim: 16, nlayers: 2}"))
    with torch.no_grad():
        model.ibot_center.normal_()
    B, n_local = 2, model.cfg.data.augment.n_local
    g = torch.Generator().manual_seed(rank)
    out = {"ibot_center": [], "dino_center": [], "ibot_loss": [], "with_grad": [], "initial": model.ibot_center.clone()}
    for step in MODEL_STEPS:
        masks = torch.zeros(2 * B, 16, dtype=torch.bool)
        if step[rank] == "some":
            masks[0, :3] = masks[3, 5] = True
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(2 * B, 3, 32, 32, generator=g), torch.randn(n_local * B, 3, 16, 16, generator=g),
                       masks, 0.05)
        losses["loss"].backward()
        out["ibot_loss"].append(losses["ibot_loss"].item())
        out["with_grad"].append({n for n, p in model.student.named_parameters() if p.grad is not None})
        out["ibot_center"].append(model.ibot_center.clone())
        out["dino_center"].append(model.dino_center.clone())
    return out


def _backend_cases(rank: int, backend: str, logits: torch.Tensor, center: torch.Tensor) -> dict:
    """The ops of one backend on this rank, every rank making the same calls in one order."""
    out = {}
    # (a) rank 0 has rows, rank 1 none; then both none; (V, B, K) views likewise
    out[backend, "one"] = _teacher_ops(logits if rank == 0 else logits[:0], center, backend)
    out[backend, "both"] = _teacher_ops(logits[:0], center, backend)
    views = logits[:4].view(2, 2, K)
    out[backend, "views"] = _teacher_ops(views if rank == 0 else views[:, :0], center, backend)
    # a NaN on the rank with rows: with check_finite=True both ranks raise (the rank without rows has
    # nothing of its own to check); by default neither does, and the rank with rows gets NaN targets
    bad = logits.clone()
    bad[1, 2] = float("nan")
    rows = bad if rank == 0 else bad[:0]
    out[backend, "nan"] = _error(lambda: kernels.sinkhorn_knopp_teacher(rows, TEMP, backend=backend,
                                                                        check_finite=True))
    out[backend, "nan_default"] = kernels.sinkhorn_knopp_teacher(rows, TEMP, backend=backend)
    # iBOT loss without masked patch on rank 1: 0, and backward works
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, 1] = rank == 0
    student = torch.randn(int(masks.sum()), K, requires_grad=True)
    loss = kernels.ibot_patch_loss(student, torch.softmax(torch.randn(student.shape), -1), masks, backend=backend)
    loss.backward()
    out[backend, "ibot"] = (loss.detach(), student.grad)
    # KoLeo's group search with 0 rows on one rank, then on both: every rank raises, none waits
    out[backend, "koleo"] = [
        _error(lambda n=n: kernels.koleo_loss(torch.randn(n, 8), group=dist.group.WORLD, backend=backend))
        for n in ((3 if rank == 0 else 0), 0)
    ]
    return out


def _worker(rank, init_file, logits, center, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        for backend in BACKENDS:
            with pytest.MonkeyPatch.context() as patch:
                launches = {name: spy_launches(patch, module, name) for name, module in KERNELS.items()}
                out.update(_backend_cases(rank, backend, logits, center))
                out[backend, "kernels"] = {name for name, calls in launches.items() if calls}
        # (b) the trainer's model
        os.environ["DINOTRON_BACKEND"] = "eager"
        for centering in CENTERINGS:
            out["model", centering] = _model_steps(rank, centering)
        # the ranks are still in step: one more collective gives the expected sum
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        out["in_step"] = t.item()
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(logits, center, [rank 0's results, rank 1's results]) of one 2-rank spawn."""
    logits, center = 2 * torch.randn(5, K), torch.randn(1, K)
    results = mp.Manager().dict()
    init = tmp_path_factory.mktemp("dist") / "init"
    mp.spawn(_worker, args=(str(init), logits, center, results), nprocs=2, join=True)
    assert results[0]["in_step"] == results[1]["in_step"] == 3.0
    return logits, center, [results[0], results[1]]


def _assert_matches(actual, expected, backend):
    if backend == "eager":
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one", "views"])
def test_teacher_ops_with_one_rank_empty_equal_one_process(ranks, backend, case):
    """Rank 0 with rows, rank 1 with none: rank 0 gets what one process gets on the union (its rows),
    rank 1 empty results and the same centre."""
    logits, center, (r0, r1) = ranks
    rows = logits if case == "one" else logits[:4].view(2, 2, K)
    expected_center = ref.update_center(center, rows, MOMENTUM)
    _assert_matches(r0[backend, case]["probs"], ref.softmax_center_teacher(rows, center, TEMP), backend)
    _assert_matches(r0[backend, case]["sinkhorn"], ref.sinkhorn_knopp_teacher(rows.reshape(-1, K), TEMP, ITERATIONS),
                    backend)
    empty = (0, K) if case == "one" else (2, 0, K)
    assert r1[backend, case]["probs"].shape == empty and r1[backend, case]["sinkhorn"].shape == (0, K)
    for r in (r0, r1):
        for key in ("center", "update_center"):
            _assert_matches(r[backend, case][key], expected_center, backend)
            assert r[backend, case][key].shape == center.shape
    assert torch.equal(r0[backend, case]["center"], r1[backend, case]["center"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_ops_with_both_ranks_empty_keep_the_centre(ranks, backend):
    _, center, results = ranks
    for r in results:
        out = r[backend, "both"]
        assert out["probs"].shape == out["sinkhorn"].shape == (0, K)
        assert torch.equal(out["center"], center) and torch.equal(out["update_center"], center)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_raises_on_every_rank(ranks, backend):
    """Sinkhorn's finite check (check_finite=True) is all-reduced: the rank without rows raises with the one
    holding the NaN. By default (no check, no host sync) no rank raises: NaN in, NaN out."""
    for r in ranks[2]:
        assert "sinkhorn_knopp_teacher is not finite" in r[backend, "nan"]
        assert "on at least one rank" in r[backend, "nan"]
    r0, r1 = ranks[2]
    assert r0[backend, "nan_default"].shape == (5, K) and torch.isnan(r0[backend, "nan_default"]).any()
    assert r1[backend, "nan_default"].shape == (0, K)


def test_kernels_ran_on_the_triton_backend_only(ranks):
    """Rank 0 (with rows) ran the Triton kernels on the Triton backend (the centre's EMA excepted: with
    torch.distributed it runs in the reference's all-reduced form); rank 1, whose calls all had zero rows,
    launched none; the eager backend none anywhere."""
    r0, r1 = ranks[2]
    assert r0["triton", "kernels"] == set(KERNELS) - {"_center_ema_kernel"}
    assert r1["triton", "kernels"] == set()
    assert r0["eager", "kernels"] == r1["eager", "kernels"] == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_loss_without_masked_patch(ranks, backend):
    r0, r1 = ranks[2]
    loss, grad = r1[backend, "ibot"]
    assert loss.item() == 0.0 and grad.shape == (0, K)
    assert r0[backend, "ibot"][0].item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_group_with_an_empty_rank_raises_everywhere(ranks, backend):
    for r in ranks[2]:
        one_empty, both_empty = r[backend, "koleo"]
        assert "every rank of the group must pass x of one shape" in one_empty
        assert "the group holds 0 row(s) in all" in both_empty


@pytest.mark.parametrize("centering", CENTERINGS)
def test_model_steps_without_masked_patches(ranks, centering):
    """DinoV2 forward + backward with no masked patch on rank 1, then on both, then on rank 0: the steps
    complete, the centres agree on both ranks, the iBOT centre stays when no rank has a masked patch,
    and both ranks' parameters get gradients alike (the trainer all-reduces each rank's list of them)."""
    r0, r1 = (r["model", centering] for r in ranks[2])
    for step, masked in enumerate(MODEL_STEPS):
        assert torch.equal(r0["dino_center"][step], r1["dino_center"][step])
        assert torch.equal(r0["ibot_center"][step], r1["ibot_center"][step])
        assert r0["with_grad"][step] == r1["with_grad"][step]
        assert any(n.startswith("ibot_head.") for n in r0["with_grad"][step])
        for r, m in zip((r0, r1), masked, strict=True):
            assert (r["ibot_loss"][step] == 0.0) == (m == "none")
    if centering == "softmax":
        centres = r0["ibot_center"]
        assert not torch.equal(centres[0], r0["initial"]), "rank 0's masked patches move both ranks' centres"
        assert torch.equal(centres[1], centres[0]), "no masked patch anywhere: the iBOT centre stays"
        assert not torch.equal(centres[2], centres[1]), "rank 1's likewise"
