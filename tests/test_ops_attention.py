"""sparse_attention: all-compute equals SDPA, random symbols equal a masked fp64 golden, garbage in
skipped/reused places never leaks, batch/head invariance, odd and degenerate shapes, bad input, opcheck.

Every numeric property runs on both implementations: the fp32 reference and the Triton kernel (in the
CPU interpreter on CI; fp16/fp32 there because the interpreter's bf16 dot is broken)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from omni_compile.ops import Symbols, sparse_attention
from omni_compile.ops.attention import sparse_attention_op

from _golden import ATTENTION_IMPLS as IMPLS, dtype_attention, golden_attention, impl_context, max_err, poison_like, tolerance

HEAD_DIMS = [64, 72, 80, 96, 128]


@st.composite
def attention_case(draw, dtypes=(torch.float16, torch.float32)):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    D = draw(st.sampled_from(HEAD_DIMS))
    bq = draw(st.sampled_from([16, 32, 64, 128]))
    bkv = draw(st.sampled_from([16, 32, 64, 128]))
    sq = draw(st.integers(1, 3 * bq + 5))
    skv = draw(st.integers(1, 3 * bkv + 5))
    sq, skv = min(sq, 200), min(skv, 200)
    dtype = draw(st.sampled_from(dtypes))
    p_reuse = draw(st.sampled_from([0.0, 0.3, 1.0]))
    p_skip = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31))
    return B, H, D, bq, bkv, sq, skv, dtype, p_reuse, p_skip, seed


def make(case, device="cpu"):
    B, H, D, bq, bkv, sq, skv, dtype, p_reuse, p_skip, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, sq, D, generator=g).to(device, dtype)
    k = torch.randn(B, H, skv, D, generator=g).to(device, dtype)
    v = torch.randn(B, H, skv, D, generator=g).to(device, dtype)
    nq, nk = -(-sq // bq), -(-skv // bkv)
    reuse = torch.rand(B, H, nq, generator=g) < p_reuse
    skip = torch.rand(B, H, nq, nk, generator=g) < p_skip
    return q, k, v, Symbols.from_dense(reuse, skip, bq, bkv, sq, skv).to(device)


def check_against_golden(q, k, v, s, impl, scale=None):
    with impl_context(impl):
        out, lse = sparse_attention(q, k, v, s, scale=scale, return_lse=True)
    gold, gold_lse = golden_attention(q, k, v, s, scale)
    ref_err = max_err(dtype_attention(q, k, v, s, scale), gold)
    tol = tolerance(ref_err, q.dtype, gold.abs().max().item() if gold.numel() else 1.0)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert max_err(out, gold) <= tol, (max_err(out, gold), tol)
    finite = torch.isfinite(gold_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    lse_tol = 1e-4 if q.dtype == torch.float32 else 1e-2
    assert max_err(lse.cpu()[finite], gold_lse[finite]) <= lse_tol


@pytest.mark.parametrize("impl", IMPLS)
@given(case=attention_case())
def test_random_symbols_match_masked_golden(impl, case):
    check_against_golden(*make(case), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_all_compute_equals_dense_sdpa(impl, D):
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(1, 2, s, D, generator=g).half() for s in (77, 130, 130))
    s = Symbols.dense(1, 2, 77, 130, 32, 64)
    with impl_context(impl):
        out = sparse_attention(q, k, v, s)
    gold = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ref_err = max_err(torch.nn.functional.scaled_dot_product_attention(q, k, v), gold)
    assert max_err(out, gold) <= tolerance(ref_err, q.dtype, gold.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@given(case=attention_case(dtypes=(torch.float16,)))
def test_garbage_in_skipped_and_reused_places_never_leaks(impl, case):
    q, k, v, s = make(case)
    reuse, skip = s.to_dense()
    # a key block skipped by every tile, and the query rows of every reused tile, are filled with NaN
    dead_kb = skip.shape[-1] - 1
    skip[..., dead_kb] = True
    s = Symbols.from_dense(reuse, skip, s.block_q, s.block_kv, s.seq_q, s.seq_kv)
    cols = (torch.arange(s.seq_kv) // s.block_kv == dead_kb).view(1, 1, -1, 1)
    rows = reuse[:, :, torch.arange(s.seq_q) // s.block_q].unsqueeze(-1)
    with impl_context(impl):
        clean = sparse_attention(q, k, v, s)
        dirty = sparse_attention(poison_like(q, rows), poison_like(k, cols), poison_like(v, cols), s)
    assert torch.equal(clean, dirty)
    assert torch.isfinite(dirty).all()


def _nan_reach(s, which, b, h, i):
    """``[B, H, Sq]`` bool: the rows whose output a NaN at row ``i`` of ``which`` (of batch item ``b``,
    head ``h``) reaches when the symbols read it: a q row reaches itself if its tile is computed; a k or v
    row every row of the tiles that keep its key block."""
    reuse, skip = s.to_dense()
    keep = ~skip & ~reuse.unsqueeze(-1)  # [B, H, nQ, nK]
    rows = torch.arange(s.seq_q) // s.block_q
    out = torch.zeros(s.batch, s.heads, s.seq_q, dtype=torch.bool)
    if which == "q":
        out[b, h, i] = keep[b, h, i // s.block_q].any()
    else:
        out[b, h] = keep[b, h, rows, i // s.block_kv]
    return out


@pytest.mark.parametrize("which", ["q", "k", "v"])
@given(case=attention_case(dtypes=(torch.float32,)), pick=st.integers(0, 2**31))
def test_nan_in_a_read_input_propagates_as_in_the_kernel(which, case, pick):
    """A NaN the symbols make the op read reaches exactly the rows whose softmax reads it, as NaN (output
    and lse), on the reference as in the kernel; every other row is as without it. (Garbage where the
    symbols read nothing never leaks: the test above.)"""
    q, k, v, s = make(case)
    t = {"q": q, "k": k, "v": v}[which]
    g = torch.Generator().manual_seed(pick)
    b, h = (int(torch.randint(n, (1,), generator=g)) for n in t.shape[:2])
    i, d = int(torch.randint(t.shape[2], (1,), generator=g)), int(torch.randint(t.shape[3], (1,), generator=g))
    dirty = t.clone()
    dirty[b, h, i, d] = float("nan")
    args = {"q": q, "k": k, "v": v, which: dirty}
    reach = _nan_reach(s, which, b, h, i)
    clean = sparse_attention(q, k, v, s)
    for impl in ("reference", "triton", "triton-device-tma"):  # both stores of the kernel's epilogue
        with impl_context(impl):
            out, lse = sparse_attention(args["q"], args["k"], args["v"], s, return_lse=True)
        if which == "v":  # a value feeds its own column only
            assert torch.equal(out.isnan().any(-1), reach) and not lse.isnan().any()
        else:
            assert torch.equal(out.isnan().all(-1), reach) and torch.equal(out.isnan().any(-1), reach)
            assert torch.equal(lse.isnan(), reach)
        same = ~reach.unsqueeze(-1)
        assert max_err(torch.where(same, out, 0), torch.where(same, clean, 0)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_in_a_read_input_gives_the_nan_rows_of_sdpa(impl, which):
    """Everything computed: the rows a NaN input turns NaN are SDPA's."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 50, 64, generator=g) for _ in range(3))
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].clone()
    args[which][1, 0, 37, 5] = float("nan")
    sdpa = torch.nn.functional.scaled_dot_product_attention(args["q"], args["k"], args["v"])
    assert sdpa.isnan().any()
    with impl_context(impl):
        out = sparse_attention(args["q"], args["k"], args["v"], Symbols.dense(2, 2, 50, 50, 16, 32))
    assert torch.equal(out.isnan(), sdpa.isnan())


