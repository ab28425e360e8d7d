"""GPU benchmark of the sparse ops against the anchors, measured side by side in one run.

``python -m omni_compile.bench --out DIR [--parts attention,gemm,pooled,sweep] [--seqs 4608,16896]``

Every timed kernel is also checked against the fp32 reference on the same inputs, so a fast wrong kernel
shows up as a failed check (the table's ``ok`` column and a non-zero exit code). Writes ``DIR/bench.json``
and ``DIR/bench.md`` and ``DIR/bench.png`` (one figure of panels with the targets drawn in,
:mod:`omni_compile.bench.figures`), and prints the markdown tables last. ``--replot FILE.json [...]`` rebuilds
the tables and the figure from saved ``bench.json`` files on any machine (no GPU).

Timing: ``triton.testing.do_bench`` medians (ms). Attention TFLOP/s counts ``4*B*H*Sq*Skv*D`` times the
fraction of kept work (so a sparse kernel is credited only for what it computes). FlexAttention gets the
identical block mask as *full* blocks (its fastest form, no ``mask_mod``); cuDNN and FlashAttention-2 are
dense SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from omni_compile.ops import Symbols, cache_bias_for, pooled_scores, sparse_attention, sparse_linear_o, sparse_linear_q
from omni_compile.ops.attention import _launch_attention, sparse_attention_reference
from omni_compile.ops.linear_q import sparse_linear_q_reference

B, H, D = 1, 24, 128
BLOCK = 128


def bench_ms(fn, warmup=25, rep=100):
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn):
    """Kernel time without host overhead: replays of a captured CUDA graph (what reduce-overhead gets)."""
    import triton

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception as e:  # capture can fail on some builds; the column then says nan
        print(f"  cudagraph timing failed: {e!r}", file=sys.stderr)
        return float("nan")


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_symbols(S, keep_fraction, reuse_fraction=0.0, seed=0, device="cuda", varied=False):
    """Random block mask keeping ``keep_fraction`` of key blocks per tile (exact count per row, at least 1)
    and reusing ``reuse_fraction`` of (query block, head) tiles. ``varied``: each tile's count is drawn
    uniformly from ``1 .. 2·round(keep·n) - 1`` instead (the same mean), as real policies give unequal
    tiles; equal counts flatter a kernel that splits the tiles statically (the persistent attention)."""
    g = torch.Generator().manual_seed(seed)
    n = -(-S // BLOCK)
    kept = max(1, round(keep_fraction * n))
    order = torch.rand(B, H, n, n, generator=g).argsort(-1)
    if varied:
        counts = torch.randint(1, min(n, 2 * kept - 1) + 1, (B, H, n, 1), generator=g)
        skip = order.argsort(-1) >= counts  # a key block's place in the random order against its tile's count
    else:
        skip = torch.ones(B, H, n, n, dtype=torch.bool)
        skip.scatter_(-1, order[..., :kept], False)
    reuse = torch.zeros(B, H, n, dtype=torch.bool)
    if reuse_fraction > 0:
        r = round(reuse_fraction * n)
        reuse.scatter_(-1, torch.rand(B, H, n, generator=g).argsort(-1)[..., :r], True)
    return Symbols.from_dense(reuse, skip, BLOCK, BLOCK, S, S).to(device)


def flex_runner(q, k, v, sym):
    from torch.nn.attention.flex_attention import BlockMask

    idx, cnt = sym.kv_schedule()
    zeros = torch.zeros_like(cnt)
    bm = BlockMask.from_kv_blocks(zeros, idx, cnt, idx, BLOCK_SIZE=BLOCK, mask_mod=None, seq_lengths=(q.shape[2], k.shape[2]))
    fn = _compiled_flex()
    return lambda: fn(q, k, v, block_mask=bm)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def sdpa_backend_runner(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def part_attention(seqs, densities, reuse_sweep, rows, varied=()):
    for S in seqs:
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        flops_dense = 4 * B * H * S * S * D
        dense = {}
        for be in ("cudnn", "flash"):
            try:
                dense[be] = bench_ms(sdpa_backend_runner(q, k, v, be))
            except Exception as e:  # a backend missing on this build is reported, not fatal
                dense[be] = float("nan")
                print(f"  SDPA {be} unavailable: {e!r}", file=sys.stderr)
        # GPU time of the anchor too: the vs_*_graph ratios compare kernels where a Python call of the
        # wrapper outlasts a sparse kernel (4608 tokens at low density)
        cudnn_graph = graph_ms(sdpa_backend_runner(q, k, v, "cudnn")) if dense["cudnn"] == dense["cudnn"] else float("nan")
        settings = ([(d, 0.0, False) for d in densities] + [(d, r, False) for d, r in reuse_sweep]
                    + [(d, 0.0, True) for d in varied])
        own_dense = None
        for keep, reuse, unequal in settings:
            sym = make_symbols(S, keep, reuse, varied=unequal)
            dens = sym.density()
            out = sparse_attention(q, k, v, sym)
            ref, _ = sparse_attention_reference(q, k, v, sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, D**-0.5)
            err = rel_err(out, ref)
            t = bench_ms(lambda: sparse_attention(q, k, v, sym))
            tg = graph_ms(lambda: sparse_attention(q, k, v, sym))
            flex_ms, flex_graph, flex_err = float("nan"), float("nan"), float("nan")
            if reuse == 0.0:
                try:
                    run = flex_runner(q, k, v, sym)
                    flex_err = rel_err(run(), ref)
                    flex_ms = bench_ms(run)
                    flex_graph = graph_ms(run)
                except Exception as e:
                    print(f"  flex failed at S={S}: {e!r}", file=sys.stderr)
            if keep == 1.0 and reuse == 0.0:
                own_dense = t
            row = dict(
                part="attention", S=S, keep=keep, reuse=reuse, varied=unequal, density=dens, ms=t, graph_ms=tg,
                graph_tflops=flops_dense * dens / tg / 1e9,
                tflops=flops_dense * dens / t / 1e9, err=err, ok=err < 2e-2,
                cudnn_ms=dense["cudnn"], flash_ms=dense["flash"], flex_ms=flex_ms, flex_err=flex_err,
                vs_cudnn=dense["cudnn"] / t, vs_flex=flex_ms / t,
                cudnn_graph_ms=cudnn_graph, flex_graph_ms=flex_graph,
                vs_cudnn_graph=cudnn_graph / tg, vs_flex_graph=flex_graph / tg,
                speedup_vs_own_dense=(own_dense / t) if own_dense else float("nan"),
                cudnn_tflops=flops_dense / dense["cudnn"] / 1e9,
                flex_tflops=flops_dense * dens / flex_ms / 1e9,
            )
            rows.append(row)
            print(f"  attn S={S} keep={keep} reuse={reuse} density={dens:.3f}: {t:.3f} ms "
                  f"{row['tflops']:.0f} TF/s | cuDNN {dense['cudnn']:.3f} | flex {flex_ms:.3f} | err {err:.1e}")
        torch.cuda.empty_cache()


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth as a large device-to-device copy reaches it (GB/s, read + write counted):
    the bandwidth the GEMM floors below divide by, measured in the same run instead of quoted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def gemm_floor_ms(op: str, M: int, K: int, N: int, computed: float, cublas_ms: float, bandwidth_gbs: float,
                  itemsize: int = 2) -> float:
    """The least time a sparse projection can take: its computed fraction at cuBLAS speed, or the bytes it
    must move at ``bandwidth_gbs``, whichever is larger. #6's ideal (``computed x cuBLAS``) counts the
    first alone; at high reuse the second dominates, because work that is skipped still reads or writes:

    * GEMM-Q (``op`` ``"gemm_q"`` filled, ``"gemm_q unfilled"``): all of ``x`` (a row tile with any computed
      head reads its whole row), the weight, and the output's computed tiles (all of it when filled);
    * GEMM-O (``"gemm_o"``, one cache-bias term as in the benchmark): the computed heads' slices of ``a``,
      the weight, the cache bias and the output, both whole (every row with a reused head adds its bias).
    """
    if op == "gemm_o":
        nbytes = (computed * M * K + K * N + 2 * M * N) * itemsize
    elif op in ("gemm_q", "gemm_q unfilled"):
        out = M * N if op == "gemm_q" else computed * M * N
        nbytes = (M * K + K * N + out) * itemsize
    else:
        raise ValueError(f"gemm_floor_ms: unknown op {op!r}")
    return max(computed * cublas_ms, nbytes / bandwidth_gbs / 1e6)


def part_gemm(shapes, reuses, rows):
    bandwidth = copy_bandwidth_gbs()
    print(f"  device copy bandwidth {bandwidth:.0f} GB/s")
    for (M, K, N, label) in shapes:
        g = torch.Generator(device="cuda").manual_seed(M + N)
        x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        wq = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=g)
        a = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16, generator=g)
        wo = torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=g) / N**0.5
        heads = N // D
        lin_q = bench_ms(lambda: F.linear(x, wq, bias))
        lin_o = bench_ms(lambda: F.linear(a, wo, bias))
        n = -(-M // BLOCK)
        for r in reuses:
            gen = torch.Generator().manual_seed(int(r * 100))
            reuse = torch.zeros(1, heads, n, dtype=torch.bool)
            cnt = round(r * n)
            if cnt:
                reuse.scatter_(-1, torch.rand(1, heads, n, generator=gen).argsort(-1)[..., :cnt], True)
            sym = Symbols.from_dense(reuse, torch.zeros(1, heads, n, 1, dtype=torch.bool), BLOCK, BLOCK, M, BLOCK).to("cuda")
            computed = 1.0 - sym.reuse_fraction()
            yq = sparse_linear_q(x, wq, bias, sym, D)
            refq = sparse_linear_q_reference(x, wq, bias, sym.reuse_bits, BLOCK, M, D, 0)
            errq = rel_err(yq, refq) if computed > 0 else float(yq.abs().max())
            tq = bench_ms(lambda: sparse_linear_q(x, wq, bias, sym, D))
            tqg = graph_ms(lambda: sparse_linear_q(x, wq, bias, sym, D))
            # what the runtime's sites run: reused tiles left unwritten; checked on the computed tiles
            computed_cols = sym.row_selection(M, 0, False).repeat_interleave(D, -1)
            yu = sparse_linear_q(x, wq, bias, sym, D, fill_reused=False)
            erru = rel_err(torch.where(computed_cols, yu, torch.zeros_like(yu)), refq) if computed > 0 else 0.0
            tu = bench_ms(lambda: sparse_linear_q(x, wq, bias, sym, D, fill_reused=False))
            tug = graph_ms(lambda: sparse_linear_q(x, wq, bias, sym, D, fill_reused=False))
            cb = cache_bias_for(a, wo, sym, D)
            yo = sparse_linear_o(a, wo, bias, sym, D, cb)
            erro = rel_err(yo, F.linear(a.float(), wo.float(), bias.float()))
            to = bench_ms(lambda: sparse_linear_o(a, wo, bias, sym, D, cb))
            tog = graph_ms(lambda: sparse_linear_o(a, wo, bias, sym, D, cb))
            ideal_o = 1.0 / max(computed, 1e-9)
            for op, t, tg, lin, err in (("gemm_q", tq, tqg, lin_q, errq), ("gemm_q unfilled", tu, tug, lin_q, erru),
                                        ("gemm_o", to, tog, lin_o, erro)):
                is_q = op.startswith("gemm_q")
                Kr, Nr = (K, N) if is_q else (N, K)  # GEMM-O's weight is [K, N]: it maps N inputs to K
                floor = gemm_floor_ms(op, M, Kr, Nr, computed, lin, bandwidth)
                rows.append(dict(
                    part="gemm", op=op, shape=label, M=M, K=Kr, N=Nr,
                    reuse=r, computed=computed, ms=t, graph_ms=tg, cublas_ms=lin, speedup=lin / t,
                    graph_speedup=lin / tg, graph_of_ideal=(lin / tg) / ideal_o,
                    time_over_f_cublas=t / (computed * lin) if computed > 0 else float("nan"),
                    ideal=ideal_o, of_ideal=(lin / t) / ideal_o, err=err, ok=err < 2e-2,
                    tflops=2 * M * K * N * computed / t / 1e9, bandwidth_gbs=bandwidth, floor_ms=floor,
                    graph_of_floor=floor / tg,
                ))
                print(f"  {op} {label} reuse={r}: {t:.3f} ms vs cuBLAS {lin:.3f} ms "
                      f"(x{lin / t:.2f}, ideal x{ideal_o:.2f}) err {err:.1e}")
        torch.cuda.empty_cache()


def part_pooled(seqs, rows):
    for S in seqs:
        q, k = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        t = bench_ms(lambda: pooled_scores(q, k, BLOCK, BLOCK))
        tg = graph_ms(lambda: pooled_scores(q, k, BLOCK, BLOCK))
        dense = bench_ms(sdpa_backend_runner(q, k, q, "cudnn"))
        from omni_compile.ops.pooled import pooled_scores_reference

        err = rel_err(pooled_scores(q, k, BLOCK, BLOCK), pooled_scores_reference(q, k, BLOCK, BLOCK, D**-0.5))
        rows.append(dict(part="pooled", S=S, ms=t, graph_ms=tg, cudnn_ms=dense, fraction=t / dense,
                         graph_fraction=tg / dense, err=err, ok=err < 1e-3))
        print(f"  pooled S={S}: {t:.4f} ms = {100 * t / dense:.2f}% of one dense attention, err {err:.1e}")
        rows.append(symbol_generation_row(q, k, dense))


#: the joint site the symbol-generation row models: FLUX's 512 text tokens first, vision after
TEXT_TOKENS = 512


def symbol_generation_row(q, k, dense_ms):
    """The whole update-step symbol generation of one site as the runtime runs it (runtime.make_symbols and
    the schedule prefetch): pooled scores, the ``flashomni`` policy (joint site, ``TEXT_TOKENS`` text tokens
    first, default thresholds) made into symbols by ``policies.policy_symbols`` (its fused kernels: the
    decision, the bits and the attention's key lists), and the schedules a dispatch step reads decoded
    (walk order, GEMM-Q's tiles, GEMM-O's head lists). Timed from Python, the host's work included, and as
    graph replays (GPU time); beside it the same pipeline through the policy's PyTorch ops (call,
    finalize, pack, decode: the path of any other policy). Checked: the bits equal those the PyTorch path
    makes from the fp32 reference scores (``differing`` counts blocks that differ, where a running sum
    sits on a budget)."""
    from omni_compile.config import OmniConfig
    from omni_compile.ops import kernel_backend
    from omni_compile.ops.pooled import pooled_scores_reference
    from omni_compile.policies import PolicyInput, policy_symbols, run_policy
    from omni_compile.policies.base import block_text_mask

    S = q.shape[2]
    segs = [("text", 0, TEXT_TOKENS), ("vision", TEXT_TOKENS, S)]
    text = block_text_mask(segs, S, BLOCK, q.device)
    n_text = -(-TEXT_TOKENS // BLOCK)
    cfg = OmniConfig()

    def policy_input(scores):
        return PolicyInput(scores=scores, scores_square=scores, kind="joint", q_text=text, kv_text=text, batch=B,
                           heads=H, seq_q=S, seq_kv=S, block_q=BLOCK, block_kv=BLOCK, text_q_blocks=n_text,
                           text_kv_blocks=n_text)

    def unfused(scores):
        reuse, skip = run_policy("flashomni", policy_input(scores), cfg)
        return Symbols.from_dense(reuse, skip, BLOCK, BLOCK, S, S, share_dense=True)

    def decode(sym):
        sym.kv_schedule()
        sym.kv_order()
        sym.tile_schedule(S, 0, BLOCK)
        sym.head_schedule(S, 0, BLOCK, False)
        return sym

    def generate(stages=3, fused=True):
        """The pipeline's first ``stages`` of: pooled scores, symbols, schedules."""
        scores = pooled_scores(q, k, BLOCK, BLOCK)
        if stages == 1:
            return scores
        sym = policy_symbols("flashomni", policy_input(scores), cfg) if fused else unfused(scores)
        return decode(sym) if stages == 3 else sym

    sym = generate()
    ref = unfused(pooled_scores_reference(q, k, BLOCK, BLOCK, D**-0.5))
    (reuse, skip), (ref_reuse, ref_skip) = sym.to_dense(), ref.to_dense()
    differing = int((reuse != ref_reuse).sum() + (skip != ref_skip).sum())
    # every list a dispatch step reads, against the PyTorch formulas decoding the same bits afresh
    fresh = Symbols(sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, S, S)
    with kernel_backend("reference"):
        want = [fresh.kv_schedule(), fresh.tile_schedule(S, 0, BLOCK), fresh.head_schedule(S, 0, BLOCK, False)]
    got = [sym.kv_schedule(), sym.tile_schedule(S, 0, BLOCK), sym.head_schedule(S, 0, BLOCK, False)]
    lists_agree = all(bool(torch.equal(a, b)) for g, w in zip(got, want) for a, b in zip(g, w))
    t = bench_ms(generate)
    # GPU time alone, where the pipeline captures into a CUDA graph (NaN where it cannot, e.g. on a
    # read-back): what a loop whose host runs ahead of the GPU pays
    tg = graph_ms(generate) if q.is_cuda else float("nan")
    t_unfused = bench_ms(lambda: generate(fused=False))
    tg_unfused = graph_ms(lambda: generate(fused=False)) if q.is_cuda else float("nan")
    # where it goes: each stage's share as the difference of the timed prefixes (wall, from Python)
    prefix = [bench_ms(lambda n=n: generate(n)) for n in (1, 2)] + [t]
    stages = dict(zip(("pooled_ms", "symbols_ms", "schedules_ms"),
                      [prefix[0]] + [b - a for a, b in zip(prefix, prefix[1:])]))
    row = dict(part="symbols", S=S, ms=t, graph_ms=tg, unfused_ms=t_unfused, unfused_graph_ms=tg_unfused,
               cudnn_ms=dense_ms, fraction=t / dense_ms, graph_fraction=tg / dense_ms, density=sym.density(),
               **stages, reuse=reuse.float().mean().item(), differing=differing, lists_agree=lists_agree,
               ok=lists_agree and differing <= 1e-3 * (reuse.numel() + skip.numel()))
    print(f"  symbol generation S={S}: {t:.4f} ms = {100 * t / dense_ms:.2f}% of one dense attention "
          f"(graph replay {tg:.4f} ms = {100 * tg / dense_ms:.2f}%; "
          + ", ".join(f"{k[:-3]} {v:.4f}" for k, v in stages.items())
          + f"; PyTorch-ops policy {t_unfused:.4f} ms, graph {tg_unfused:.4f}), density {row['density']:.3f}, "
          f"reuse {row['reuse']:.2f}, {differing} blocks differ from the reference, key lists agree: {lists_agree}")
    return row


