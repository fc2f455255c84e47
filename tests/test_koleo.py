"""The KoLeo kernel (Triton interpreter on CPU, compiled on GPU) against the eager reference.

Oracles: kernels/reference.py's koleo_loss (fp32 eager; checked against a brute-force loop and
lightly's formula in test_reference.py), lightly 1.6.0's KoLeoLoss.forward, and hand-computed values.
The interpreter runs the GPU's tile sizes (BLOCK_M/N/K do not depend on it) on one SM; the split
tests set the SM count (and the split size) to reach several key splits per query block.
Tolerances (FP32_TOL, grad_tolerance):
- losses: both sides in fp32, only summation orders differ: rtol 1e-5 (~80 fp32 ulps; measured
  3e-7), atol 1e-6.
- fp32 gradients: rtol 1e-5, atol 1e-6 x the largest reference gradient (an entry is a sum of terms
  that large; measured at most 2.2e-7 x the largest beyond the rtol part).
- bf16 / fp16 gradients: computed in fp32 and rounded once on each side, so up to one ulp apart:
  rtol 1e-2 (a bf16 ulp is 2^-7 = 7.8e-3 relative), plus the fp32 atol and one subnormal step of
  the dtype (fp16: 6e-8, reached by gradients of ~1e-4 x small features).
- thresholds of single tests say their origin beside them.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dinotron.kernels import KoLeoLoss, koleo, koleo_loss
from dinotron.kernels import reference as ref
from helpers import spy_launches
from lowering import assert_lowers

FP32_TOL = dict(rtol=1e-5, atol=1e-6)  # losses (module docstring)


def grad_tolerance(dtype, ref_grad):
    """Element-wise tolerance of a gradient in `dtype` against the reference's (module docstring)."""
    atol = 1e-6 * ref_grad.float().abs().max().item()
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=atol)
    info = torch.finfo(dtype)
    return dict(rtol=1e-2, atol=atol + info.smallest_normal * info.eps)


def loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def assert_matches_reference(x, grad_tol=None, **kwargs):
    """Loss and gradient of the Triton backend equal the eager reference's (same neighbours);
    grad_tol defaults to grad_tolerance."""
    loss, grad = loss_and_grad(lambda t: koleo_loss(t, backend="triton", **kwargs), x)
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("eps", "p")}
    ref_loss, ref_grad = loss_and_grad(lambda t: ref.koleo_loss(t, **ref_kwargs), x)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == x.dtype and grad.shape == x.shape
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **(grad_tol or grad_tolerance(x.dtype, ref_grad)))


# D: a single tile (64), ragged tiles (1000), 384 and 1024; B: 2, 3 (one ragged row block), 128
# (two key blocks) and 1000 (16 key blocks, ragged).
@pytest.mark.parametrize("B,D", [(2, 64), (3, 1000), (128, 384), (128, 1024), (1000, 64)])
def test_fp32_matches_reference(B, D):
    assert_matches_reference(torch.randn(B, D))


@pytest.mark.parametrize("B,D,dtype", [(3, 1024, torch.bfloat16), (128, 384, torch.bfloat16), (50, 64, torch.float16)])
def test_half_precision_matches_reference(B, D, dtype):
    # the reference upcasts to fp32 first; only the gradient's final rounding to dtype differs
    assert_matches_reference(torch.randn(B, D).to(dtype))


def _special_rows_batch(B=130, D=48, device="cpu"):
    """Random rows in dims 4.., plus rows in dims 0-3 whose nearest neighbours are known exactly."""
    x = torch.zeros(B, D, device=device)
    x[:, 4:] = torch.randn(B, D - 4, device=device)
    e = torch.eye(D, device=device)
    x[5], x[20], x[90] = e[0], e[0] + e[1], e[0] - e[1]  # 5's neighbours 20 and 90 tie, in two key blocks
    x[100], x[110], x[120] = e[2], e[2] + e[3], e[2] - e[3]  # a tie inside one key block (BLOCK_N = 64)
    x[70] = x[129] = -e[0]  # a duplicated pair, the copy in the ragged last block: distance ||eps * 1||
    x[10] = 0.0  # a zero row: norm clamped to eps, all its similarities are 0
    return x


