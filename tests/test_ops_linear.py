"""GEMM-Q and GEMM-O: equal F.linear on computed tiles, zeros / cache bias elsewhere, no leaks of
garbage from reused slices, row offsets and tiles that straddle blocks or heads, bad input, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from omni_compile.ops import Symbols, cache_bias_for, sparse_linear_o, sparse_linear_q
from omni_compile.ops.linear_o import sparse_linear_o_op, sparse_linear_o_prechecked
from omni_compile.ops.linear_q import sparse_linear_q_op

from _golden import DEVICE_TMA_IMPLS, EPS, impl_context, max_err, poison_like


@st.composite
def projection_case(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([64, 72, 80, 96, 128]))
    bq = draw(st.sampled_from([16, 32, 64, 128]))
    S = draw(st.integers(1, 150))
    offset = draw(st.sampled_from([0, 0, 5, 16, 77]))
    cin = draw(st.one_of(st.integers(8, 80), st.sampled_from([16, 32, 48, 64])))  # multiples of 8: TMA-eligible
    cout = draw(st.integers(8, 90))
    dtype = draw(st.sampled_from([torch.float16, torch.float32]))
    p_reuse = draw(st.sampled_from([0.0, 0.5, 1.0]))
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return B, H, D, bq, S, offset, cin, cout, dtype, p_reuse, has_bias, seed


def make(case):
    B, H, D, bq, S, offset, cin, cout, dtype, p_reuse, has_bias, seed = case
    g = torch.Generator().manual_seed(seed)
    seq_q = S + offset + 3
    nq = -(-seq_q // bq)
    reuse = torch.rand(B, H, nq, generator=g) < p_reuse
    s = Symbols.from_dense(reuse, torch.zeros(B, H, nq, 1, dtype=torch.bool), bq, 16, seq_q, 16)
    x = torch.randn(B, S, cin, generator=g).to(dtype)
    wq = (torch.randn(H * D, cin, generator=g) / cin**0.5).to(dtype)
    bq_ = torch.randn(H * D, generator=g).to(dtype) if has_bias else None
    a = torch.randn(B, S, H * D, generator=g).to(dtype)
    wo = (torch.randn(cout, H * D, generator=g) / (H * D) ** 0.5).to(dtype)
    bo = torch.randn(cout, generator=g).to(dtype) if has_bias else None
    computed = ~reuse[:, :, (torch.arange(S) + offset) // bq].transpose(1, 2)  # [B, S, H]
    return s, x, wq, bq_, a, wo, bo, computed, D, offset


def linear_tol(x, w, bias, gold):
    """The dtype's own F.linear error (CPU F.linear in that dtype) sets the scale."""
    own = max_err(F.linear(x, w, bias), gold)
    return 4 * own + 2 * EPS[x.dtype] * max(1.0, gold.abs().max().item() if gold.numel() else 1.0)


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
@given(case=projection_case())
def test_gemm_q_equals_linear_on_computed_tiles(impl, case):
    s, x, w, b, _, _, _, computed, D, off = make(case)
    with impl_context(impl):
        y = sparse_linear_q(x, w, b, s, D, row_offset=off)
    gold = F.linear(x.double(), w.double(), None if b is None else b.double())
    mask = computed.repeat_interleave(D, -1)
    gold = torch.where(mask, gold, torch.zeros((), dtype=torch.float64))
    assert y.shape == gold.shape and y.dtype == x.dtype
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))  # reused tiles are exactly zero
    assert max_err(y, gold) <= linear_tol(x, w, b, gold)


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
@given(case=projection_case())
def test_gemm_o_with_cache_bias_reproduces_linear(impl, case):
    s, _, _, _, a, w, b, computed, D, off = make(case)
    with impl_context(impl):
        cb = cache_bias_for(a, w, s, D, row_offset=off)
        y = sparse_linear_o(a, w, b, s, D, cb, row_offset=off)
        y32 = sparse_linear_o(a, w, b, s, D, cb.float(), row_offset=off)
    gold = F.linear(a.double(), w.double(), None if b is None else b.double())
    tol = linear_tol(a, w, b, gold)
    assert max_err(y, gold) <= 2 * tol  # two roundings of partial sums (cache bias, then output)
    assert max_err(y32, gold) <= 2 * tol
    # the cache bias alone is the projection of the reused slices
    sel = (~computed).repeat_interleave(D, -1)
    gold_cb = F.linear(torch.where(sel, a.double(), torch.zeros((), dtype=torch.float64)), w.double())
    assert max_err(cb, gold_cb) <= linear_tol(a, w, None, gold_cb)


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
@given(case=projection_case(), n_terms=st.integers(1, 3), x=st.sampled_from([1.0, 2.0, 3.0, 0.5]))
def test_gemm_o_adds_taylor_terms_with_their_scales(impl, case, n_terms, x):
    """The runtime hands GEMM-O the Taylor terms of the cached projection and their coefficients x^i/i!:
    the kernel must add exactly Σ c_i · term_i (fp64 golden), the first term unscaled."""
    s, _, _, _, a, w, b, computed, D, off = make(case)
    g = torch.Generator().manual_seed(n_terms)
    terms = [torch.randn(a.shape[0], a.shape[1], w.shape[0], generator=g).to(a.dtype) for _ in range(n_terms)]
    scales = [x**i / math.factorial(i) for i in range(n_terms)]
    with impl_context(impl):
        y = sparse_linear_o(a, w, b, s, D, terms, row_offset=off, cache_scales=scales)
    a_computed = torch.where(computed.repeat_interleave(D, -1), a, torch.zeros((), dtype=a.dtype))
    gold_linear = F.linear(a_computed.double(), w.double(), None if b is None else b.double())
    bias = sum(c * t.double() for c, t in zip(scales, terms))
    gold = gold_linear + bias
    ulp = torch.finfo(a.dtype).eps * (gold.abs() + bias.abs() + 1)
    assert (y.double() - gold).abs().le(linear_tol(a_computed, w, b, gold_linear) + 4 * ulp).all()
    # the runtime's entry without the checks computes exactly what the public wrapper does, also with the
    # coefficients read from memory (the captured-graph form)
    with impl_context(impl):
        assert torch.equal(sparse_linear_o_prechecked(a, w, b, s, D, terms, scales, off), y)
        in_memory = torch.tensor(scales + [0.0] * (3 - len(scales)), dtype=torch.float32)
        assert torch.equal(sparse_linear_o_prechecked(a, w, b, s, D, terms, in_memory, off), y)
        no_terms = sparse_linear_o(a, w, b, s, D, None, row_offset=off)
        assert torch.equal(sparse_linear_o_prechecked(a, w, b, s, D, [], [], off), no_terms)


