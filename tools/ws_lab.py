"""Experiment (not shipped): why Triton's Hopper warp specialization with 4 warps returns wrong attention
(kernel_lab: 1.33x faster dense, rel err 0.6-0.8). One experimental kernel with switches for each suspect:
the epilogue's pointer store (``OUT_DESC``: store through a descriptor as Triton's tutorial does), the
inner loop's arithmetic (``TUT_MATH``: scale folded into the max, P.V accumulated in place, l updated last),
the data-dependent key-block index (``DENSE_ONLY``: start_n from the loop counter), the output's masked
bookkeeping (``PLAIN_EPI``: no has/where, no lse). ``python tools/ws_lab.py`` on a CUDA machine."""
import itertools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from omni_compile.bench import bench_ms, make_symbols, rel_err
from omni_compile.ops import attention as A
from omni_compile.ops._common import ensure_device_allocator


@triton.jit
def _ws_kernel(Q, K, V, Out, Lse, KvIdx, KvCnt, qk_scale, stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
               H, seq, n_kb, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr,
               OUT_DESC: tl.constexpr, TUT_MATH: tl.constexpr, DENSE_ONLY: tl.constexpr, PLAIN_EPI: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    tile = pid_bh * tl.cdiv(seq, BLOCK_M) + pid_m
    cnt = tl.load(KvCnt + tile)
    idx_row = KvIdx + tile.to(tl.int64) * n_kb
    off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    qd = tl.make_tensor_descriptor(Q + off, shape=[seq, D], strides=[stride_qs, 1], block_shape=[BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K + off, shape=[seq, D], strides=[stride_qs, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V + off, shape=[seq, D], strides=[stride_qs, 1], block_shape=[BLOCK_N, D])
    q = qd.load([start_m, 0])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    n = tl.cdiv(seq, BLOCK_N) if DENSE_ONLY else cnt
    for it in tl.range(0, n, warp_specialize=WS):
        if DENSE_ONLY:
            start_n = it * BLOCK_N
        else:
            start_n = tl.load(idx_row + it) * BLOCK_N
        kt = kd.load([start_n, 0]).T
        qk = tl.dot(q, kt)
        if TUT_MATH:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]
            p = tl.math.exp2(qk)
            alpha = tl.math.exp2(m_i - m_new)
            l_ij = tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = vd.load([start_n, 0])
            acc = tl.dot(p.to(v.dtype), v, acc)
            l_i = l_i * alpha + l_ij
            m_i = m_new
        else:
            qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = vd.load([start_n, 0])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    if PLAIN_EPI:
        out = acc / l_i[:, None]
    else:
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * seq + offs_m, lse, mask=offs_m < seq)
    if OUT_DESC:
        od = tl.make_tensor_descriptor(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, shape=[seq, D],
                                       strides=[stride_os, 1], block_shape=[BLOCK_M, D])
        od.store([start_m, 0], out.to(Out.dtype.element_ty))
    else:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq)


def run(q, k, v, idx, cnt, warps, stages, **sw):
    B, H, S, D = q.shape
    out = A.heads_inner_empty(B, H, S, D, q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    _ws_kernel[(S // 128, B * H)](q, k, v, out, lse, idx, cnt, D ** -0.5 * 1.4426950408889634, q.stride(0), q.stride(1),
                                   q.stride(2), out.stride(0), out.stride(1), out.stride(2), H, S, idx.shape[-1], D=D,
                                   BLOCK_M=128, BLOCK_N=128, num_warps=warps, num_stages=stages, **sw)
    return out


ensure_device_allocator()
B, H, D = 1, 24, 128
for S in (4608, 16896):
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    for keep in (1.0, 0.2):
        sym = make_symbols(S, keep)
        idx, cnt = sym.kv_schedule()
        ref = A._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5)[0]
        base_ms = bench_ms(lambda: A._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5))
        flops = 4 * B * H * S * S * D * sym.density()
        print(f"S={S} keep={keep}: committed {base_ms:.3f} ms ({flops / base_ms / 1e9:.0f} TF/s)", flush=True)
        for od, tm, dense, plain in itertools.product((False, True), (False, True), (False, True), (False, True)):
            if dense and keep != 1.0:
                continue
            for warps, stages in ((4, 2),):
                sw = dict(WS=True, OUT_DESC=od, TUT_MATH=tm, DENSE_ONLY=dense, PLAIN_EPI=plain)
                name = " ".join(k_ for k_, v_ in sw.items() if v_ and k_ != "WS") or "as committed"
                try:
                    o = run(q, k, v, idx, cnt, warps, stages, **sw)
                    err = rel_err(o, ref)
                    ms = bench_ms(lambda: run(q, k, v, idx, cnt, warps, stages, **sw))
                    print(f"  w{warps} s{stages} {name:40s} {ms:.3f} ms ({flops / ms / 1e9:.0f} TF/s) err {err:.1e}", flush=True)
                except Exception as e:
                    print(f"  w{warps} s{stages} {name:40s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