def _sweep_row(rows, op, cfg, run, ref, flops, keep=""):
    try:
        err = rel_err(run(), ref)
        t = bench_ms(run)
    except Exception as e:
        t, err = float("nan"), float("nan")
        print(f"  sweep {op} {cfg} failed: {e!r}", file=sys.stderr)
    rows.append(dict(part="sweep", op=op, keep=keep, cfg=str(cfg), ms=t, err=err, tflops=flops / t / 1e9))
    print(f"  sweep {op} {keep} {cfg}: {t:.3f} ms err {err:.1e}")


def part_sweep(rows):
    """Tile configs and load paths (pointer vs TMA descriptors) on realistic symbols; informs the
    defaults in ``ops/``."""
    from omni_compile.ops.linear_o import _launch_linear_o
    from omni_compile.ops.linear_q import _launch_linear_q

    S = 16896
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for keep in (1.0, 0.2):
        sym = make_symbols(S, keep)
        idx, cnt = sym.kv_schedule()
        ref = sparse_attention_reference(q, k, v, sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, D**-0.5)[0]
        for bn, w, st in [(128, 8, 3), (64, 8, 3)]:
            for tma in (False, True):
                cfg = dict(BLOCK_M=128, BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma)
                run = lambda: _launch_attention(q, k, v, idx, cnt, BLOCK, BLOCK, D**-0.5, cfg)[0]
                _sweep_row(rows, "attention", cfg, run, ref, 4 * B * H * S * S * D * sym.density(), keep)
    M, K, N = 4608, 3072, 3072
    x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16)
    w_ = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    dense = Symbols.dense(1, N // D, M, BLOCK, BLOCK, BLOCK, device="cuda")
    ref = F.linear(x.float(), w_.float())
    for bn, w, st in [(128, 8, 3), (256, 8, 3), (256, 8, 4)]:
        for tma in (False, True):
            cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=w, num_stages=st, USE_TMA=tma)
            run = lambda: _launch_linear_q(x, w_, None, dense.reuse_bits, BLOCK, D, 0, cfg)
            _sweep_row(rows, "gemm_q", cfg, run, ref, 2 * M * K * N)
    for r in (0.0, 0.5):
        sym = make_symbols(M, 1.0, reuse_fraction=r)
        sym = Symbols(sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, M, M)
        cb = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        sel = sym.row_selection(M, 0, False).repeat_interleave(D, -1)
        ref = F.linear(torch.where(sel, x, 0).float(), w_.float(), bias.float()) + cb.float()
        idx, cnt = sym.head_schedule(M, 0, 128, False)
        f = 1.0 - sym.reuse_fraction()
        for bn, w, st, regs in [(128, 4, 3, False), (128, 4, 3, True), (128, 8, 3, True), (256, 8, 3, True)]:
            for tma in (False, True):
                cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=w, num_stages=st, USE_TMA=tma,
                           HEADS_IN_REGISTERS=regs)
                run = lambda: _launch_linear_o(x, w_, bias, cb, sym.reuse_bits, idx, cnt, BLOCK, D, 0, 128, False, cfg)
                _sweep_row(rows, f"gemm_o reuse {r}", cfg, run, ref, 2 * M * K * N * f)