def test_cache_bias_terms_are_checked():
    s, _, _, _, a, w, b, _, D, off = make((1, 2, 64, 16, 40, 5, 24, 30, torch.float32, 0.5, True, 0))
    t = torch.zeros(a.shape[0], a.shape[1], w.shape[0])
    with pytest.raises(ValueError, match="1 to 3 terms"):
        sparse_linear_o(a, w, b, s, D, [t] * 4, row_offset=off)
    with pytest.raises(ValueError, match="1 to 3 terms"):
        sparse_linear_o(a, w, b, s, D, [t, t], row_offset=off, cache_scales=[1.0])
    with pytest.raises(ValueError, match="must be 1"):
        sparse_linear_o(a, w, b, s, D, [t, t], row_offset=off, cache_scales=[2.0, 1.0])
    with pytest.raises(ValueError, match=r"cache_bias\[1\] must have shape"):
        sparse_linear_o(a, w, b, s, D, [t, t[:, :-1]], row_offset=off, cache_scales=[1.0, 1.0])


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
@given(case=projection_case())
def test_garbage_in_reused_slices_never_leaks(impl, case):
    s, x, wq, bq_, a, wo, bo, computed, D, off = make(case)
    reused_rows = (~computed).repeat_interleave(D, -1)  # [B,S,H*D] for a
    x_rows_all_reused = (~computed).all(-1, keepdim=True)  # GEMM-Q: a row with no computed head
    with impl_context(impl):
        y_clean = sparse_linear_o(a, wo, bo, s, D, row_offset=off)
        y_dirty = sparse_linear_o(poison_like(a, reused_rows), wo, bo, s, D, row_offset=off)
        q_clean = sparse_linear_q(x, wq, bq_, s, D, row_offset=off)
        q_dirty = sparse_linear_q(poison_like(x, x_rows_all_reused), wq, bq_, s, D, row_offset=off)
    assert torch.equal(y_clean, y_dirty)
    assert torch.equal(q_clean, q_dirty)


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
def test_all_reused_gives_bias_plus_cache_bias_and_no_compute_gives_zero_q(impl):
    B, H, D, S = 1, 2, 64, 40
    s = Symbols.from_dense(torch.ones(B, H, 3, dtype=torch.bool), torch.zeros(B, H, 3, 1, dtype=torch.bool), 16, 16, S, 16)
    a = torch.randn(B, S, H * D)
    w = torch.randn(24, H * D)
    b = torch.randn(24)
    cb = torch.randn(B, S, 24)
    with impl_context(impl):
        y = sparse_linear_o(a, w, b, s, D, cb)
        q = sparse_linear_q(torch.randn(B, S, 24), torch.randn(H * D, 24), None, s, D)
    assert torch.allclose(y, b + cb, atol=1e-6)
    assert torch.equal(q, torch.zeros_like(q))