def assert_ties_duplicates_and_zero_rows_match(device="cpu"):
    """_special_rows_batch through the Triton backend: ties, duplicates and a zero row as the reference."""
    x = _special_rows_batch(device=device)
    loss, grad = loss_and_grad(lambda t: koleo_loss(t, backend="triton"), x)
    ref_loss, ref_grad = loss_and_grad(ref.koleo_loss, x)
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    # ties go to the first index, as torch.max: 20 and 110 are pulled by 5 and 100, 90 and 120 are not
    others = torch.arange(x.shape[0], device=device) != 10
    torch.testing.assert_close(grad[others], ref_grad[others], **grad_tolerance(torch.float32, ref_grad[others]))
    mirrored = x.clone()
    mirrored[[20, 90, 110, 120]] = x[[90, 20, 120, 110]]
    _, other_choice = loss_and_grad(ref.koleo_loss, mirrored)
    # the other tie-break moves these gradients by O(1) relative (not a tolerance: a must-differ check)
    assert not torch.allclose(other_choice[[90, 20, 120, 110]], grad[[20, 90, 110, 120]], rtol=1e-3)
    # the duplicated pair: each pushes the other with a gradient ~ 1 / (B eps sqrt(D)); they cancel exactly
    assert torch.all(grad[[70, 129]] == 0) and torch.all(ref_grad[[70, 129]] == 0)
    # the zero row's gradient carries the 1/eps of the clamped norm: the fp32 tolerance, atol relative
    # to that 1e5-sized row (its entries are sums of terms that large)
    assert ref_grad[10].abs().max() > 1e5
    torch.testing.assert_close(grad[10], ref_grad[10], rtol=1e-5, atol=1e-6 * ref_grad[10].abs().max())


def test_ties_duplicates_and_zero_rows():
    assert_ties_duplicates_and_zero_rows_match()


def spy_search(monkeypatch):
    """Launches of the search, finishing and backward kernels."""
    names = ("_koleo_search_kernel", "_koleo_finish_kernel", "_koleo_bwd_kernel")
    return [spy_launches(monkeypatch, koleo, name) for name in names]


@pytest.fixture
def split_keys(monkeypatch):
    """Make the search split the keys between programs as on a 132-SM GPU, down to one key tile."""
    monkeypatch.setattr(koleo, "_num_sms", lambda device: 132)
    monkeypatch.setattr(koleo, "_MIN_KEYS_PER_SPLIT", 32)


def test_split_search_merges_like_one_pass(split_keys, monkeypatch):
    assert koleo._search_grid(130, 130, torch.device("cpu")) == (64, 3, 64)
    search, finish, _ = spy_search(monkeypatch)
    assert_ties_duplicates_and_zero_rows_match()  # ties across splits (20 | 90) and within one (110, 120)
    assert search.grids() == [(3, 3)] and search.arg("MERGE") == [True] and finish.grids() == [(3,)]
    x = torch.rand(130, 16)  # all similarities positive ...
    x[3] = -x[3]  # ... but row 3's, all negative: the merge must order negative similarities right
    assert_matches_reference(x)
    assert_matches_reference(torch.randn(300, 40))


def test_h100_split_search_matches_reference(monkeypatch):
    """The H100's launch (132 SMs, at least _MIN_KEYS_PER_SPLIT = 256 keys per split) at B = 600,
    D = 100: 10 query blocks of 64 rows (the last 24), the keys in 2 splits of 320 (5 key blocks of
    64; the last split 280 keys, its last block 24), 2 feature tiles of 64 (the last 36), and the
    backward in 19 blocks of 32 rows (the last 24)."""
    monkeypatch.setattr(koleo, "_num_sms", lambda device: 132)
    search, finish, bwd = spy_search(monkeypatch)
    assert_matches_reference(torch.randn(600, 100))
    assert search.grids() == [(10, 2)] and search.arg("keys_per_split") == [320] and search.arg("MERGE") == [True]
    assert search.arg("BLOCK_M") == [64] and search.arg("BLOCK_N") == [64] and search.arg("BLOCK_K") == [64]
    assert finish.grids() == [(10,)] and bwd.grids() == [(19,)] and bwd.arg("BLOCK_M") == [32]


def test_duplicate_pair_value_is_minus_log_eps_distance():
    # two identical rows of D=384: d = ||1e-8 * ones||_2 for both, as nn.PairwiseDistance computes it
    x = torch.ones(2, 384)
    d = 1e-8 * math.sqrt(384)
    # an fp32 result of ~15.4 (ulp 1e-6, 6e-8 relative) from a few fp32 ops: rel 1e-6 (measured 5e-9)
    assert koleo_loss(x, backend="triton").item() == pytest.approx(-math.log(d + 1e-8), rel=1e-6)


@pytest.mark.parametrize("p", [1, 3.0])
def test_other_norm_degrees_match_reference(p):
    assert_matches_reference(torch.randn(40, 50), p=p)


