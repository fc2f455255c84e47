"""Memory-efficient attention (kernels/flash_attention.py) against the eager reference, and its timm integration.

On CPU the Triton kernels run in the interpreter (backend="triton"); shapes stay small. The kernels
take fp16/bf16 and accumulate in fp32. Oracles: kernels/reference.py's fp32 attention on the same
(rounded) inputs, timm's own attention (fp32, or under the same autocast), and per-sequence calls;
the varlen work schedule against per-sequence tile counts summed by hand (exact integers).
Tolerances (element-wise, TOL):
- fp16 outputs and gradients: atol 4e-3, rtol 1e-2. The kernels round the softmax weights P to fp16
  for P @ V and the results to fp16 (unit roundoff 4.9e-4 each) on O(1) values: measured at most
  1e-3 absolute, 10% of the tolerance.
- bf16: atol fp16's scaled by the ratio of their epsilons (2^-7 / 2^-10 = 8): 3e-2; rtol 3e-2, four
  bf16 ulps (fp16's 1e-2 is ten fp16 ulps).
- fp32 paths (eager fallback, autocast off): torch.testing's fp32 defaults (rtol 1.3e-6, atol 1e-5).
- whole timm models under autocast (assert_model_close): outputs and input gradients at TOL; a
  parameter gradient sums per-token terms over the B x N tokens, each off by up to TOL's atol, so
  atol x sqrt(B x N).
The ops (dinotron::attention and its backward) under torch.compile: dynamo's explain must find one
graph and no break, which also shows that the Python around the op reads no tensor value on the host
(a .item(), .tolist() or bool(tensor) would break the graph); compiled (aot_eager, or CUDA graphs on
a GPU) and eager runs are the same op implementations on the same inputs, so they must agree exactly
(a swapped timm Attention compiled by inductor on a GPU: within TOL, as inductor fuses the bf16 layers
around the op); each case is also checked against its oracle above (torch's
scaled_dot_product_attention per sequence, or timm's own forward) at the tolerances above. The eager
backend's written-out backward (reference.attention_backward) against autograd through the
reference's forward: fp32 defaults (measured 2e-7). Tests of the Triton backend count its launches
(helpers.spy_launches), those of the eager backend check there are none.
"""
import contextlib
import copy
import io
import math

import pytest
import timm
import torch
import torch._dynamo.testing
import torch.nn as nn
import torch.nn.functional as F

from dinotron.kernels import (
    attention,
    attention_varlen,
    flash_attention,
    make_cu_seqlens,
    packed_sequences,
    reference,
    swap_timm_attention,
)
from dinotron.kernels.flash_attention import (
    SCHEDULE_BLOCKS,
    attention_forward,
    is_swapped,
    is_timm_attention,
    tile_schedule,
    varlen_programs,
)
from helpers import spy_launches
from lowering import assert_lowers

TOL = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}  # module docstring


def qkv_inputs(shape, dtype=torch.float16, device="cpu"):
    return [torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3)]


def value_and_grads(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> (cast to its dtype) w.r.t. inputs."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype)), grad_out


def upcast(inputs):
    return [t.detach().float().requires_grad_() for t in inputs]


def assert_all_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), **tol)


def check_against_reference(inputs, dtype, fn, ref_fn):
    out, grads, grad_out = value_and_grads(fn, inputs)
    ref_out, ref_grads, _ = value_and_grads(ref_fn, upcast(inputs), grad_out.float())
    assert out.dtype == dtype
    assert_all_close([out, *grads], [ref_out, *ref_grads], **TOL[dtype])


def sdpa_per_sequence(q, k, v, cu_seqlens):
    """Oracle of attention_varlen: torch's scaled_dot_product_attention on each packed sequence alone."""
    bounds = cu_seqlens.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                      for a, b in zip(bounds, bounds[1:], strict=False)])


@pytest.fixture
def launches(monkeypatch):
    """The launches of the forward and of the backward kernel, to tell which backend ran."""
    return {name: spy_launches(monkeypatch, flash_attention, name) for name in ("_attn_fwd", "_attn_bwd")}


