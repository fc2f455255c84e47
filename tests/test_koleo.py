"""The KoLeo op (Triton interpreter on CPU, compiled on GPU; the eager reference through the same op)
against the eager reference, lightly and dinov2.

Oracles: kernels/reference.py's koleo_loss (fp32 eager; checked against a brute-force loop and
lightly's formula in test_reference.py), lightly 1.6.0's KoLeoLoss module itself, dinov2's
KoLeoLoss.forward transcribed (dinov2_koleo), and hand-computed values.
The interpreter runs the GPU's tile sizes (BLOCK_M/N/K do not depend on it) on one SM; the split
tests set the SM count (and the split size) to reach several key splits per query block, and the
`candidates` fixture sends small batches to the large-batch path (tensor-core candidates, fp32
re-ranking), whose tf32 operands the interpreter truncates as a GPU may: the near-tie tests are real.
Every comparison through the Triton backend checks that its launchers ran (spy_triton), so the
eager fallback cannot pass in its place.
Tolerances (FP32_TOL, loss_tolerance, grad_tolerance):
- losses: both sides in fp32, only summation orders differ: rtol 1e-5 (~80 fp32 ulps; measured
  3e-7), atol 1e-6. A bf16 / fp16 loss is that fp32 value rounded once to the dtype on each side,
  so up to one ulp apart: rtol = the dtype's eps (2^-7 bf16, 2^-10 fp16).
- fp32 gradients: rtol 1e-5, atol 1e-6 x the largest reference gradient (an entry is a sum of terms
  that large; measured at most 2.2e-7 x the largest beyond the rtol part).
- bf16 / fp16 gradients: computed in fp32 and rounded once on each side, so up to one ulp apart:
  rtol 1e-2 (a bf16 ulp is 2^-7 = 7.8e-3 relative), plus the fp32 atol and one subnormal step of
  the dtype (fp16: 6e-8, reached by gradients of ~1e-4 x small features).
- against lightly in bf16 / fp16 (LIGHTLY_HALF_RTOL): lightly rounds every step to the dtype (the
  normalised rows, the similarities, the distances, the log), we round once at the end: measured
  at most 6.2e-3 relative over 30 seeds, one bf16 ulp; rtol 2^-6 = 1.6e-2, two bf16 ulps.
- float64 against lightly: both sides compute in float64 with the same ops: torch's float64
  defaults of assert_close (rtol 1e-7, atol 1e-7).
- thresholds of single tests say their origin beside them.
"""
import contextlib
import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import triton
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss

from dinotron.kernels import KoLeoLoss, koleo, koleo_loss, layout
from dinotron.kernels import reference as ref
from helpers import spy_launches
from lowering import assert_lowers

FP32_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 losses (module docstring)
LIGHTLY_HALF_RTOL = 2**-6  # bf16 / fp16 losses against lightly's (module docstring)
TRITON_RAN = ["_triton_forward", "_triton_backward"]  # spy_triton's record of one forward and backward


def loss_tolerance(dtype):
    """Tolerance of a loss in `dtype` against the reference's (module docstring)."""
    return FP32_TOL if dtype in (torch.float32, torch.float64) else dict(rtol=torch.finfo(dtype).eps, atol=1e-6)


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


@contextlib.contextmanager
def spy_triton():
    """The names of koleo's Triton launchers called in the block (_triton_forward, _triton_backward), in
    order: the Triton backend ran, not the eager reference. Nests inside spy_launches of the kernels."""
    ran = []

    def spy(name):
        launcher = getattr(koleo, name)

        def launch(*args):
            ran.append(name)
            return launcher(*args)

        return launch

    with pytest.MonkeyPatch.context() as patch:
        for name in TRITON_RAN:
            patch.setattr(koleo, name, spy(name))
        yield ran