def test_eps_is_forwarded():
    x = torch.randn(20, 16)
    x[7] = x[2]
    # the duplicates push each other with gradients ~ 1 / (B (d + eps)) ~ 100 that cancel; the fp32
    # residue of that cancellation (measured 5e-7) needs an absolute atol, 1e-6
    assert_matches_reference(x, grad_tol=dict(rtol=1e-5, atol=1e-6), eps=1e-4)


def test_non_contiguous_input_and_grad_out_scaling():
    base = torch.randn(64, 70)
    x = base.t()[:, :30]  # (70, 30) with strides (1, 70)
    assert_matches_reference(x)
    x = torch.randn(9, 16).requires_grad_()
    (koleo_loss(x, backend="triton") * 3.0).backward()
    g3 = x.grad.clone()
    x.grad = None
    ref.koleo_loss(x).backward()
    torch.testing.assert_close(g3, 3.0 * x.grad, **grad_tolerance(torch.float32, x.grad))


def test_module_has_lightlys_signature_and_math():
    x = torch.randn(32, 16)
    # lightly 1.6.0's KoLeoLoss.forward, literally
    xn = F.normalize(x, p=2, dim=-1, eps=1e-8)
    cos_sim = torch.mm(xn, xn.t())
    cos_sim.fill_diagonal_(-2)
    nn_dist = torch.nn.PairwiseDistance(p=3, eps=1e-8)(xn, xn[cos_sim.argmax(dim=1)])
    lightly = -(nn_dist + 1e-8).log().mean()
    for backend in ("triton", "eager"):
        module = KoLeoLoss(3, 1e-8, backend=backend)
        torch.testing.assert_close(module(x), lightly, **FP32_TOL)
    assert repr(KoLeoLoss()) == "KoLeoLoss(p=2, eps=1e-08)"


def test_dispatch_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    x = torch.randn(10, 8)
    assert koleo_loss(x).item() == ref.koleo_loss(x).item()
    assert koleo_loss(x, backend="eager").item() == ref.koleo_loss(x).item()


def test_reference_ignores_autocast():
    # dinov2 disables autocast around KoLeo: a bf16 matmul would pick other neighbours
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ref.koleo_loss(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, ref.koleo_loss(x))


def _with_entry(value, dtype=torch.float32):
    """(4, 8) random rows with x[2, 5] = value."""
    x = torch.randn(4, 8, dtype=dtype)
    x[2, 5] = value
    return x