@pytest.mark.parametrize("B,H,N", [(2, 1, 1), (2, 2, 50), (1, 2, 65), (1, 2, 257)])
def test_forward_and_gradients_match_reference(B, H, N):
    inputs = qkv_inputs((B, H, N, 64))
    check_against_reference(
        inputs, torch.float16, lambda q, k, v: attention(q, k, v, backend="triton"), reference.attention
    )
    q, k, v = (t.detach() for t in inputs)
    _, lse2 = attention_forward(q, k, v, None, N, 64 ** -0.5)
    expected = torch.logsumexp(q.float() @ k.float().transpose(-2, -1) * 64 ** -0.5, dim=-1)
    # fp32 log-sum-exp in base 2, then scaled, vs torch's natural one on the same fp16 inputs: lse ~ 5,
    # whose fp32 ulp is 4.8e-7; measured 1e-6 (2 ulps), 1e-5 leaves margin
    torch.testing.assert_close(lse2 * math.log(2), expected, atol=1e-5, rtol=1e-5)


def test_head_dim_128_and_explicit_scale():
    inputs = qkv_inputs((1, 1, 50, 128))
    check_against_reference(
        inputs, torch.float16, lambda q, k, v: attention(q, k, v, scale=0.05, backend="triton"),
        lambda q, k, v: reference.attention(q, k, v, scale=0.05),
    )


def test_bfloat16_is_refused_by_the_interpreter():
    """The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584): bf16
    runs on the GPU only (test_gpu_*), never silently wrong on CPU."""
    q = torch.randn(1, 1, 16, 64).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        attention(q, q, q, backend="triton")
    torch.testing.assert_close(attention(q, q, q), reference.attention(q, q, q))


def test_timm_layout_inputs_strided_grad_and_output_layout():
    """q, k as timm makes them (views into one (B, N, 2, H, D) tensor), v with D strided (a transposed
    (B, H, D, N) tensor), an expanded (stride-0) output gradient, and the output laid out
    (B, N, H, D) so that timm's transpose + reshape is free."""
    B, N, H, D = 2, 33, 2, 64
    qk = torch.randn(B, N, 2, H, D).half().requires_grad_()
    v_t = torch.randn(B, H, D, N).half().requires_grad_()
    out = attention(*qk.permute(2, 0, 3, 1, 4).unbind(0), v_t.transpose(2, 3), backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    out.float().sum().backward()
    ref_qk, ref_v_t = (t.detach().float().requires_grad_() for t in (qk, v_t))
    reference.attention(*ref_qk.permute(2, 0, 3, 1, 4).unbind(0), ref_v_t.transpose(2, 3)).sum().backward()
    assert_all_close([qk.grad, v_t.grad], [ref_qk.grad, ref_v_t.grad], **TOL[torch.float16])


def test_varlen_matches_per_sequence_calls():
    lengths = [65, 17, 0, 1, 50]
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    assert cu_seqlens.tolist() == [0, 65, 82, 82, 83, 133] and max_seqlen == 65
    inputs = qkv_inputs((sum(lengths), 2, 64))
    # a max_seqlen above the longest sequence only launches idle tiles
    out, grads, grad_out = value_and_grads(
        lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, 100, backend="triton"), inputs
    )
    bounds = cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if a == b:
            continue
        per_seq = [t.detach()[a:b].transpose(0, 1)[None].requires_grad_() for t in inputs]  # (1, H, L, D)
        backend = "triton" if i < 2 else "eager"  # two through our dense kernel, the rest through the reference
        seq_out, seq_grads, _ = value_and_grads(
            lambda q, k, v: attention(q, k, v, backend=backend), per_seq, grad_out[a:b].transpose(0, 1)[None]
        )
        expected = [t[0].transpose(0, 1) for t in (seq_out, *seq_grads)]
        assert_all_close([out[a:b], *(g[a:b] for g in grads)], expected, **TOL[torch.float16])


def test_varlen_reference_matches_per_sequence_reference():
    lengths = [7, 3, 7, 0, 1]
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    q, k, v = (torch.randn(sum(lengths), 3, 16) for _ in range(3))
    out = reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale=0.3)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a < b:
            seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            torch.testing.assert_close(out[a:b], reference.attention(*seq, scale=0.3)[0].transpose(0, 1))