def assert_matches_reference(x, grad_tol=None, **kwargs):
    """Loss and gradient of the Triton backend equal the eager reference's (same neighbours);
    grad_tol defaults to grad_tolerance."""
    with spy_triton() as ran:
        loss, grad = loss_and_grad(lambda t: koleo_loss(t, backend="triton", **kwargs), x)
    assert ran == TRITON_RAN
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("eps", "p", "distance_eps")}
    ref_loss, ref_grad = loss_and_grad(lambda t: ref.koleo_loss(t, **ref_kwargs), x)
    assert loss.dtype == x.dtype and loss.shape == ()
    assert grad.dtype == x.dtype and grad.shape == x.shape
    torch.testing.assert_close(loss, ref_loss, **loss_tolerance(x.dtype))
    torch.testing.assert_close(grad.float(), ref_grad.float(), **(grad_tol or grad_tolerance(x.dtype, ref_grad)))


# D: a single tile (64), ragged tiles (1000), 384 and 1024 (ViT-S and ViT-L widths); B: 2, 3 (one ragged row
# block), 64 and 128 (the exact search: 8 and 16 blocks of 8 keys) and 520 (above 384 keys: the candidate search
# and the finishing kernel, 9 blocks of 64 keys, the last of 8). Sizes kept small for the interpreter: B = 1000 and
# (128, 1024) cost 40 and 28 s there and took no other path.
@pytest.mark.parametrize("B,D", [(2, 64), (3, 1000), (128, 384), (64, 1024), (520, 64)])
def test_fp32_matches_reference(B, D):
    assert_matches_reference(torch.randn(B, D))


@pytest.mark.parametrize("B,D,dtype", [(3, 1024, torch.bfloat16), (128, 384, torch.bfloat16), (50, 64, torch.float16)])
def test_half_precision_matches_reference(B, D, dtype):
    # the reference upcasts to fp32 first; only the final roundings of the loss and gradient differ
    assert_matches_reference(torch.randn(B, D).to(dtype))


def _special_rows_batch(B=130, D=48, device="cpu"):
    """Random rows in dims 4.., plus rows in dims 0-3 whose nearest neighbours are known exactly."""
    x = torch.zeros(B, D, device=device)
    x[:, 4:] = torch.randn(B, D - 4, device=device)
    e = torch.eye(D, device=device)
    x[5], x[20], x[90] = e[0], e[0] + e[1], e[0] - e[1]  # 5's neighbours 20 and 90 tie, in two key tiles
    x[100], x[110], x[120] = e[2], e[2] + e[3], e[2] - e[3]  # a tie inside one 64-key tile (two 8-key ones)
    x[70] = x[129] = -e[0]  # a duplicated pair, the copy in the ragged last tile: distance ||eps * 1||
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


KERNELS = ("_koleo_search_kernel", "_koleo_candidates_kernel", "_koleo_finish_kernel", "_koleo_bwd_kernel")


def spy_kernels(monkeypatch):
    """Launches of the exact search, candidate search, finishing and backward kernels."""
    return [spy_launches(monkeypatch, koleo, name) for name in KERNELS]


@pytest.fixture
def split_keys(monkeypatch):
    """Make the search split the keys between programs as on a 132-SM GPU, down to one key tile."""
    monkeypatch.setattr(layout, "num_sms", lambda device: 132)
    monkeypatch.setattr(koleo, "_MIN_KEYS_PER_SPLIT", 32)


@pytest.fixture
def candidates(monkeypatch):
    """Send every batch to the candidate search and the fp32 re-ranking (GPU batches of more than
    _EXACT_MAX_KEYS keys) rather than to the exact search."""
    monkeypatch.setattr(koleo, "_EXACT_MAX_KEYS", 0)