P_MESSAGE = "p .* must be a finite number >= 1"


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("x,kwargs,match", [
    pytest.param(torch.randn(1, 8), {}, "at least 2 rows", id="one-row"),
    pytest.param(torch.randn(2, 3, 8), {}, "x must be 2-D", id="3-d"),
    pytest.param(torch.ones(4, 8, dtype=torch.int32), {}, "x must be float", id="int"),
    pytest.param(torch.randn(4, 0), {}, "empty along dim 1", id="no-features"),
    pytest.param(_with_entry(math.nan), {}, "non-finite", id="nan"),
    pytest.param(_with_entry(math.inf), {}, "non-finite", id="inf"),
    pytest.param(_with_entry(-math.inf, torch.bfloat16), {}, "non-finite", id="bf16-minus-inf"),
    pytest.param(torch.randn(4, 8), {"eps": 0.0}, "eps must be > 0", id="eps-0"),
    pytest.param(torch.randn(4, 8), {"p": 0.5}, P_MESSAGE, id="p-below-1"),
    pytest.param(torch.randn(4, 8), {"p": math.inf}, P_MESSAGE, id="p-inf"),
    pytest.param(torch.randn(4, 8), {"p": True}, P_MESSAGE, id="p-bool"),
    pytest.param(torch.randn(4, 8), {"p": "2"}, P_MESSAGE, id="p-str"),
    pytest.param(torch.randn(4, 8), {"group": object()}, "torch.distributed is not initialised", id="group-no-dist"),
])
def test_bad_input(backend, x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        koleo_loss(x, backend=backend, **kwargs)


# ---- group: neighbours among every rank's rows ---------------------------------------------------

def _group_worker(rank, world_size, init_file, x_all, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = {}
        for backend in ("triton", "eager"):
            x = x_all.chunk(world_size)[rank].clone().requires_grad_()
            loss = koleo_loss(x, group=dist.group.WORLD, backend=backend)
            loss.backward()
            out[backend] = (loss.detach(), x.grad)
        try:  # one rank with another batch size: every rank raises, none hangs
            koleo_loss(torch.randn(3 + rank, x_all.shape[1]), group=dist.group.WORLD, backend="triton")
        except ValueError as err:
            out["mismatch"] = str(err)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_group_equals_one_process_holding_every_row(tmp_path):
    """Two gloo ranks: each rank's loss is the mean over its rows with neighbours over all rows, and
    each rank's gradient is world_size x the single-process gradient of its rows (the DDP convention:
    gradients are averaged over ranks), including the pull of neighbours chosen by the other rank."""
    world_size, B, D = 2, 6, 24
    x_all = torch.randn(world_size * B, D)
    x_all[B + 1] = x_all[2] + 0.1 * torch.randn(D)  # rank 0's row 2 and rank 1's row 1 are neighbours
    results = mp.Manager().dict()
    mp.spawn(_group_worker, args=(world_size, str(tmp_path / "init"), x_all, results), nprocs=world_size, join=True)
    expected_loss, expected_grad = loss_and_grad(ref.koleo_loss, x_all)
    for backend in ("triton", "eager"):
        losses = torch.stack([results[r][backend][0] for r in range(world_size)])
        torch.testing.assert_close(losses.mean(), expected_loss, **FP32_TOL)
        grads = torch.cat([results[r][backend][1] for r in range(world_size)])
        expected_grads = world_size * expected_grad
        torch.testing.assert_close(grads, expected_grads, **grad_tolerance(torch.float32, expected_grads))
    for r in range(world_size):
        torch.testing.assert_close(results[r]["triton"][0], results[r]["eager"][0], **FP32_TOL)
        assert "one shape (B, D), got [(3, 24), (4, 24)]" in results[r]["mismatch"]


# ---- compiled kernels ----------------------------------------------------------------------------

# The search with one split and with several (fp32 through tf32 / tf32x3, bf16), the finishing kernel,
# and the backward, for p = 2 and another degree.
LOWER_SCRIPT = """
from dinotron.kernels import koleo

rows = dict(NORM_Q="*fp32", NORM_NN="*fp32", LOSS="*fp32")
tf32, tf32x3 = tl.constexpr("tf32"), tl.constexpr("tf32x3")
for dtype, merge, precision, p_is_2 in [
    ("fp32", False, tf32, True), ("fp32", True, tf32x3, True), ("bf16", True, None, False)
]:
    lower(koleo._koleo_search_kernel, dict(K=f"*{dtype}", BEST="*i64" if merge else None, NN="*i32", **rows,
          B="i32", N="i32", D="i32", offset="i32", stride="i32", keys_per_split="i32", eps="fp32", p="fp32",
          BLOCK_M=64, BLOCK_N=koleo._BLOCK_N, BLOCK_K=64, MERGE=merge, P_IS_2=p_is_2, PRECISION=precision,
          UPCAST=False), num_warps=4)
lower(koleo._koleo_finish_kernel, dict(K="*bf16", BEST="*i64", NN="*i32", **rows, B="i32", D="i32", offset="i32",
      stride="i32", eps="fp32", p="fp32", BLOCK_M=64, BLOCK_K=64, P_IS_2=True), num_warps=4)
lower(koleo._koleo_bwd_kernel, dict(K="*bf16", NN="*i32", NORM_Q="*fp32", NORM_NN="*fp32", GRAD_LOSS="*fp32",
      DK="*fp32", B="i32", D="i32", offset="i32", stride="i32", stride_dk="i32", eps="fp32", p="fp32",
      inv_B="fp32", BLOCK_M=koleo._BLOCK_M_BWD, BLOCK_K=64, P_IS_2=False), num_warps=4)
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 5)


# ---- on a CUDA GPU (pytest -m gpu) ---------------------------------------------------------------

def _pairs(B, D, device):
    """Rows in shuffled pairs (a direction and a 5% perturbation of it): every nearest neighbour wins by
    a wide margin, so the tf32x3 / bf16 search and the reference's fp32 mm cannot pick differently."""
    base = torch.randn(B // 2 + 1, D, device=device).repeat_interleave(2, dim=0)[:B]
    return (base + 0.05 * torch.randn(B, D, device=device))[torch.randperm(B, device=device)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,D", [(2, 64), (3, 1000), (128, 384), (1000, 1024), (4096, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(B, D, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the search in tf32x3
    x = _pairs(B, D, "cuda").to(dtype)
    assert_matches_reference(x)


@pytest.mark.gpu
def test_gpu_ties_duplicates_zero_rows_and_norm_degree():
    assert_ties_duplicates_and_zero_rows_match(device="cuda")
    assert_matches_reference(_pairs(256, 384, "cuda"), p=3)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_batch():
    B, D = 8192, 384
    x = torch.randn(B, D, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    koleo_loss(x).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # the gradient (B x D fp32) plus (B,) vectors; a B x B fp32 matrix would be 256 MiB
    assert extra < 3 * B * D * 4, f"{extra / 2**20:.1f} MiB"
