"""The Triton kernels on the GPU at realistic shapes, bf16 and fp16, against the fp32 reference
(skipped without CUDA). Tolerances: bf16/fp16 operands give relative errors of 1e-3..1e-2."""

import pytest
import torch
import torch.nn.functional as F

from omni_compile.ops import Symbols, cache_bias_for, pooled_scores, sparse_attention, sparse_linear_o, sparse_linear_q
from omni_compile.ops.attention import sparse_attention_reference
from omni_compile.ops.pooled import pooled_scores_reference
from omni_compile.ops.symbols import selected_first

from omni_compile.ops._common import tensor_memory_accelerator

pytestmark = pytest.mark.gpu
DT = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["off", "auto", "device"], ids=["pointer-loads", "tma-when-eligible", "device-descriptors"])
def load_path(request):
    with tensor_memory_accelerator(request.param):
        yield request.param


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def rand_symbols(B, H, Sq, Skv, bq, bkv, p_reuse, p_skip, seed):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Sq // bq), -(-Skv // bkv)
    return Symbols.from_dense(
        torch.rand(B, H, nq, generator=g) < p_reuse, torch.rand(B, H, nq, nk, generator=g) < p_skip, bq, bkv, Sq, Skv
    ).cuda()


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize(
    "S, Skv, D, bq, bkv, p_reuse, p_skip",
    [(4608, 4608, 128, 128, 128, 0.0, 0.0), (4608, 4608, 128, 128, 128, 0.3, 0.7), (4685, 4685, 128, 128, 128, 0.2, 0.5),
     (4096, 333, 72, 64, 32, 0.1, 0.3), (1000, 1000, 64, 256, 64, 0.0, 0.9), (777, 777, 96, 16, 256, 0.5, 0.5)],
)
def test_attention_realistic(load_path, dtype, S, Skv, D, bq, bkv, p_reuse, p_skip):
    B, H = 1, 24 if S >= 4096 else 3
    q = torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)  # diffusers' strided layout
    k, v = (torch.randn(B, H, Skv, D, device="cuda", dtype=dtype) for _ in range(2))
    s = rand_symbols(B, H, S, Skv, bq, bkv, p_reuse, p_skip, S + D)
    out, lse = sparse_attention(q, k, v, s, return_lse=True)
    ref, ref_lse = sparse_attention_reference(q, k, v, s.reuse_bits, s.skip_bits, bq, bkv, D**-0.5)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2
    if p_skip == 0.0 and p_reuse == 0.0:
        sd = F.scaled_dot_product_attention(q, k, v)
        assert rel(out, sd) < 1e-2
    inner = sparse_attention(q, k, v, s, heads_inner=True)  # the layout the runtime's sites return
    assert inner.transpose(1, 2).is_contiguous() and torch.equal(inner, out)