def test_exact_search_splits_and_combines_like_one_pass(split_keys, monkeypatch):
    """B = 130 on 132 SMs: 17 query blocks of 8 rows x 9 key splits of 16 keys (the last 2); the splits'
    best neighbours meet in one atomic max of (similarity, index), ties to the first index."""
    assert koleo._search_plan(130, 130, torch.device("cpu")) == (True, 8, 9, 16, 0)
    search, candidates, finish, bwd = spy_kernels(monkeypatch)
    assert_ties_duplicates_and_zero_rows_match()  # ties across splits (20 | 90, 110 | 120)
    assert search.grids() == [(17, 9)] and candidates.grids() == finish.grids() == []
    assert search.arg("splits") == [9] and bwd.grids() == [(130 * 48 // 256 + 1,)]
    x = torch.rand(130, 16)  # all similarities positive ...
    x[3] = -x[3]  # ... but row 3's, all negative: the combine must order negative similarities right
    assert_matches_reference(x)


def test_candidate_search_splits_and_reranks(split_keys, candidates, monkeypatch):
    """The GPU's large-batch path on the same batch: 9 query blocks of 16 x 3 key splits of 64 (ties
    across tiles, 20 | 90, and inside one, 110 and 120), finished in 33 blocks of 4 rows; and a batch of
    every sign."""
    search, cands, finish, _ = spy_kernels(monkeypatch)
    assert_ties_duplicates_and_zero_rows_match()
    assert search.grids() == [] and cands.grids() == [(9, 3)] and cands.arg("keys_per_split") == [64]
    assert finish.grids() == [(33,)] and finish.arg("splits") == [3] and finish.arg("BLOCK_M") == [4]
    x = torch.rand(130, 16)
    x[3] = -x[3]
    assert_matches_reference(x)


def test_h100_launch_shapes_match_reference(monkeypatch):
    """The H100's launch (132 SMs) at B = 600, D = 100: the candidate search in 19 query blocks of 32 rows
    (the last 24) x 10 splits of 64 keys (the last 24), 4 feature steps of 32 (the last 4); the finishing
    kernel in 150 blocks of 4 rows; the backward in 235 blocks of 256 elements."""
    monkeypatch.setattr(layout, "num_sms", lambda device: 132)
    search, cands, finish, bwd = spy_kernels(monkeypatch)
    assert_matches_reference(torch.randn(600, 100))
    assert search.grids() == [] and cands.grids() == [(19, 10)] and cands.arg("keys_per_split") == [64]
    assert cands.arg("BLOCK_M") == [32] and cands.arg("BLOCK_N") == [64] and cands.arg("BLOCK_K") == [32]
    assert finish.grids() == [(150,)] and finish.arg("BLOCK_M") == [4]
    assert bwd.grids() == [(235,)] and bwd.arg("BLOCK") == [256]


def test_h100_plans_fill_the_sms():
    """From B = 128 on, every launch has at least one program per SM (132), but the finishing kernel's
    at 384 < B < 528 (4 rows a program: 97 .. 131 programs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "num_sms", lambda device: 132)
        for B in [*range(128, 1100), 2048, 4096, 4097, 16384, 65536]:
            plan = koleo._search_plan(B, B, torch.device("cuda"))
            assert triton.cdiv(B, plan.block_m) * plan.splits >= 132, (B, plan)
            assert plan.exact or triton.cdiv(B, plan.finish_block_m) >= 132 or 384 < B < 528, (B, plan)
            assert triton.cdiv(B * 384, koleo._bwd_block(B * 384, torch.device("cuda"))) >= 132


def tf32_scores(x):
    """The candidate search's cheap score of every pair as the interpreter computes it: both operands
    truncated to tf32 (10 mantissa bits), divided by the key's fp32 norm."""
    t = (x.view(torch.int32) & -8192).view(torch.float32).double()
    return (t @ t.t()) / x.double().norm(dim=1)


def _near_tie_batch(keys):
    """B = 130, D = 32: row 0 and near-tie keys at the indices `keys`, ranked by the tf32 score in this
    order and by fp32 in the opposite one (within 4e-4 of each other, far above fp32's rounding), among
    random rows in other dimensions (similarity 0 to them)."""
    x = torch.zeros(130, 32)
    x[:, 2:] = torch.randn(130, 30)
    x[[0, *keys], 2:] = 0.0
    x[0, 0] = 1.0
    for j, key in enumerate(keys):
        # (1 + j 2^-12, 0.05 - 0.002 j): tf32 truncates the 2^-12 steps away, so its score 1 / ||x_key|| falls
        # with j (the norm grows), while fp32's cosine (1 + j 2^-12) / ||x_key|| rises (y / x falls)
        x[key, 0], x[key, 1] = 1.0 + j * 2.0**-12, 0.05 - 0.002 * j
    return x


@pytest.mark.parametrize("keys", [[1, 70], [1, 2, 3]], ids=["two-splits", "three-in-one-split"])
def test_reranking_picks_the_fp32_neighbour_of_a_near_tie(split_keys, candidates, keys):
    """Row 0's fp32 neighbour is the tf32 score's last of a near-tie, the splits holding keys 0-63,
    64-127 and 128-129. two-splits: each key tops its split, whose runner-up is far below, so only the
    re-ranking of the candidates in fp32 picks key 70. three-in-one-split: key 3 is not among its split's
    two candidates, but key 2 is within the margin of the best, so the finishing kernel searches that
    split again in fp32 and must find key 3."""
    x = _near_tie_batch(keys)
    cheap = tf32_scores(x)[0, keys]
    exact = (F.normalize(x.double()) @ F.normalize(x.double())[0])[keys]
    assert torch.equal(cheap.argsort(descending=True), torch.arange(len(keys)))  # the trap is real ...
    assert torch.equal(exact.argsort(), torch.arange(len(keys)))
    assert cheap[0] - cheap[-1] < 2 * koleo._rank_tolerance(torch.float32, 32)  # ... and within the margin
    _, nn_kernel, _ = koleo._koleo_op(x, 0, 130, 1e-8, 1e-8, 2.0, "triton")
    nn_ref = ref.koleo_neighbours(x, 0, 130, 1e-8)
    assert nn_ref[0] == keys[-1] and torch.equal(nn_kernel.long(), nn_ref)
    assert_matches_reference(x)


def test_gradient_is_computed_in_the_forward(monkeypatch):
    """The forward's third output is d loss / d x for d loss = 1 (the reference's autograd); the backward
    only scales it: one elementwise kernel, no search, no pair."""
    x = torch.randn(20, 24)
    _, _, grad = koleo._koleo_op(x, 0, 20, 1e-8, 1e-8, 2.0, "triton")
    _, ref_grad = loss_and_grad(ref.koleo_loss, x)
    torch.testing.assert_close(grad, ref_grad, **grad_tolerance(torch.float32, ref_grad))
    leaf = x.clone().requires_grad_()
    loss = koleo_loss(leaf, backend="triton")
    launches = spy_kernels(monkeypatch)
    (loss * -2.5).backward()
    assert [len(calls) for calls in launches] == [0, 0, 0, 1]
    torch.testing.assert_close(leaf.grad, -2.5 * ref_grad, **grad_tolerance(torch.float32, ref_grad))


def test_duplicate_pair_value_is_minus_log_eps_distance():
    # two identical rows of D=384: d = ||1e-8 * ones||_2 for both, as nn.PairwiseDistance computes it
    x = torch.ones(2, 384)
    d = 1e-8 * math.sqrt(384)
    # an fp32 result of ~15.4 (ulp 1e-6, 6e-8 relative) from a few fp32 ops: rel 1e-6 (measured 5e-9)
    assert koleo_loss(x, backend="triton").item() == pytest.approx(-math.log(d + 1e-8), rel=1e-6)


@pytest.mark.parametrize("p", [1, 3.0])
def test_other_norm_degrees_match_reference(p):
    assert_matches_reference(torch.randn(40, 50), p=p)


@pytest.mark.parametrize("distance_eps", [None, 1e-3])
def test_eps_is_forwarded(distance_eps):
    x = torch.randn(20, 16)
    x[7] = x[2]  # a duplicated pair: its distance is ||distance_eps * 1||, so the loss depends on it
    # the duplicates push each other with gradients ~ 1 / (B (d + eps)) ~ 100 that cancel; the fp32
    # residue of that cancellation (measured 5e-7) needs an absolute atol, 1e-6
    assert_matches_reference(x, grad_tol=dict(rtol=1e-5, atol=1e-6), eps=1e-4, distance_eps=distance_eps)


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


def test_dispatch_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    x = torch.randn(10, 8)
    with spy_triton() as ran:
        assert koleo_loss(x).item() == ref.koleo_loss(x).item()
        assert koleo_loss(x, backend="eager").item() == ref.koleo_loss(x).item()
    assert ran == []


def test_reference_ignores_autocast():
    # dinov2 disables autocast around KoLeo: a bf16 matmul would pick other neighbours
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ref.koleo_loss(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, ref.koleo_loss(x))


# ---- drop-in for lightly's and dinov2's KoLeoLoss ------------------------------------------------

def dinov2_koleo(student_output, eps=1e-8):
    """dinov2's KoLeoLoss.forward (dinov2/loss/koleo_loss.py), transcribed (autocast off on CPU here)."""
    with torch.autocast("cpu", enabled=False):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        dots = torch.mm(student_output, student_output.t())
        n = student_output.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, I = torch.max(dots, dim=1)  # noqa: E741
        distances = torch.nn.PairwiseDistance(2, eps=1e-8)(student_output, student_output[I])
        return -torch.log(distances + eps).mean()


def test_module_has_lightlys_signature():
    ours, theirs = (inspect.signature(cls.__init__).parameters for cls in (KoLeoLoss, LightlyKoLeoLoss))
    assert [(p.name, p.default, p.kind) for p in theirs.values()] == [
        (p.name, p.default, p.kind) for p in ours.values() if p.kind != p.KEYWORD_ONLY
    ]
    assert list(inspect.signature(KoLeoLoss.forward).parameters) == ["self", "x", "eps"]  # dinov2's optional eps
    assert repr(KoLeoLoss()) == "KoLeoLoss(p=2, eps=1e-08)"


def _antipodal():
    """x and -x: lightly fills the diagonal with -2, so each row's neighbour is the other (dinov2's -1
    would tie with it and pick the row itself: the one input where the two differ)."""
    v = torch.randn(1, 16)
    return torch.cat([v, -v])


# (input, KoLeoLoss arguments, gradient atol if not grad_tolerance's): lightly's behaviour on one row, on
# the extreme pair and at other degrees
LIGHTLY_CASES = [
    pytest.param(lambda: torch.tensor([[1.0]]), {}, None, id="one-row-17.7275"),
    pytest.param(lambda: torch.randn(1, 5), {"p": 3}, None, id="one-row-p3"),
    # a gradient of 0 (each row is pushed along itself, which the normalisation removes): the fp32 residue
    # of terms ~ 1 / (B d ||x||) ~ 0.06 (measured 3.7e-9): atol 1e-7
    pytest.param(_antipodal, {}, 1e-7, id="antipodal"),
    pytest.param(lambda: torch.randn(24, 16), {}, None, id="default"),
    pytest.param(lambda: torch.randn(24, 16), {"p": 1, "eps": 1e-6}, None, id="p1"),
    pytest.param(lambda: torch.randn(24, 16), {"p": 3.5}, None, id="p3.5"),
]


def lightly_and_ours(x, backend, **module_kwargs):
    """(loss, grad) of lightly's KoLeoLoss(**module_kwargs) and of ours on x, and the Triton launchers that ran."""
    expected = loss_and_grad(LightlyKoLeoLoss(**module_kwargs), x)
    with spy_triton() as ran:
        got = loss_and_grad(KoLeoLoss(**module_kwargs, backend=backend), x)
    return expected, got, ran


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("make_x,module_kwargs,grad_atol", LIGHTLY_CASES)
def test_lightly_cases(backend, make_x, module_kwargs, grad_atol):
    x = make_x()
    (expected, expected_grad), (loss, grad), ran = lightly_and_ours(x, backend, **module_kwargs)
    assert ran == (TRITON_RAN if backend == "triton" else [])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    tol = grad_tolerance(torch.float32, expected_grad) if grad_atol is None else dict(rtol=1e-5, atol=grad_atol)
    torch.testing.assert_close(grad, expected_grad, **tol)


def test_one_row_is_its_own_neighbour():
    # -log(||1e-8 * 1||_2 + 1e-8) = -log(2e-8) = 17.7275: an fp32 result from a few fp32 ops, rel 1e-6
    # (~9 fp32 ulps at 17.7), as in test_duplicate_pair_value_is_minus_log_eps_distance
    for backend in ("triton", "eager"):
        assert koleo_loss(torch.tensor([[1.0]]), backend=backend).item() == pytest.approx(-math.log(2e-8), rel=1e-6)


@pytest.mark.parametrize("p", [math.inf, 0.5, 0, -1])
def test_norm_degrees_without_kernel_run_eager(p):
    """Degrees the kernels leave out go to the eager reference even with backend="triton"."""
    (expected, expected_grad), (loss, grad), ran = lightly_and_ours(torch.randn(24, 16), "triton", p=p)
    assert ran == []
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    if p == 0:  # ||u||_0 counts the non-zero entries: torch gives it no gradient, x.grad stays None
        assert expected_grad is None and grad is None
    else:
        torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))