def _table(out, rows, part, title, header, align, line):
    """A titled markdown table of the rows of ``part`` (one ``line(row)`` each); nothing when there are none."""
    picked = [r for r in rows if r["part"] == part]
    if picked:
        out += [f"### {title}", "", header, align, *map(line, picked), ""]


def _ok(r) -> str:
    return "yes" if r["ok"] else "NO"


def _attention_line(r) -> str:
    keep = f"{r['keep']:.2f}" + (" (varied)" if r.get("varied") else "")
    return (f"| {r['S']} | {keep} | {r['reuse']:.2f} | {r['density']:.3f} | {r['ms']:.3f} | {r['graph_ms']:.3f} | {r['tflops']:.0f} | "
            f"{r['cudnn_ms']:.3f} | {r['flash_ms']:.3f} | {r['flex_ms']:.3f} | {r['vs_cudnn']:.2f} | {r['vs_flex']:.2f} | "
            f"{r.get('vs_cudnn_graph', float('nan')):.2f} | {r.get('vs_flex_graph', float('nan')):.2f} | "
            f"{r['speedup_vs_own_dense']:.2f} | {r['err']:.1e} | {_ok(r)} |")


def _gemm_line(r) -> str:
    return (f"| {r['op']} | {r['M']}x{r['K']}x{r['N']} | {r['reuse']:.2f} | {r['computed']:.2f} | {r['ms']:.3f} | {r['graph_ms']:.3f} | "
            f"{r['cublas_ms']:.3f} | {r['speedup']:.2f} | {r['ideal']:.2f} | {r['of_ideal']:.2f} | {r['graph_of_ideal']:.2f} | "
            f"{r['time_over_f_cublas']:.2f} | {r.get('floor_ms', float('nan')):.3f} | "
            f"{r.get('graph_of_floor', float('nan')):.2f} | {r['err']:.1e} | {_ok(r)} |")