@pytest.mark.parametrize("dtype", DT)
def test_attention_nan_in_skipped_blocks_does_not_leak(load_path, dtype):
    B, H, S, D = 1, 8, 2048, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
    s = rand_symbols(B, H, S, S, 128, 128, 0.3, 0.5, 1)
    reuse, skip = s.to_dense()
    skip[..., 5] = True
    s = Symbols.from_dense(reuse.cpu(), skip.cpu(), 128, 128, S, S).cuda()
    clean = sparse_attention(q, k, v, s)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 640:768] = float("nan")
    v2[:, :, 640:768] = float("nan")
    q2 = torch.where(reuse[:, :, torch.arange(S, device="cuda") // 128].unsqueeze(-1), float("nan"), q)
    assert torch.equal(sparse_attention(q2, k2, v2, s), clean)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("M, K, N, D, off, p", [(4608, 3072, 3072, 128, 0, 0.5), (4096, 3072, 3072, 128, 512, 0.75),
                                                (1000, 1152, 1152, 72, 77, 0.3)])
def test_gemms_realistic(load_path, dtype, M, K, N, D, off, p):
    H = N // D
    s = rand_symbols(1, H, M + off, 16, 128, 16, p, 0.0, M)
    x = torch.randn(1, M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    b = torch.randn(N, device="cuda", dtype=dtype)
    y = sparse_linear_q(x, w, b, s, D, row_offset=off)
    reuse, _ = s.to_dense()
    sel = (~reuse[:, :, (torch.arange(M, device="cuda") + off) // 128]).transpose(1, 2).repeat_interleave(D, -1)
    ref = torch.where(sel, F.linear(x.float(), w.float(), b.float()), 0.0)
    # what the runtime's sites run: the reused tiles left unwritten, the computed ones the same values
    assert torch.equal(sparse_linear_q(x, w, b, s, D, row_offset=off, fill_reused=False)[sel], y[sel])
    assert rel(y, ref) < 1e-2 and torch.equal(y[~sel], torch.zeros_like(y[~sel]))
    a = torch.randn(1, M, N, device="cuda", dtype=dtype)
    wo = torch.randn(K, N, device="cuda", dtype=dtype) / N**0.5
    bo = torch.randn(K, device="cuda", dtype=dtype)
    cb = cache_bias_for(a, wo, s, D, row_offset=off)
    assert rel(sparse_linear_o(a, wo, bo, s, D, cb, row_offset=off), F.linear(a.float(), wo.float(), bo.float())) < 1e-2
    assert rel(sparse_linear_o(a, wo, bo, s, D, cb.float(), row_offset=off), F.linear(a.float(), wo.float(), bo.float())) < 1e-2
    # Taylor terms summed in the kernel: cb + 2 * t1 + 2 * t2 (x = 2, order 2)
    t1, t2 = cb * 0.1, cb * -0.05
    want = F.linear(a.float(), wo.float(), bo.float()) + 2 * t1.float() + 2 * t2.float()
    got = sparse_linear_o(a, wo, bo, s, D, [cb, t1, t2], row_offset=off, cache_scales=[1.0, 2.0, 2.0])
    assert rel(got, want) < 1e-2


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("S", [4685, 32656])  # one softmax tile per row (37 key blocks); a walked row (256)
def test_pooled_realistic(dtype, S):
    q, k = (torch.randn(1, 24, S, 128, device="cuda", dtype=dtype) * 2 for _ in range(2))
    p = pooled_scores(q, k, 128, 128)
    # the tf32x3 logits measure ~1e-7 against the fp32 reference; a single tf32 product would not pass
    assert rel(p, pooled_scores_reference(q, k, 128, 128, 128**-0.5)) < 1e-6


@pytest.mark.parametrize("S, Skv, text, mode", [(4608, 4608, 512, 0), (33792, 33792, 512, 0), (16896, 16896, 0, 1),
                                                 (32656, 32656, 1000, 0), (4608, 333, 0, 2)])
def test_flashomni_symbols_realistic(S, Skv, text, mode):
    """The fused policy kernels on pooled scores of FLUX-, HunyuanVideo-size and odd sites (joint with the
    text first, vision-only self, cross onto 333 text tokens): against the fp64 golden on every row off a
    budget boundary (at least 80 % of them: near-equal pooled values put a head's tails on a boundary
    more often than the CPU tests' draws do), and the bits, key lists and contract on all."""
    from omni_compile.ops.flashomni_policy import flashomni_symbols

    from test_ops_flashomni_policy import check_against_golden, text_mask

    def tokens(n):  # per-block offsets: block means differ as a real site's do (white noise pools to ~0,
        nb = -(-n // 128)  # and near-uniform scores put nearly every block on a budget boundary)
        x = torch.randn(1, 24, nb, 128, 128, device="cuda") + torch.randn(1, 24, nb, 1, 128, device="cuda") * 0.5
        return x.reshape(1, 24, nb * 128, 128)[:, :, :n].to(torch.bfloat16)

    scores = pooled_scores(tokens(S), tokens(Skv), 128, 128)
    square = None if mode == 2 else scores
    nq, nk = scores.shape[-2:]
    qt = text_mask(nq, -(-text // 128), "first").cuda()
    kt = qt.clone() if mode != 2 else torch.zeros(nk, dtype=torch.bool, device="cuda")
    out = flashomni_symbols(scores, square, qt, kt, mode, 0.5, 0.05)
    torch.cuda.synchronize()
    out = [t.cpu() for t in out]
    check_against_golden(out, scores.cpu(), None if square is None else square.cpu(), qt.cpu(), kt.cpu(), mode,
                         0.5, 0.05, True, min_certain=0.8)
    assert out[0].any() and (out[1].any() or mode == 2)  # 3 key blocks of text: none within a 0.05 tail


def test_topk_symbols_on_the_gpu_take_the_fused_skip_kernel():
    """TopK's mass mode through the fused skip kernel (no reuse kernel) against its own PyTorch bits on the
    same FLUX-size scores: at most one block in a thousand may differ (a running sum on the budget), and the
    key lists are those of the bits."""
    from omni_compile.config import OmniConfig
    from omni_compile.policies import PolicyInput, TopK, policy_symbols
    from omni_compile.policies.base import symbols_from_call

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 24, 36, 128, 128, device="cuda", generator=g)
    q = (x + torch.randn(1, 24, 36, 1, 128, device="cuda", generator=g) * 0.5).reshape(1, 24, 4608, 128)
    scores = pooled_scores(q.to(torch.bfloat16), q.flip(2).to(torch.bfloat16), 128, 128)
    qt = torch.zeros(36, dtype=torch.bool, device="cuda")
    qt[:4] = True
    inp = PolicyInput(scores=scores, scores_square=scores, kind="joint", q_text=qt, kv_text=qt, batch=1, heads=24,
                      seq_q=4608, seq_kv=4608, block_q=128, block_kv=128, text_q_blocks=4, text_kv_blocks=4)
    got = policy_symbols(TopK(mass=0.8), inp, OmniConfig())
    want = symbols_from_call(TopK(mass=0.8), inp, OmniConfig())
    (r, s), (wr, ws) = got.to_dense(), want.to_dense()
    assert not r.any() and not wr.any() and ws.any()
    assert (s != ws).sum().item() <= 1e-3 * s.numel()
    decoded = Symbols(got.reuse_bits, got.skip_bits, 128, 128, 4608, 4608).kv_schedule()
    assert all(torch.equal(a, b) for a, b in zip(got.kv_schedule(), decoded))


@pytest.mark.parametrize("rows, n, p", [(24 * 254, 254, 0.2), (24 * 36, 36, 0.8), (7, 1, 0.5), (3, 2048, 0.01)])
def test_schedule_compaction_kernel(rows, n, p):
    from omni_compile.ops.symbols import selected_first, selected_first_reference

    mask = torch.rand(rows, n, device="cuda") < p
    mask[0] = True
    mask[-1] = False
    idx, cnt = selected_first(mask)
    want_idx, want_cnt = selected_first_reference(mask)
    assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt)


@pytest.mark.parametrize("B, H, n_q, first, T, p", [(1, 24, 36, 0, 36, 0.5), (1, 24, 36, 4, 32, 0.44),
                                                    (2, 24, 36, 4, 32, 0.3), (1, 24, 256, 2, 254, 0.5),
                                                    (1, 24, 256, 0, 256, 1.0), (1, 3, 5, 1, 3, 0.0)])
def test_slice_schedule_kernels(B, H, n_q, first, T, p):
    """The head and tile lists read straight from the bits, at FLUX's (all rows; the 4096 image rows after
    4 text blocks; CFG's batch of 2) and HunyuanVideo's shapes, against the compaction of the sliced mask."""
    from omni_compile.ops.symbols import pack_bits, selected_first_reference, slice_head_schedule, slice_tile_schedule

    reuse = torch.rand(B, H, n_q, device="cuda") < p
    bits = pack_bits(reuse)
    part = reuse[:, :, first:first + T].transpose(1, 2)
    for select_reused in (False, True):
        got = slice_head_schedule(bits, first, T, select_reused)
        want = selected_first_reference(part if select_reused else ~part)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), select_reused
    tiles, count = slice_tile_schedule(bits, first, T)
    want_t, want_c = selected_first_reference((~part).reshape(1, -1))
    assert torch.equal(tiles, want_t.reshape(-1)) and torch.equal(count, want_c.reshape(1))


@pytest.mark.parametrize("n, top", [(864, 36), (1728, 36), (6120, 255), (1, 0), (16384, 3)])
def test_longest_first_kernel(n, top):
    """Symbols.kv_order's ranking kernel against torch's stable descending sort: FLUX's tiles (one and two
    images), HunyuanVideo's, one tile, the longest list the kernel takes (few distinct counts: long ties)."""
    from omni_compile.ops.symbols import longest_first, longest_first_reference

    counts = torch.randint(0, top + 1, (n,), device="cuda", dtype=torch.int32)
    assert torch.equal(longest_first(counts), longest_first_reference(counts))


def test_cached_launch_equals_tritons_launch(load_path):
    """The ops' launch cache (ops/_launch.py) calls the compiled kernel straight through its launcher: on
    every op, on two shapes, and on an input view 6 bytes off alignment (another Triton specialization,
    pointer loads), the cached path must give bit-for-bit what Triton's own launch gives, and really be
    taken."""
    from omni_compile.ops import _launch

    def run_all(S, odd):
        g = torch.Generator(device="cuda").manual_seed(S)
        B, H, D, C = 1, 4, 128, 512
        base = torch.randn(B, S, C + 3, device="cuda", dtype=torch.bfloat16, generator=g)
        x = base[..., 3:] if odd else base[..., :C]
        wq = torch.randn(C, C, device="cuda", dtype=torch.bfloat16, generator=g) / C ** 0.5
        wo = torch.randn(C, C, device="cuda", dtype=torch.bfloat16, generator=g) / C ** 0.5
        b = torch.randn(C, device="cuda", dtype=torch.bfloat16, generator=g)
        s = rand_symbols(B, H, S, S, 128, 128, 0.4, 0.5, S)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        a = torch.randn(B, S, C, device="cuda", dtype=torch.bfloat16, generator=g)
        terms = [cache_bias_for(a, wo, s, D), cache_bias_for(a, wo, s, D)]
        mask = torch.rand(B, H, S // 7, generator=g, device="cuda") < 0.3
        return [sparse_linear_q(x, wq, b, s, D), sparse_attention(q, k, v, s, heads_inner=True),
                sparse_linear_o(a, wo, b, s, D, terms, cache_scales=[1.0, 3.0]), pooled_scores(q, k, 128, 64),
                *selected_first(mask)]

    for S, odd in ((1000, False), (1536, True)):
        with _launch.launch_cache(False):
            want = run_all(S, odd)
        with _launch.launch_cache(True):
            run_all(S, odd)  # fills the cache through Triton's own launch
            n_cached = sum(1 for v in _launch._CACHE.values() if v)
            got = run_all(S, odd)
        assert n_cached >= 6, "the cached path was not set up (three ops, two pooled kernels, the compaction)"
        for g_, w_ in zip(got, want):
            assert torch.equal(g_, w_)


@pytest.mark.parametrize("dtype", DT)
def test_taylor_ops_realistic(dtype):
    from omni_compile.ops import taylor_refresh, taylor_refresh_reference, taylor_sum, taylor_sum_reference

    x, inp, f0, f1 = (torch.randn(1, 4608, 3072, device="cuda", dtype=dtype) for _ in range(4))
    got = taylor_sum([f0, f1], [1.0, 3.0], inp)
    assert rel(got, taylor_sum_reference([f0, f1], [1.0, 3.0], inp)) < 1e-3
    new = taylor_refresh(x, [f0, f1], 5, sub=inp)
    want = taylor_refresh_reference(x, inp, [f0, f1], 5)
    assert torch.equal(new[0], want[0]) and all(rel(a, b) < 1e-3 for a, b in zip(new[1:], want[1:]))



@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("S", [4608, 4685])
def test_warp_specialized_attention(dtype, S):
    """The warp-specialized attention (device descriptors, 4 consumer warps: the Hopper default), as a tile
    grid and persistent, against the fp32 reference, output and log-sum-exp: a partial last block (4685),
    reuse and skipping mixed in."""
    from omni_compile.ops import attention as A

    B, H, D = 1, 24, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    s = rand_symbols(B, H, S, S, 128, 128, 0.3, 0.6, S)
    idx, cnt = s.kv_schedule()
    ref, ref_lse = sparse_attention_reference(q, k, v, s.reuse_bits, s.skip_bits, 128, 128, D**-0.5)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, DEVICE_TMA=True, WARP_SPEC=True)
    for heads_inner in (False, True):
        outs = {}
        for persistent in (False, True):  # the tile grid and the persistent kernel (longest tiles first)
            out, lse = outs[persistent] = A._launch_attention(
                q, k, v, idx, cnt, 128, 128, D**-0.5, config=dict(cfg, PERSISTENT=persistent),
                heads_inner=heads_inner, kv_order=s.kv_order() if persistent else None)
            assert torch.isfinite(out).all() and rel(out, ref) < 1e-2, (heads_inner, persistent)
            fin = torch.isfinite(ref_lse)
            assert torch.equal(torch.isfinite(lse), fin)
            assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2
        # the same tile steps in the same order per tile: the two kernels agree bit for bit
        assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])
    if A.warp_specialization_available(q.device):
        assert A.attention_config(D, 128, 128, dtype, q.device).get("WARP_SPEC")
        assert A.persistent_attention_applies(q, 128, 128)  # what sparse_attention then runs