def test_float64_is_computed_in_float64():
    # resolve_backend sends float64 to the eager reference, which computes in float64 as lightly
    (expected, expected_grad), (loss, grad), ran = lightly_and_ours(torch.randn(24, 16, dtype=torch.float64), None)
    assert ran == [] and loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, expected)  # float64 defaults (module docstring)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtype_out_as_lightly(backend, dtype):
    x = _pairs(24, 32, "cpu").to(dtype)  # clear neighbours: lightly's rounded similarities pick the same
    (expected, _), (loss, grad), ran = lightly_and_ours(x, backend)
    assert ran == (TRITON_RAN if backend == "triton" else [])
    assert expected.dtype == loss.dtype == grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=LIGHTLY_HALF_RTOL, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_gives_nan_as_lightly(backend, value):
    x = _with_entry(value)
    assert LightlyKoLeoLoss()(x).isnan()
    with spy_triton() as ran:
        assert KoLeoLoss(backend=backend)(x).isnan() and koleo_loss(x, backend=backend).isnan()
    assert ran == (["_triton_forward"] * 2 if backend == "triton" else [])


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_dinov2_forward_eps(backend):
    """dinov2's forward(x, eps) changes F.normalize's and the log's eps, not nn.PairwiseDistance's 1e-8."""
    x = torch.randn(24, 16)
    x[5] = x[9]  # a duplicated pair: its distance is PairwiseDistance's eps * 4
    module = KoLeoLoss(backend=backend)
    with spy_triton() as ran:
        loss, grad = loss_and_grad(lambda t: module(t, 1e-3), x)
    assert ran == (TRITON_RAN if backend == "triton" else [])
    expected, expected_grad = loss_and_grad(lambda t: dinov2_koleo(t, 1e-3), x)
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    # the duplicates' opposite pushes of ~1 / (B (d + eps)) ~ 0.04 cancel to an fp32 residue: atol 1e-6
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # lightly's eps=1e-3 is PairwiseDistance's too: the pair's -log(d + eps) drops by ~log 5, the mean by
    # 2 / 24 of that, 0.13 (a must-differ check, not a tolerance)
    assert abs(LightlyKoLeoLoss(eps=1e-3)(x) - loss) > 0.1
    torch.testing.assert_close(module(x), dinov2_koleo(x), **FP32_TOL)  # forward(x) is dinov2's default