def _pooled_line(r) -> str:
    return (f"| {r['S']} | {r['ms']:.4f} | {r['graph_ms']:.4f} | {r['cudnn_ms']:.3f} | {100 * r['fraction']:.2f} % | "
            f"{100 * r['graph_fraction']:.2f} % | {r['err']:.1e} |")


def _symbols_line(r) -> str:
    split = " / ".join(f"{r.get(k, float('nan')):.3f}" for k in ("pooled_ms", "symbols_ms", "schedules_ms"))
    return (f"| {r['S']} | {r['ms']:.4f} | {r['graph_ms']:.4f} | {split} | "
            f"{r.get('unfused_ms', float('nan')):.4f} ({r.get('unfused_graph_ms', float('nan')):.4f}) | "
            f"{r['cudnn_ms']:.3f} | {100 * r['fraction']:.2f} % | {100 * r['graph_fraction']:.2f} % | "
            f"{r['density']:.3f} | {r['reuse']:.2f} | {r['differing']} | {_ok(r)} |")


def _sweep_line(r) -> str:
    return f"| {r['op']} | {r.get('keep', '')} | `{r['cfg']}` | {r['ms']:.3f} | {r['tflops']:.0f} | {r.get('err', float('nan')):.1e} |"


#: the report's tables in order: (row part, title, header, alignment, one row's line)
_TABLES = (
    ("attention", "Attention (B=1, H=24, D=128, bf16, 128x128 blocks)",
     "| S | kept key blocks | reuse | density | sparse_attention ms | graph-replay ms | TFLOP/s (kept) | cuDNN SDPA ms | FA2 SDPA ms | FlexAttention ms | vs cuDNN | vs Flex | vs cuDNN (graphs) | vs Flex (graphs) | vs own dense | rel err | ok |",
     "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|", _attention_line),
    ("gemm", "GEMM-Q / GEMM-O (bf16, head_dim 128, 128-row blocks) vs F.linear (cuBLAS)",
     "| op | M x K x N | reuse | computed | ms | graph-replay ms | cuBLAS ms | speedup | ideal | of ideal | of ideal (graph) | t / (f * cuBLAS) | floor ms | of floor (graph) | rel err | ok |",
     "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|", _gemm_line),
    ("pooled", "Symbol-generation input: pooled_scores",
     "| S | ms | graph-replay ms | cuDNN dense attention ms | fraction | fraction (graph) | rel err |",
     "|---:|---:|---:|---:|---:|---:|---:|", _pooled_line),
    ("symbols", "Update-step symbol generation: pooled scores + flashomni policy + bits + schedules",
     "| S | ms | graph-replay ms | pooled / symbols / schedules ms | PyTorch-ops policy ms (graph) | cuDNN dense attention ms | fraction | fraction (graph) | density | reuse | blocks differing from the reference | ok |",
     "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|:-:|", _symbols_line),
    ("sweep", "Tile-config sweep", "| op | keep | config | ms | TFLOP/s | rel err |", "|---|---:|---|---:|---:|---:|",
     _sweep_line),
)