@pytest.mark.parametrize("impl", IMPLS)
def test_all_skipped_and_all_reused_give_zeros(impl):
    q, k, v = (torch.randn(2, 2, 50, 64).half() for _ in range(3))
    nq, nk = 4, 2
    for reuse_p, skip_p in ((0.0, 1.0), (1.0, 0.0)):
        s = Symbols.from_dense(
            torch.full((2, 2, nq), bool(reuse_p)), torch.full((2, 2, nq, nk), bool(skip_p)), 16, 32, 50, 50
        )
        with impl_context(impl):
            out, lse = sparse_attention(q, k, v, s, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_one_block_and_text_boundary_inside_a_block(impl):
    # 13 "text" tokens then 50 "vision" tokens with block 32: the boundary sits inside block 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 63, 64, generator=g).half() for _ in range(3))
    skip = torch.tensor([[[[False, True], [True, False]]]])
    s = Symbols.from_dense(torch.tensor([[[False, False]]]), skip, 32, 32, 63, 63)
    check_against_golden(q, k, v, s, impl)
    one = Symbols.dense(1, 1, 10, 10, 16, 16)
    check_against_golden(q[:, :, :10], k[:, :, :10], v[:, :, :10], one, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_and_head_invariance(impl):
    case = (2, 3, 64, 32, 32, 90, 70, torch.float16, 0.3, 0.5, 7)
    q, k, v, s = make(case)
    reuse, skip = s.to_dense()
    with impl_context(impl):
        full = sparse_attention(q, k, v, s)
        perm = torch.tensor([2, 0, 1])
        sp = Symbols.from_dense(reuse[:, perm], skip[:, perm], 32, 32, 90, 70)
        permuted = sparse_attention(q[:, perm], k[:, perm], v[:, perm], sp)
        one = sparse_attention(q[1:], k[1:], v[1:], Symbols.from_dense(reuse[1:], skip[1:], 32, 32, 90, 70))
    assert torch.equal(permuted, full[:, perm])
    assert torch.equal(one, full[1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_from_bshd_layout(impl):
    # diffusers builds q/k/v as [B, S, H, D] viewed as [B, H, S, D]: strided, not contiguous
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 70, 2, 64, generator=g).half().transpose(1, 2) for _ in range(3))
    s = Symbols.from_dense(torch.tensor([[[False, True, False]] * 2]), torch.rand(1, 2, 3, 3) < 0.4, 32, 32, 70, 70)
    check_against_golden(q, k, v, s, impl, scale=0.3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [-0.2, 0.0])
def test_non_positive_scale(impl, scale):
    # the kernel scales each row's max of the raw products (max(s*x) = s*max(x) only for s > 0): a negative
    # scale runs as -scale on -q and zero as scale 1 on q * 0; a partial last key block for the masked
    # variant too
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 70, 64, generator=g).half() * 3 for _ in range(3))
    s = Symbols.from_dense(torch.tensor([[[False, True, False]] * 2]), torch.rand(1, 2, 3, 3, generator=g) < 0.4, 32, 32, 70, 70)
    check_against_golden(q, k, v, s, impl, scale=scale)