def _with_entry(value, dtype=torch.float32):
    """(4, 8) random rows with x[2, 5] = value."""
    x = torch.randn(4, 8, dtype=dtype)
    x[2, 5] = value
    return x


P_MESSAGE = "p .* must be a number"


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("x,kwargs,match", [
    pytest.param(torch.randn(0, 8), {}, "empty along dim 0", id="no-rows"),
    pytest.param(torch.randn(2, 3, 8), {}, "x must be 2-D", id="3-d"),
    pytest.param(torch.ones(4, 8, dtype=torch.int32), {}, "x must be float", id="int"),
    pytest.param(torch.randn(4, 0), {}, "empty along dim 1", id="no-features"),
    pytest.param(_with_entry(math.nan), {"check_finite": True}, "non-finite", id="nan"),
    pytest.param(_with_entry(math.inf), {"check_finite": True}, "non-finite", id="inf"),
    pytest.param(_with_entry(-math.inf, torch.bfloat16), {"check_finite": True}, "non-finite", id="bf16-minus-inf"),
    pytest.param(torch.randn(4, 8), {"eps": 0.0}, "eps must be > 0", id="eps-0"),
    pytest.param(torch.randn(4, 8), {"distance_eps": -1.0}, "distance_eps must be > 0", id="distance-eps-negative"),
    pytest.param(torch.randn(4, 8), {"p": True}, P_MESSAGE, id="p-bool"),
    pytest.param(torch.randn(4, 8), {"p": "2"}, P_MESSAGE, id="p-str"),
    pytest.param(torch.randn(4, 8), {"group": object()}, "torch.distributed is not initialised", id="group-no-dist"),
])
def test_bad_input(backend, x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        koleo_loss(x, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_module_check_finite(backend):
    x = _with_entry(math.nan)
    with pytest.raises(ValueError, match=r"x holds non-finite values \(NaN or inf\) \(shape \(4, 8\)\)"):
        KoLeoLoss(backend=backend, check_finite=True)(x)
    assert KoLeoLoss(backend=backend)(x).isnan()  # off by default, as lightly: no host sync


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


# ---- one torch.library op: torch.compile and opcheck ---------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_dynamo_sees_one_op_without_graph_breaks(backend, fresh_dynamo):
    x = torch.randn(12, 8)
    for fn in (lambda t: koleo_loss(t, backend=backend), KoLeoLoss(backend=backend)):
        torch._dynamo.reset()
        with spy_triton() as ran:
            explained = torch._dynamo.explain(fn)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        targets = [node.target for node in explained.graphs[0].graph.nodes if node.op == "call_function"]
        assert targets.count(torch.ops.dinotron.koleo.default) == 1
        assert ran == (["_triton_forward"] if backend == "triton" else [])


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_compiled_fullgraph_matches_eager(backend, fresh_dynamo):
    x = torch.randn(12, 8)
    x[3] = x[7]  # a duplicated pair: large opposite gradients that must still cancel
    expected, expected_grad = loss_and_grad(lambda t: koleo_loss(t, backend=backend, p=3), x)
    compiled = torch.compile(lambda t: koleo_loss(t, backend=backend, p=3), backend="aot_eager", fullgraph=True)
    with spy_triton() as ran:
        loss, grad = loss_and_grad(compiled, x)
    assert ran == (TRITON_RAN if backend == "triton" else [])
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_opcheck(backend):
    """torch.library.opcheck of the ops (schema, fake impl, autograd registration, AOT dispatch), with the
    queries at an offset among the keys as with a group; the eager backward is autograd's, no op."""
    keys = torch.randn(10, 8)
    args = (4, 5, 1e-8, 1e-6, 3.0)  # offset, B, eps, distance_eps, p
    torch.library.opcheck(torch.ops.dinotron.koleo.default, (keys.clone().requires_grad_(), *args, backend))
    if backend == "triton":
        _, _, grad = torch.ops.dinotron.koleo(keys, *args, backend)
        for dtype in (torch.float32, torch.bfloat16):
            torch.library.opcheck(torch.ops.dinotron.koleo_backward.default, (torch.tensor(1.0), grad, dtype))


# ---- compiled kernels ----------------------------------------------------------------------------

# The exact search (fp32 and bf16, p = 2 and another degree), the candidate search (fp32 through tf32, bf16),
# the finishing kernel (16 and 2 rows a program) and the backward, with the launch options of _triton_forward.
LOWER_SCRIPT = """
from dinotron.kernels import koleo

rows = dict(B="i32", N="i32", D="i32", offset="i32", stride="i32", keys_per_split="i32")
finish = dict(splits="i32", eps="fp32", dist_eps="fp32", p="fp32", inv_B="fp32")
for dtype, p_is_2 in [("fp32", True), ("bf16", False)]:
    lower(koleo._koleo_search_kernel, dict(K=f"*{dtype}", BEST="*i64", COUNT="*i32", NN="*i32", LOSS="*fp32",
          G="*fp32", **rows, **finish, BLOCK_M=koleo._EXACT_BLOCK, BLOCK_N=koleo._EXACT_BLOCK,
          BLOCK_K=koleo._EXACT_BLOCK_K, P_IS_2=p_is_2), num_warps=2)
for dtype, precision in [("fp32", tl.constexpr("tf32")), ("bf16", None)]:
    lower(koleo._koleo_candidates_kernel, dict(K=f"*{dtype}", CAND="*i64", **rows, eps="fp32", BLOCK_M=64,
          BLOCK_N=koleo._BLOCK_N, BLOCK_K=koleo._BLOCK_K, PRECISION=precision, INTERPRETED=False), num_warps=64 // 8)
for dtype, block_m, p_is_2 in [("fp32", 16, True), ("bf16", 4, False)]:
    lower(koleo._koleo_finish_kernel, dict(K=f"*{dtype}", CAND="*i64", NN="*i32", LOSS="*fp32", G="*fp32", **rows,
          **finish, tol="fp32", BLOCK_M=block_m, BLOCK_N=koleo._FALLBACK_BLOCK_N, BLOCK_K=koleo._BLOCK_K,
          P_IS_2=p_is_2), num_warps=max(2, block_m // 4))
lower(koleo._koleo_bwd_kernel, dict(G="*fp32", GRAD_LOSS="*bf16", DK="*bf16", numel="i32", BLOCK=1024), num_warps=4)
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 7)


# ---- on a CUDA GPU (pytest -m gpu) ---------------------------------------------------------------

def _pairs(B, D, device):
    """Rows in shuffled pairs (a direction and a 5% perturbation of it): every nearest neighbour wins by
    a wide margin, so the kernel's fp32 scores and the reference's fp32 mm (summed in other orders) cannot
    pick differently."""
    base = torch.randn(B // 2 + 1, D, device=device).repeat_interleave(2, dim=0)[:B]
    return (base + 0.05 * torch.randn(B, D, device=device))[torch.randperm(B, device=device)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,D", [(2, 64), (3, 1000), (128, 384), (1000, 1024), (4096, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(B, D, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference's mm (the kernel ignores it)
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


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(fresh_dynamo):
    """torch.compile(mode="reduce-overhead"): forward and backward captured in CUDA graphs (none skipped,
    so nothing syncs with the host), replays give the eager values."""
    from torch._dynamo.utils import counters

    counters.clear()
    x = _pairs(256, 384, "cuda")
    expected, expected_grad = loss_and_grad(koleo_loss, x)
    compiled = torch.compile(koleo_loss, mode="reduce-overhead", fullgraph=True)
    runs = []
    for _ in range(4):  # warm-up, recording, replays
        torch.compiler.cudagraph_mark_step_begin()
        with spy_triton() as ran:
            loss, grad = loss_and_grad(compiled, x)
        runs.append(ran)
        # compared before the next replay overwrites the graphs' outputs
        torch.testing.assert_close(loss, expected, **FP32_TOL)
        torch.testing.assert_close(grad, expected_grad, **grad_tolerance(torch.float32, expected_grad))
    # the Triton launchers run in the warm-up (and the recording), a replay of the captured graphs runs no Python
    assert runs[0] == TRITON_RAN and runs[-1] == [], runs
    assert counters["inductor"]["cudagraph_skips"] == 0