def markdown(rows):
    out = []
    for spec in _TABLES:
        _table(out, rows, *spec)
    return "\n".join(out)


def write_report(out_dir: str, env, rows) -> str:
    """Write ``bench.md`` and ``bench.png`` for ``rows`` under ``out_dir``; returns the markdown."""
    from . import figures

    os.makedirs(out_dir, exist_ok=True)
    md = markdown(rows)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(f"Device: {env}\n\n" + md)
    figures.write(figures.bench_charts(rows), os.path.join(out_dir, "bench.png"))
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--parts", default="attention,gemm,pooled")
    ap.add_argument("--seqs", default="4608,16896",
                    help="sequence lengths; include one off a multiple of 128 (HunyuanVideo's joint 32656, SD3's "
                         "4429): a partial last key block takes other code in the kernels, and a regression there "
                         "shows only at such lengths")
    ap.add_argument("--densities", default="1.0,0.5,0.2,0.1")
    ap.add_argument("--replot", metavar="BENCH_JSON", nargs="+", default=None,
                    help="measure nothing: write bench.md and bench.png under --out from saved bench.json files (parts "
                         "measured in separate calls make one report; a part in a later file replaces that part's rows "
                         "from the earlier ones)")
    args = ap.parse_args(argv)
    if args.replot:
        envs, rows = [], []
        for path in args.replot:
            with open(path) as f:
                saved = json.load(f)
            envs.append(saved.get("env", {}))
            newer = {r["part"] for r in saved["rows"]}
            rows = [r for r in rows if r["part"] not in newer] + saved["rows"]
        write_report(args.out, envs[0] if len(envs) == 1 else envs, rows)
        return 0
    if not torch.cuda.is_available():
        print("omni_compile.bench needs a CUDA GPU (it times Triton kernels against cuDNN/cuBLAS)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    seqs = [int(s) for s in args.seqs.split(",")]
    dens = [float(d) for d in args.densities.split(",")]
    parts = args.parts.split(",")
    rows = []
    t0 = time.time()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    print(f"bench on {env}")
    if "sweep" in parts:
        part_sweep(rows)
    if "attention" in parts:
        part_attention(seqs, dens, [(0.5, 0.5), (0.2, 0.5)], rows, varied=[0.2, 0.1])
    if "gemm" in parts:
        part_gemm([(4608, 3072, 3072, "FLUX q/o"), (33792, 3072, 3072, "HunyuanVideo q/o")], [0.0, 0.5, 0.75, 0.9], rows)
    if "pooled" in parts:
        part_pooled(seqs, rows)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(env=env, seconds=time.time() - t0, rows=rows), f, indent=1)
    print(write_report(args.out, env, rows))
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        print(f"{len(bad)} timed kernels FAILED their correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