def test_bad_input_raises_naming_the_argument():
    q = torch.randn(1, 2, 40, 64)
    s = Symbols.dense(1, 2, 40, 40, 16, 16)
    with pytest.raises(ValueError, match="k must have shape"):
        sparse_attention(q, torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64), s)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        sparse_attention(q, q, torch.randn(1, 2, 41, 64), s)
    with pytest.raises(ValueError, match="symbols were built for"):
        sparse_attention(q, q, q, Symbols.dense(1, 2, 48, 40, 16, 16))
    with pytest.raises(TypeError, match="k has dtype"):
        sparse_attention(q, q.half(), q, s)
    with pytest.raises(TypeError, match="q must be float16, bfloat16 or float32"):
        sparse_attention(q.double(), q.double(), q.double(), s)
    with pytest.raises(ValueError, match="head dim"):
        sparse_attention(q[..., :12], q[..., :12], q[..., :12], s)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        sparse_attention(q.transpose(2, 3)[:, :, :40, :40].transpose(2, 3).contiguous().transpose(2, 3), q, q, s)
    with pytest.raises(TypeError, match="symbols must be a Symbols"):
        sparse_attention(q, q, q, None)


def test_opcheck():
    q, k, v, s = make((1, 2, 64, 16, 32, 40, 50, torch.float32, 0.3, 0.5, 1))
    idx, cnt = s.kv_schedule()
    torch.library.opcheck(
        sparse_attention_op, (q, k, v, s.reuse_bits, s.skip_bits, idx, cnt, 16, 32, 0.125)
    )
    torch.library.opcheck(
        sparse_attention_op, (q, k, v, s.reuse_bits, s.skip_bits, idx, cnt, 16, 32, 0.125, True)
    )