RAGGED = [257, 50, 0, 1, 130, 16, 17, 64, 65]  # ViT global and local crops, an empty one, tile edges


def test_schedule_lists_every_tile_of_every_sequence_once():
    """The varlen schedule against cdiv summed by hand: row r, entry s = the tiles of SCHEDULE_BLOCKS[r]
    rows in sequences before s, so the work-item count is the sum of per-sequence tiles and an empty
    sequence owns no item."""
    cu_seqlens, _ = make_cu_seqlens(RAGGED)
    table = tile_schedule(cu_seqlens)
    assert table.dtype == torch.int32 and table.shape == (len(SCHEDULE_BLOCKS), len(RAGGED) + 1)
    for row, block in zip(table.tolist(), SCHEDULE_BLOCKS, strict=True):
        per_sequence = [-(-n // block) for n in RAGGED]
        assert row == [sum(per_sequence[:s]) for s in range(len(RAGGED) + 1)], block
        assert row[-1] == sum(per_sequence)
    many = [50] * 1500 + [257]  # more sequences than one scan chunk (1024)
    table = tile_schedule(make_cu_seqlens(many)[0])
    assert table[:, -1].tolist() == [sum(-(-n // b) for n in many) for b in SCHEDULE_BLOCKS]


def test_packed_vit_s_grid_is_the_work_item_upper_bound():
    """The packed ViT-S step (128 images x (2 global crops of 257 tokens + 8 local of 50)): the varlen
    grid, sized from host ints, never falls short of the work items of any packing of that many
    tokens and sequences (each item a tile of a real sequence), and at this step holds at most 35 %
    more programs than items (1 %, 13 %, 34 %, 22 % for 16-, 32-, 64-, 128-row tiles, as in the module
    docstring), fewer than a grid sized for the longest sequence (n_seqs x the tiles of 257 tokens)."""
    lengths = ([257] * 2 + [50] * 8) * 128
    for block in SCHEDULE_BLOCKS:
        items = sum(-(-n // block) for n in lengths)
        programs = varlen_programs(block, len(lengths), sum(lengths), 257)
        assert items <= programs <= 1.35 * items, block
        assert programs < len(lengths) * -(-257 // block)
    # the bound is reached: lengths 1 mod block (here block + 1 and 1) need exactly that many items
    for block in SCHEDULE_BLOCKS:
        worst = [block + 1, 1] * 3
        assert varlen_programs(block, 6, sum(worst), block + 1) == sum(-(-n // block) for n in worst)


@pytest.mark.parametrize("lengths", [RAGGED, [50] * 5 + [257]], ids=["ragged", "vit-crops"])
def test_varlen_ragged_lengths_match_reference(lengths, launches):
    """Ragged packed lengths (tile edges, an empty sequence, programs past the last work item) through
    the Triton kernels against the reference, forward and gradients."""
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    check_against_reference(
        qkv_inputs((sum(lengths), 2, 64)), torch.float16,
        lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, max_seqlen, backend="triton"),
        lambda q, k, v: reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen),
    )
    assert launches["_attn_fwd"] and launches["_attn_bwd"]


def test_eager_fallback_and_autocast(launches):
    """The eager backend runs the reference inside the op: its values exactly; its gradients (the
    reference's written-out backward) against autograd through the reference's forward, at fp32's
    defaults; no kernel launch. Then autocast's cast before the kernel."""
    inputs = qkv_inputs((2, 2, 9, 48), torch.float32)
    for backend in (None, "eager"):
        out, grads, grad_out = value_and_grads(lambda q, k, v: attention(q, k, v, backend=backend), inputs)
        ref_out, ref_grads, _ = value_and_grads(reference.attention, upcast(inputs), grad_out)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert_all_close(grads, ref_grads)
    assert not launches["_attn_fwd"] and not launches["_attn_bwd"]
    inputs = qkv_inputs((1, 2, 20, 64), torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention(*inputs, backend="triton")
    assert out.dtype == torch.float16
    expected = reference.attention(*(t.half().float() for t in inputs))
    torch.testing.assert_close(out.float(), expected, **TOL[torch.float16])


Q = torch.ones(1, 2, 8, 64).half()  # (B, H, N, D) fp16; the argument checks never read the values


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: attention(Q, Q, Q[:, :, :4]), "share one", id="lengths"),
    pytest.param(lambda: attention(Q[0], Q[0], Q[0]), "4-D", id="3-d"),
    pytest.param(lambda: attention(Q.float(), Q.float(), Q.float(), backend="triton"), "float32", id="fp32-kernel"),
    pytest.param(lambda: attention(Q[..., :48], Q[..., :48], Q[..., :48], backend="triton"), "D=48", id="head-dim"),
    pytest.param(lambda: attention(Q, Q, Q, scale=0.0), "scale", id="scale"),
    pytest.param(lambda: attention_varlen(Q, Q, Q, [0, 8], 8), "3-D", id="varlen-4-d"),
    pytest.param(lambda: make_cu_seqlens([]), "seq_lengths", id="no-lengths"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(Q, Q, Q, backend="triton")


T10 = torch.ones(10, 2, 64).half()  # (total_tokens, H, D) = (10, 2, 64)


@pytest.mark.parametrize("cu_seqlens,max_seqlen,match", [
    pytest.param(torch.tensor([0.0, 10.0]), 10, "int32", id="float"),
    pytest.param(torch.tensor([[0, 10]], dtype=torch.int32), 10, "1-D", id="2-d"),
    pytest.param(torch.tensor([0], dtype=torch.int32), 10, r"n_seqs \+ 1 >= 2", id="one-offset"),
    pytest.param(torch.tensor([0, 10], dtype=torch.int32), 10.0, "max_seqlen must be a host int", id="float-max"),
    pytest.param([0, 4, 10], -1, "max_seqlen must be a host int", id="negative-max"),
])
def test_bad_packing_arguments_raise(cu_seqlens, max_seqlen, match):
    """What the host knows without reading the offsets: ValueError."""
    with pytest.raises(ValueError, match=match):
        attention_varlen(T10, T10, T10, cu_seqlens, max_seqlen, backend="triton")


@pytest.mark.parametrize("cu_seqlens,max_seqlen,match", [
    pytest.param([1, 10], 10, "must start at 0", id="start"),
    pytest.param([0, 6, 4, 10], 10, "non-decreasing", id="decreasing"),
    pytest.param([0, 4, 9], 10, "must end at 10", id="end"),
    pytest.param([0, 4, 10], 5, "longer than max_seqlen=5", id="max-seqlen"),
])
def test_bad_offsets_fail_the_device_checks(cu_seqlens, max_seqlen, match, launches):
    """The offsets' values, checked with torch._assert_async (no host sync): on CPU tensors a
    RuntimeError with the check's message, before any kernel runs; the reference checks alike."""
    cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=match):
        attention_varlen(T10, T10, T10, cu_seqlens, max_seqlen, backend="triton")
    assert not launches["_attn_fwd"]
    with pytest.raises(RuntimeError, match=match):
        reference.attention_varlen(T10, T10, T10, cu_seqlens, max_seqlen)


# --- timm integration -----------------------------------------------------------------------------


def small_vit(**kwargs):
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=0, init_values=1e-1, **kwargs
    )


def assert_model_close(actual, expected, dtype, n_tokens):
    """forward_and_grads results element-wise: the output and the input gradient at TOL[dtype]; the
    parameter gradients, sums over the n_tokens = B x N tokens of per-token products each off by up
    to TOL[dtype]'s atol, at that atol x sqrt(n_tokens) (independent errors add like a random walk).
    k_norm's bias has an exactly-zero gradient (softmax is shift-invariant) that both sides only
    approximate: the atol covers it."""
    tol = TOL[dtype]
    assert_all_close(actual[:2], expected[:2], **tol)
    assert_all_close(actual[2:], expected[2:], rtol=tol["rtol"], atol=tol["atol"] * math.sqrt(n_tokens))


def forward_and_grads(model, x):
    """Output and the gradients of a fixed projection of it w.r.t. the input and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    loss = (out.float() * weight).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return [out, *torch.autograd.grad(loss, [x, *params])]


def test_swap_timm_attention_fallback_matches_timm_and_restores():
    model = small_vit(reg_tokens=4)
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    expected = forward_and_grads(model, x)
    swap_timm_attention(model)
    assert all(is_swapped(blk.attn) for blk in model.blocks)
    assert list(model.state_dict()) == keys
    assert_all_close(forward_and_grads(model, x), expected)  # fp32 both: torch.testing's defaults
    teacher = copy.deepcopy(model)  # an EMA teacher keeps the swap, bound to its own modules
    assert teacher.blocks[0].attn.forward.module is teacher.blocks[0].attn
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_swapped(loaded.blocks[1].attn) and loaded.blocks[1].attn.forward.module is loaded.blocks[1].attn
    swap_timm_attention(model, enable=False)
    assert not any(is_swapped(m) for m in model.modules())
    assert_all_close(forward_and_grads(model, x), expected, atol=0, rtol=0)


def test_swap_timm_attention_triton_matches_timm_under_autocast():
    model = small_vit(qk_norm=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        expected = forward_and_grads(model, x)
        swap_timm_attention(model, backend="triton")
        actual = forward_and_grads(model, x)
    assert actual[0].dtype == expected[0].dtype
    assert_model_close(actual, expected, torch.float16, n_tokens=2 * (16 + 1))  # measured half of it at most


def test_swap_keeps_timm_paths_for_masks_and_dropout():
    attn = small_vit().blocks[0].attn
    x = torch.randn(2, 5, 128)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    expected = attn(x, attn_mask=mask)
    swap_timm_attention(attn)
    torch.testing.assert_close(attn(x, attn_mask=mask), expected)
    attn.attn_drop.p = 0.5
    attn.train()
    torch.manual_seed(3)
    dropped = attn(x)
    swap_timm_attention(attn, enable=False)
    torch.manual_seed(3)
    torch.testing.assert_close(dropped, attn(x))


def test_swap_only_touches_timm_vit_attention():
    class Attention(nn.Module):  # the attributes of timm's, but not its forward
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
            self.q_norm = self.k_norm = nn.Identity()
            self.attn_drop, self.proj_drop, self.num_heads = nn.Dropout(0.0), nn.Dropout(0.0), 1

    assert not is_timm_attention(Attention())
    with pytest.raises(ValueError, match="no timm ViT Attention"):
        swap_timm_attention(nn.Sequential(Attention()))
    with pytest.raises(ValueError, match="backend"):
        swap_timm_attention(small_vit(), backend="cuda")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_packed_global_and_local_crops_match_separate_batches(backend):
    """The trainer's packing: blocks on [global crops | local crops] tokens in one (1, T, C) sequence
    under packed_sequences equal the blocks on each crop batch, values and gradients."""
    model = small_vit(qk_norm=True)
    swap_timm_attention(model, backend=backend)
    blocks = model.blocks
    n_global, n_local, C = 2, 3, 128
    global_tokens = torch.randn(n_global, 21, C).requires_grad_()  # 16 patches + cls + 4 registers
    local_tokens = torch.randn(n_local, 9, C).requires_grad_()
    weight = torch.randn(n_global * 21 + n_local * 9, C)
    params = list(blocks.parameters())
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=backend == "triton")

    with autocast:
        separate = torch.cat([blocks(global_tokens).flatten(0, 1), blocks(local_tokens).flatten(0, 1)])
    separate_grads = torch.autograd.grad((separate.float() * weight).sum(), [global_tokens, local_tokens, *params])
    expected = [separate, *separate_grads]

    cu_seqlens, max_seqlen = make_cu_seqlens([21] * n_global + [9] * n_local)
    packed_in = torch.cat([global_tokens.flatten(0, 1), local_tokens.flatten(0, 1)])[None]
    with autocast, packed_sequences(cu_seqlens, max_seqlen):
        packed = blocks(packed_in)[0]
        with pytest.raises(ValueError, match=r"expects x of shape \(1, total_tokens, C\)"):
            blocks(global_tokens)
        with pytest.raises(RuntimeError, match="cu_seqlens must end at 60"):  # 69 tokens packed
            blocks(packed_in[:, 9:])
    actual = [packed, *torch.autograd.grad((packed.float() * weight).sum(), [global_tokens, local_tokens, *params])]
    # eager runs in fp32 (autocast off): the same math batched differently, torch.testing's fp32
    # defaults (measured 2.5% of them). The kernel under fp16 autocast runs the same fp16 math per
    # sequence either way: results differ by about one fp16 ulp (9.8e-4 at |x| < 2, the largest
    # difference measured), so atol 2e-3, rtol 1e-2, tighter than TOL's reference comparisons.
    assert_all_close(actual, expected, **(dict(atol=2e-3, rtol=1e-2) if backend == "triton" else {}))


# --- torch.library ops under torch.compile ------------------------------------------------------------

CU_SEQLENS, MAX_SEQLEN = make_cu_seqlens([5, 0, 11])  # 16 tokens, an empty sequence among them


def small_qkv(varlen: bool, backend: str):
    """q, k, v for the op: fp16 with D=64 for the kernel, fp32 with D=8 for the eager reference."""
    dtype, D = (torch.float16, 64) if backend == "triton" else (torch.float32, 8)
    return qkv_inputs((16, 2, D) if varlen else (2, 2, 9, D), dtype)


def ops_case(varlen: bool, backend: str):
    """(fn, inputs, oracle, context) for attention or attention_varlen on small_qkv."""
    if varlen:
        return (lambda q, k, v: attention_varlen(q, k, v, CU_SEQLENS, MAX_SEQLEN, backend=backend),
                small_qkv(True, backend), lambda q, k, v: sdpa_per_sequence(q, k, v, CU_SEQLENS),
                contextlib.nullcontext())
    return (lambda q, k, v: attention(q, k, v, backend=backend), small_qkv(False, backend),
            F.scaled_dot_product_attention, contextlib.nullcontext())


def timm_case(packed: bool):
    """(fn, inputs, oracle, context) for a swapped timm Attention (backend="triton"): inside
    packed_sequences in fp32 (the eager reference through the op), else under fp16 autocast (the
    kernel). The oracle is timm's own forward, on each packed sequence alone."""
    attn = swap_timm_attention(small_vit(qk_norm=True).blocks[0].attn, backend="triton")
    if not packed:
        return attn, [torch.randn(2, 9, 128).requires_grad_()], lambda x: type(attn).forward(attn, x), \
            torch.autocast("cpu", dtype=torch.float16)
    bounds = CU_SEQLENS.tolist()

    def per_sequence(x):
        return torch.cat([type(attn).forward(attn, x[:, a:b]) for a, b in zip(bounds, bounds[1:], strict=False)], 1)

    return attn, [torch.randn(1, 16, 128).requires_grad_()], per_sequence, packed_sequences(CU_SEQLENS, MAX_SEQLEN)


COMPILE_CASES = {
    "dense-eager": lambda: ops_case(False, "eager"),
    "varlen-eager": lambda: ops_case(True, "eager"),
    "dense-triton": lambda: ops_case(False, "triton"),
    "varlen-triton": lambda: ops_case(True, "triton"),
    "timm-dense-triton": lambda: timm_case(packed=False),
    "timm-packed-eager": lambda: timm_case(packed=True),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_sees_one_graph_with_eager_values(case, fresh_dynamo, launches):
    fn, inputs, oracle, context = COMPILE_CASES[case]()
    with context:
        explained = torch._dynamo.explain(fn)(*inputs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        for spy in launches.values():
            spy.clear()
        out, grads, grad_out = value_and_grads(fn, inputs)
        compiled_out, compiled_grads, _ = value_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True),
                                                          inputs, grad_out)
        oracle_out, oracle_grads, _ = value_and_grads(oracle, upcast(inputs), grad_out)
    assert_all_close([compiled_out, *compiled_grads], [out, *grads], rtol=0, atol=0)
    kernel = case.endswith("triton")
    assert [len(launches["_attn_fwd"]), len(launches["_attn_bwd"])] == ([2, 4] if kernel else [0, 0])
    assert_all_close([out, *grads], [oracle_out, *oracle_grads], **(TOL[torch.float16] if kernel else {}))


def test_a_new_packing_of_the_same_shape_reuses_the_graph(fresh_dynamo):
    """The trainer enters packed_sequences at every step with new offsets of one shape: one compile."""
    attn = swap_timm_attention(small_vit().blocks[0].attn)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attn, backend=counter, fullgraph=True)
    x = torch.randn(1, 16, 128)
    for _ in range(3):
        with packed_sequences(*make_cu_seqlens([5, 0, 11])):
            compiled(x)
    assert counter.frame_count == 1


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck(backend, varlen, launches):
    """torch.library.opcheck of both ops: schema, fake tensors (shapes, strides), autograd registration
    and AOT dispatch, static and dynamic shapes."""
    q, k, v = small_qkv(varlen, backend)
    args = (q, k, v, CU_SEQLENS if varlen else None, MAX_SEQLEN if varlen else q.shape[2], 0.3, backend)
    torch.library.opcheck(torch.ops.dinotron.attention.default, args)
    out, lse = (t.detach() for t in torch.ops.dinotron.attention(*args))
    grad_args = (torch.randn_like(out), *(t.detach() for t in (q, k, v)), out, lse, *args[3:])
    torch.library.opcheck(torch.ops.dinotron.attention_backward.default, grad_args)
    assert bool(launches["_attn_fwd"]) == bool(launches["_attn_bwd"]) == (backend == "triton")


# --- compiled kernels --------------------------------------------------------------------------------

# Each kernel with the first autotune config kept for each head dim, dense or varlen, fp16 or bf16, and
# the schedule kernel. (The configs' spill and shared-memory figures: the module docstring.)
LOWER_SCRIPT = """
import itertools

import dinotron.kernels.flash_attention as fa

POINTERS = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV", "LSE", "DELTA"}
launches = [(fa._attn_fwd, "fp16", False, {}), (fa._attn_bwd, "bf16", True, {"DKDV": False}),
            (fa._attn_bwd, "fp16", True, {"DKDV": True})]
for (kernel, dtype, varlen, extra), head_dim in itertools.product(launches, fa.HEAD_DIMS):
    config = fa._for_head_dim(kernel.configs, {}, HEAD_DIM=head_dim, **extra)[0]
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, IS_VARLEN=varlen, **extra)
    if not varlen:
        constexprs.update(CU=None, TILES=None)
    args = {
        n: constexprs[n] if n in constexprs else "*i32" if n in ("CU", "TILES") else "*fp32" if n in ("LSE", "DELTA")
        else f"*{dtype}" if n in POINTERS else "fp32" if n.endswith("scale") else "i32"
        for n in kernel.fn.arg_names
    }
    lower(kernel.fn, args, num_warps=config.num_warps, num_stages=config.num_stages)
lower(fa._schedule_kernel, {"CU": "*i32", "TILES": "*i32", "n_seqs": "i32", "CHUNK": fa._SCAN_CHUNK}, num_warps=4)
"""


def test_kernels_compile_for_h100():
    assert_lowers(LOWER_SCRIPT, 7)


# --- on a CUDA GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,H,N,D", [(4, 6, 257, 64), (16, 6, 50, 64), (2, 16, 1370, 64), (2, 4, 257, 128), (3, 2, 1, 64)]
)
def test_gpu_forward_and_gradients(dtype, B, H, N, D):
    inputs = qkv_inputs((B, H, N, D), dtype, "cuda")
    check_against_reference(inputs, dtype, attention, reference.attention)


@pytest.mark.gpu
def test_gpu_packed_global_and_local_crops():
    lengths = [257] * 4 + [50] * 16 + [1, 0, 130]
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    inputs = qkv_inputs((sum(lengths), 6, 64), torch.bfloat16, "cuda")
    check_against_reference(
        inputs, torch.bfloat16, lambda q, k, v: attention_varlen(q, k, v, cu_seqlens.cuda(), max_seqlen),
        lambda q, k, v: reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen),
    )


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_sequence_length():
    N = 16384  # an N x N fp16 score matrix alone would take 512 MiB
    q, k, v = qkv_inputs((1, 1, N, 64), torch.float16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = attention(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    # q, k, v, out and the three gradients in fp16 are 7 x N x 64 x 2 B = 14 MiB, plus (N,) fp32 lse
    # and delta: 32 MiB leaves room for the allocator's rounding, far below the 512 MiB matrix
    assert (torch.cuda.max_memory_allocated() - before) / 2**20 < 32


@pytest.mark.gpu
def test_gpu_swapped_timm_vit_matches_timm():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=98, num_classes=0).cuda()
    x = torch.randn(4, 3, 98, 98, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = forward_and_grads(model, x)
        swap_timm_attention(model)
        actual = forward_and_grads(model, x)
    assert_model_close(actual, expected, torch.bfloat16, n_tokens=4 * (7 * 7 + 1 + 4))


def cloned_value_and_grads(fn, inputs, grad_out):
    """value_and_grads, copied out: CUDA graph replays overwrite their outputs."""
    out, grads, _ = value_and_grads(fn, inputs, grad_out)
    return [t.clone() for t in (out, *grads)]


@pytest.mark.gpu
def test_gpu_cuda_graphs_match_eager(fresh_dynamo, launches):
    """torch.compile(mode="reduce-overhead") captures the ops in CUDA graphs, forward and backward, with
    no cudagraph skip. The ops' replays equal eager exactly (the same kernels on the same inputs, with the
    autotuner's choice cached by the eager run); a swapped timm Attention, dense and packed, within TOL
    (inductor fuses the bf16 layers around the op differently). Eager runs read nothing on the host:
    torch.cuda's sync debug mode turns any synchronising call into an error."""
    torch._dynamo.utils.counters.clear()
    lengths = [257] * 2 + [50] * 3 + [0, 1]
    cu_seqlens, max_seqlen = make_cu_seqlens(lengths)
    cu_seqlens = cu_seqlens.cuda()
    attn = swap_timm_attention(small_vit(qk_norm=True).blocks[0].attn.cuda())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    cases = [  # (fn, inputs, context, exact)
        (attention, qkv_inputs((2, 6, 257, 64), torch.bfloat16, "cuda"), contextlib.nullcontext(), True),
        (lambda q, k, v: attention_varlen(q, k, v, cu_seqlens, max_seqlen),
         qkv_inputs((sum(lengths), 6, 64), torch.bfloat16, "cuda"), contextlib.nullcontext(), True),
        (attn, [torch.randn(2, 257, 128, device="cuda").requires_grad_()], autocast, False),
        (attn, [torch.randn(1, sum(lengths), 128, device="cuda").requires_grad_()], autocast, False),
    ]
    for i, (fn, inputs, context, exact) in enumerate(cases):
        packing = packed_sequences(cu_seqlens, max_seqlen) if i == 3 else contextlib.nullcontext()
        with context, packing:
            _, _, grad_out = value_and_grads(fn, inputs)  # autotunes forward and backward (which syncs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                expected = cloned_value_and_grads(fn, inputs, grad_out)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):  # warm-up, recording, replay
                torch.compiler.cudagraph_mark_step_begin()
                actual = cloned_value_and_grads(compiled, inputs, grad_out)
        assert_all_close(actual, expected, **(dict(rtol=0, atol=0) if exact else TOL[torch.bfloat16]))
    assert launches["_attn_fwd"] and launches["_attn_bwd"]  # the eager runs took the kernels
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.parametrize("launch,head_dim", [({}, 64), ({}, 128), ({"DKDV": True}, 64), ({"DKDV": False}, 128)])
def test_autotune_cap_keeps_an_even_spread(monkeypatch, launch, head_dim):
    """DINOTRON_AUTOTUNE_MAX=n (gpu_proof's time budget): n of the listed configs, from the largest tile to the small
    ones; unset, all of them (the prune as on a GPU: the interpreter's single config is bypassed here)."""
    import dinotron.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "interpreter_enabled", lambda: False)
    name = "fwd" if not launch else "dkdv" if launch["DKDV"] else "dq"
    listed = fa._CONFIGS[name, head_dim]
    every = fa._configs("fwd", "dq", "dkdv")
    kept = [fa._params(c) for c in fa._for_head_dim(every, {"HEAD_DIM": head_dim, **launch})]
    assert sorted(kept) == sorted(listed)
    monkeypatch.setenv("DINOTRON_AUTOTUNE_MAX", "3")
    kept = {fa._params(c) for c in fa._for_head_dim(every, {"HEAD_DIM": head_dim, **launch})}
    assert len(kept) == 3 and listed[0] in kept and kept <= set(listed)