def test_bad_input_raises_naming_the_argument():
    s = Symbols.dense(1, 2, 40, 16, 16, 16)
    x = torch.randn(1, 40, 32)
    w = torch.randn(128, 32)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_linear_q(x, w, None, s, 12)
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        sparse_linear_q(x, torch.randn(120, 32), None, s, 64)
    with pytest.raises(ValueError, match="weight must have shape"):
        sparse_linear_q(x, torch.randn(128, 31), None, s, 64)
    with pytest.raises(ValueError, match="row_offset"):
        sparse_linear_q(x, w, None, s, 64, row_offset=1)
    with pytest.raises(ValueError, match="symbols were built for"):
        sparse_linear_q(x, torch.randn(192, 32), None, s, 64)
    with pytest.raises(TypeError, match="bias has dtype"):
        sparse_linear_q(x, w, torch.randn(128).half(), s, 64)
    a = torch.randn(1, 40, 128)
    with pytest.raises(ValueError, match="cache_bias must have shape"):
        sparse_linear_o(a, torch.randn(8, 128), None, s, 64, torch.randn(1, 40, 9))
    with pytest.raises(ValueError, match="weight must have shape"):
        sparse_linear_o(a, torch.randn(8, 64), None, s, 64)


@pytest.mark.parametrize("impl", DEVICE_TMA_IMPLS)
@pytest.mark.parametrize("length", [lambda n: n - 1, lambda n: n + 1, lambda n: 1], ids=["shorter", "longer", "one"])
def test_a_bias_of_the_wrong_length_is_rejected(impl, length):
    """The kernels read weight.shape[0] bias entries: a bias of any other length raises before a launch
    (a shorter one would be read past its end), on every implementation, and again on a repeated call
    (whose checks are kept by its key)."""
    s, x, wq, bq_, a, wo, bo, _, D, off = make((1, 2, 64, 16, 40, 5, 24, 30, torch.float32, 0.5, True, 0))
    with impl_context(impl):
        sparse_linear_q(x, wq, bq_, s, D, row_offset=off)  # the right length, once: keeps the call's checks
        for _ in range(2):
            with pytest.raises(ValueError, match=rf"bias must have shape \[{wq.shape[0]}\]"):
                sparse_linear_q(x, wq, torch.randn(length(wq.shape[0])), s, D, row_offset=off)
            with pytest.raises(ValueError, match=rf"bias must have shape \[{wo.shape[0]}\]"):
                sparse_linear_o(a, wo, torch.randn(length(wo.shape[0])), s, D, row_offset=off)


def test_opcheck():
    s, x, wq, bq_, a, wo, bo, _, D, off = make((1, 2, 64, 16, 40, 5, 24, 30, torch.float32, 0.5, True, 0))
    torch.library.opcheck(sparse_linear_q_op, (x, wq, bq_, s.reuse_bits, s.block_q, s.seq_q, D, off))
    tiles, count = s.tile_schedule(x.shape[1], 0, 16)  # the persistent kernel's schedule (row offset 0)
    with impl_context("triton-device-tma"):
        torch.library.opcheck(sparse_linear_q_op, (x, wq, bq_, s.reuse_bits, s.block_q, s.seq_q, D, 0, tiles, count))
    cb = cache_bias_for(a, wo, s, D, row_offset=off)
    from omni_compile.ops.linear_o import linear_o_config

    bm = linear_o_config(D, s.block_q, a.dtype)["BLOCK_M"]
    idx, cnt = s.head_schedule(a.shape[1], off, bm, False)
    torch.library.opcheck(
        sparse_linear_o_op, (a, wo, bo, cb, s.reuse_bits, idx, cnt, s.block_q, s.seq_q, D, off, bm, False)
    )
    torch.library.opcheck(  # with three Taylor terms
        sparse_linear_o_op,
        (a, wo, bo, cb, s.reuse_bits, idx, cnt, s.block_q, s.seq_q, D, off, bm, False, cb * 0.5, cb * 0.25, 2.0, 2.0),
    )