@pytest.mark.parametrize("impl", IMPLS)
@given(case=attention_case())
def test_heads_inner_layout_holds_the_same_values(impl, case):
    """``heads_inner=True`` only changes where the values live: ``[B, S, H, D]`` in memory, bit for bit the
    values of the default layout (the runtime reports this layout to the compiler, so it must be exact)."""
    q, k, v, s = make(case)
    with impl_context(impl):
        plain, lse = sparse_attention(q, k, v, s, return_lse=True)
        inner, lse_inner = sparse_attention(q, k, v, s, return_lse=True, heads_inner=True)
    B, H, S, D = q.shape
    assert plain.is_contiguous()
    assert inner.stride() == (S * H * D, D, H * D, 1) and inner.transpose(1, 2).is_contiguous()
    assert torch.equal(inner, plain) and torch.equal(lse_inner, lse)


def test_traces_under_torch_compile_as_the_registered_op():
    q, k, v, s = make((1, 2, 64, 16, 32, 40, 50, torch.float32, 0.3, 0.5, 2))
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda q, k, v: sparse_attention(q, k, v, s) * 2, backend=backend, fullgraph=True)
    assert torch.allclose(fn(q, k, v), sparse_attention(q, k, v, s) * 2)
    assert any("flashomni.sparse_attention" in t for t in targets), targets


def test_tma_path_is_taken_when_forced(monkeypatch):
    import omni_compile.ops.attention as A

    made = []
    real = A.make_descriptor
    monkeypatch.setattr(A, "make_descriptor", lambda t, shape: made.append(shape) or real(t, shape))
    q, k, v, s = make((1, 2, 64, 32, 64, 100, 90, torch.float16, 0.3, 0.5, 3))
    with impl_context("triton-tma"):
        out = sparse_attention(q, k, v, s)
    with impl_context("triton"):
        plain = sparse_attention(q, k, v, s)
    assert len(made) == 3 and torch.equal(out, plain)


def test_persistent_kernel_is_taken_where_a_query_block_is_one_tile(monkeypatch):
    """In descriptor mode "device" a call whose query block is one kernel tile (and whose head dim is a
    power of two) runs the persistent kernel, walking Symbols.kv_order; other calls run the tile grid.
    Both give the grid's values."""
    import omni_compile.ops.attention as A

    seen = []
    real, real_planned = A.launch, A.launch_planned
    monkeypatch.setattr(A, "launch", lambda kernel, *a, **kw: seen.append(kernel) or real(kernel, *a, **kw))
    monkeypatch.setattr(A, "launch_planned", lambda plan, kernel, *a: seen.append(kernel) or real_planned(plan, kernel, *a))
    for bq, D, persistent in ((32, 64, True), (64, 64, True), (128, 64, False), (32, 80, False)):
        q, k, v, s = make((1, 3, D, bq, 32, 150, 90, torch.float32, 0.3, 0.5, bq + D))
        seen.clear()
        with impl_context("triton-device-tma"):
            out, lse = sparse_attention(q, k, v, s, return_lse=True)
        assert seen == [A._sparse_attention_persistent_kernel if persistent else A._sparse_attention_kernel], (bq, D)
        assert (s._kv_order is not None) == persistent
        with impl_context("triton-device-tma-grid"):
            grid_out, grid_lse = sparse_attention(q, k, v, s, return_lse=True)
        assert torch.equal(out, grid_out) and torch.equal(lse, grid_lse)