def test_tma_paths_are_taken_when_forced(monkeypatch):
    import omni_compile.ops.linear_o as LO
    import omni_compile.ops.linear_q as LQ

    made = []
    for mod in (LQ, LO):
        real = mod.make_descriptor
        monkeypatch.setattr(mod, "make_descriptor", lambda t, shape, real=real: made.append(shape) or real(t, shape))
    s, x, wq, bq_, a, wo, bo, computed, D, off = make((1, 2, 64, 64, 90, 0, 32, 40, torch.float16, 0.5, True, 5))
    outs = {}
    for impl in ("triton-tma", "triton"):
        with impl_context(impl):
            outs[impl] = (sparse_linear_q(x, wq, bq_, s, D), sparse_linear_o(a, wo, bo, s, D),
                          cache_bias_for(a, wo, s, D))
    assert len(made) == 6  # x, W for GEMM-Q; a, W for GEMM-O and for the cache bias
    # GEMM-Q takes the same tiles either way (descriptors zero-fill what the pointer loads mask to zero):
    # the same products in the same order, bit for bit
    assert torch.equal(outs["triton-tma"][0], outs["triton"][0])
    # GEMM-O through descriptors takes 256-wide column tiles, 128 with pointers: other matrix products,
    # which under the interpreter go through the host's BLAS, whose order may depend on the shape. Both
    # within the dtype's accumulation error of the fp64 golden
    sel = computed.repeat_interleave(D, -1)
    for i, heads in ((1, sel), (2, ~sel)):
        a_sel = torch.where(heads, a, torch.zeros((), dtype=a.dtype))
        bias = bo if i == 1 else None
        gold = F.linear(a_sel.double(), wo.double(), None if bias is None else bias.double())
        tol = linear_tol(a_sel, wo, bias, gold)
        for impl in ("triton-tma", "triton"):
            assert max_err(outs[impl][i], gold) <= tol, (impl, i)


@pytest.mark.parametrize("impl", ["triton", "triton-tma"])
def test_gemm_o_head_list_in_registers_variant(impl):
    from omni_compile.ops.linear_o import _launch_linear_o, linear_o_config

    s, _, _, _, a, w, b, computed, D, off = make((2, 3, 64, 32, 70, 0, 16, 40, torch.float16, 0.5, True, 9))
    cfg = dict(linear_o_config(D, s.block_q, a.dtype), HEADS_IN_REGISTERS=True)
    idx, cnt = s.head_schedule(a.shape[1], off, cfg["BLOCK_M"], False)
    with impl_context(impl):
        y = _launch_linear_o(a, w, b, None, s.reuse_bits, idx, cnt, s.block_q, D, off, cfg["BLOCK_M"], False, cfg)
        want = sparse_linear_o(a, w, b, s, D, row_offset=off)
    # the variant reduces the heads in another order than the default kernel: equal within the dtype's
    # accumulation error (both against the fp64 golden), not bit for bit
    a_computed = torch.where(computed.repeat_interleave(D, -1), a, torch.zeros((), dtype=a.dtype))
    gold = F.linear(a_computed.double(), w.double(), b.double())
    tol = linear_tol(a_computed, w, b, gold)
    assert max_err(y, gold) <= tol and max_err(want, gold) <= tol
    assert max_err(y, want) <= 2 * tol