def test_launch_plans_follow_the_inputs_and_the_modes():
    """The public wrapper keeps its checks' outcome and its launch plan per input key (shapes, strides,
    alignment, layout, modes): a call that differs from a cached one in any of them is planned afresh,
    and every call matches the uncached op's values."""
    import omni_compile.ops.attention as A

    q, k, v, s = make((1, 2, 64, 32, 32, 100, 90, torch.float16, 0.3, 0.5, 11))
    base = torch.empty(q.numel() + 8, dtype=q.dtype)
    shifted = base[1:1 + q.numel()].view(q.shape).copy_(q)  # 2 bytes off a 16-byte boundary
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads inner

    def plan_of(qq, heads_inner=False):
        persistent, key = A._CALLS[A._call_key(qq, k, v, s, heads_inner)]
        return persistent, A._PLANS[key]

    def op(qq, heads_inner=False):
        idx, cnt = s.kv_schedule()
        order = s.kv_order() if A.persistent_attention_applies(qq, 32, 32) else None
        return A._sparse_attention_op_impl(qq, k, v, s.reuse_bits, s.skip_bits, idx, cnt, 32, 32, 64 ** -0.5,
                                           heads_inner, order)

    A._CALLS.clear(), A._PLANS.clear()
    with impl_context("triton-device-tma"):
        for qq, heads_inner in ((q, False), (q, True), (shifted, False), (strided, False), (q, False)):
            out, lse = sparse_attention(qq, k, v, s, return_lse=True, heads_inner=heads_inner)
            want, want_lse = op(qq, heads_inner)
            assert torch.equal(out, want) and torch.equal(lse, want_lse)
            assert (out.stride(1) == 64) == heads_inner
        aligned, misaligned = plan_of(q)[1], plan_of(shifted)[1]
        assert plan_of(q)[0] and aligned.persistent and not misaligned.persistent  # the walk is passed, unused
        assert misaligned.kernel is A._sparse_attention_kernel and not misaligned.kwargs["DEVICE_TMA"]
        assert plan_of(strided)[1].ints[:3] == strided.stride()[:3] != q.stride()[:3]
        assert plan_of(q, True)[1].ints[9:12] == (100 * 2 * 64, 64, 2 * 64)
        assert len(A._CALLS) == 4
    with impl_context("triton-device-tma-grid"):  # persistence off: another key, the grid
        out = sparse_attention(q, k, v, s)
        assert not plan_of(q)[0] and plan_of(q)[1].kernel is A._sparse_attention_kernel
    with impl_context("triton"):  # descriptors off
        assert torch.equal(sparse_attention(q, k, v, s), out)
        assert not plan_of(q)[1].kwargs["DEVICE_TMA"]
    with impl_context("reference"):  # not planned: the reference path
        sparse_attention(q, k, v, s)
        assert A._call_key(q, k, v, s, False) not in A._CALLS
    assert len(A._CALLS) == 6


def test_call_plans_can_be_turned_off(monkeypatch):
    """OMNI_COMPILE_CALL_PLANS=0 (``_common.CALL_PLANS``): nothing is kept, and the values are the same."""
    import omni_compile.ops.attention as A
    from omni_compile.ops import _common

    q, k, v, s = make((1, 2, 64, 32, 32, 100, 90, torch.float16, 0.3, 0.5, 12))
    with impl_context("triton-device-tma"):
        kept = sparse_attention(q, k, v, s)
        A._CALLS.clear(), A._PLANS.clear()
        monkeypatch.setattr(_common, "CALL_PLANS", False)
        assert torch.equal(sparse_attention(q, k, v, s), kept)
    assert not A._CALLS and not A._PLANS


def test_persistent_kernel_walks_any_order_of_the_tiles():
    """The kernel's result does not depend on the order it takes the tiles in (it is a performance
    choice): the longest-first order, its reverse and a random one give the same values."""
    import omni_compile.ops.attention as A

    q, k, v, s = make((2, 2, 64, 32, 32, 110, 130, torch.float32, 0.3, 0.5, 7))
    idx, cnt = s.kv_schedule()
    order = s.kv_order()
    assert sorted(order.tolist()) == list(range(cnt.numel()))
    assert (cnt.reshape(-1)[order.long()].diff() <= 0).all()
    cfg = dict(A._pointer_config(32, 32, q.dtype), PERSISTENT=True, NUM_PROGRAMS=2)
    with impl_context("triton-device-tma"):
        outs = [A._launch_attention(q, k, v, idx, cnt, 32, 32, 64 ** -0.5, cfg, kv_order=o)
                for o in (order, order.flip(0), torch.randperm(order.numel()).to(torch.int32))]
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_persistent_kernel_is_kept_to_few_waves(monkeypatch):
    """On a GPU the persistent kernel runs where the tiles make at most PERSISTENT_MAX_WAVES waves of one
    program per SM (FLUX's 864 tiles on 132 SMs: 6.5); beyond, the tile grid balances unequal tiles
    better. The interpreter keeps it for every shape, so CI covers it."""
    import omni_compile.ops.attention as A

    monkeypatch.setattr(A, "num_persistent_programs", lambda device: 132)
    cuda = torch.device("cuda")
    bound = A.PERSISTENT_MAX_WAVES * 132
    assert A._few_waves(24 * 36, cuda) and A._few_waves(bound, cuda)
    assert not A._few_waves(bound + 1, cuda) and not A._few_waves(24 * 132, cuda)  # 16896 tokens: 24 waves
    assert A._few_waves(10**6, torch.device("cpu"))