def test_persistent_gemm_q_is_taken_when_forced(monkeypatch):
    """In descriptor mode "device" the persistent GEMM-Q runs where its shape conditions hold (one head per
    column tile, row tiles inside query blocks) and gives what the tile-grid kernel gives; elsewhere the
    tile-grid kernel runs."""
    import omni_compile.ops.linear_q as LQ

    ran = []
    real = LQ._launch_linear_q_persistent
    monkeypatch.setattr(LQ, "_launch_linear_q_persistent", lambda *a, **k: ran.append(1) or real(*a, **k))
    for off, persistent in ((32, True), (5, False)):
        s, x, wq, bq_, _, _, _, computed, D, _ = make((2, 3, 64, 32, 150, off, 32, 40, torch.float16, 0.5, True, 3))
        outs = {}
        for impl in ("triton-device-tma", "triton"):
            ran.clear()
            with impl_context(impl):
                outs[impl] = sparse_linear_q(x, wq, bq_, s, D, row_offset=off)
            assert len(ran) == (1 if impl == "triton-device-tma" and persistent else 0)
        got, want = outs["triton-device-tma"], outs["triton"]
        assert (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max().clamp_min(1)
        mask = computed.repeat_interleave(D, -1)
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


def test_gemm_q_call_plans_follow_the_operands_and_the_modes():
    """The GEMM-Q wrapper keeps its checks' outcome and kernel choice per call key: a base off a 16-byte
    boundary, another row offset, a missing bias or another descriptor mode is decided afresh, and every
    call equals the registered op's value on the same operands."""
    import omni_compile.ops.linear_q as LQ

    s, x, wq, bq_, _, _, _, _, D, _ = make((1, 3, 64, 32, 150, 32, 32, 40, torch.float16, 0.5, True, 5))
    buf = torch.empty(x.numel() + 8, dtype=x.dtype)
    shifted = buf[1:1 + x.numel()].view(x.shape).copy_(x)

    def op(xx, bias, off):
        block_m = LQ.persistent_rows(xx, wq, s.block_q, D, off)
        tiles, count = s.tile_schedule(xx.shape[1], off, block_m) if block_m else (None, None)
        return LQ._sparse_linear_q_op_impl(xx, wq, bias, s.reuse_bits, s.block_q, s.seq_q, D, off, tiles, count)

    def block_m_of(*args):  # the kept row-tile height: 0 for the tile grid
        return LQ._CALLS[LQ._call_key(*args)][0]

    LQ._CALLS.clear()
    with impl_context("triton-device-tma"):
        for xx, bias, off in ((x, bq_, 32), (shifted, bq_, 32), (x, None, 32), (x, bq_, 0), (x, bq_, 32)):
            assert torch.equal(sparse_linear_q(xx, wq, bias, s, D, row_offset=off), op(xx, bias, off))
        assert len(LQ._CALLS) == 4 and block_m_of(x, wq, bq_, s, D, 0) == 32
        assert block_m_of(x, wq, None, s, D, 32) == 32
        assert block_m_of(x, wq, bq_, s, D, 32) == 32
        assert block_m_of(shifted, wq, bq_, s, D, 32) == 0  # misaligned: the tile grid
    with impl_context("triton"):
        assert torch.equal(sparse_linear_q(x, wq, bq_, s, D, row_offset=32), op(x, bq_, 32))
        assert block_m_of(x, wq, bq_, s, D, 32) == 0
    with impl_context("reference"):
        sparse_linear_q(x, wq, bq_, s, D, row_offset=32)
        assert LQ._call_key(x, wq, bq_, s, D, 32) not in LQ._CALLS
    assert len(LQ._CALLS) == 5


@pytest.mark.parametrize("impl", ["reference", "triton-device-tma"])
def test_gemm_q_traces_under_torch_compile(impl, monkeypatch):
    """Under torch.compile the wrapper runs on fake tensors (no data pointers): the persistent path's
    choice must not read one, the graph holds the registered op, and the compiled call still takes the
    persistent kernel where the eager one does."""
    import omni_compile.ops.linear_q as LQ

    ran = []
    real = LQ._launch_linear_q_persistent
    monkeypatch.setattr(LQ, "_launch_linear_q_persistent", lambda *a, **k: ran.append(1) or real(*a, **k))
    s, x, wq, bq_, _, _, _, _, D, _ = make((1, 2, 64, 32, 70, 0, 32, 40, torch.float32, 0.5, True, 4))
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with impl_context(impl):
        fn = torch.compile(lambda x: sparse_linear_q(x, wq, bq_, s, D) * 2, backend=backend, fullgraph=True)
        got = fn(x)
        compiled_runs = len(ran)
        want = sparse_linear_q(x, wq, bq_, s, D) * 2
    torch._dynamo.reset()
    assert compiled_runs == len(ran) - compiled_runs == (1 if impl == "triton-device-tma" else 0)
    assert torch.allclose(got, want, atol=1e-5)
    assert any("flashomni.sparse_linear_q" in t for t in targets), targets


def test_gemm_q_can_leave_reused_tiles_unwritten(monkeypatch):
    """``fill_reused=False``: the persistent kernel skips its zero-writing walk (reused tiles keep what the
    memory held: NaN here) and its computed tiles equal the filled call's; the tile grid writes zeros
    either way."""
    import omni_compile.ops.linear_q as LQ

    s, x, wq, bq_, _, _, _, computed, D, _ = make((2, 3, 64, 32, 150, 32, 32, 40, torch.float16, 0.5, True, 6))
    real = LQ._output
    monkeypatch.setattr(LQ, "_output", lambda *a: real(*a).fill_(float("nan")))
    mask = computed.repeat_interleave(D, -1)
    for impl, written in (("triton-device-tma", False), ("triton", True)):
        with impl_context(impl):
            filled = sparse_linear_q(x, wq, bq_, s, D, row_offset=32)
            left = sparse_linear_q(x, wq, bq_, s, D, row_offset=32, fill_reused=False)
        assert torch.equal(left[mask], filled[mask]) and torch.equal(filled[~mask], torch.zeros_like(filled[~mask]))
        assert torch.equal(left[~mask], torch.zeros_like(left[~mask])) if written else torch.isnan(left[~mask]).all()
