"""Experiment (not shipped; `python tools/attn_pipe.py` on a CUDA machine; log docs/e2e/kernels/attn_qk_pipelining_s6.log): does issuing the next tile's Q.K^T before this tile's softmax overlap them
(FA3's intra-warpgroup pipelining) under Triton's Hopper pipeliner? Dense-only rows, even shapes."""
import os, sys, json
import torch, triton, triton.language as tl
import torch.nn.functional as F
from omni_compile.bench import make_symbols, bench_ms, sdpa_backend_runner, rel_err
from omni_compile.ops import attention as new


@triton.jit
def _pipe_kernel(Q, K, V, Out, KvIdx, KvCnt, qk_scale, H, S, n_kb,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tile = pid_bh * tl.cdiv(S, BLOCK_M) + pid_m
    cnt = tl.load(KvCnt + tile)
    idx_row = KvIdx + tile.to(tl.int64) * n_kb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    base = pid_bh.to(tl.int64) * S * D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kb = tl.load(idx_row)
    kt = tl.load(K + base + (kb * BLOCK_N + offs_n)[None, :] * D + offs_d[:, None])
    qk = tl.dot(q, kt)
    for i in range(0, cnt):
        kb_next = tl.load(idx_row + tl.minimum(i + 1, cnt - 1))
        kt_n = tl.load(K + base + (kb_next * BLOCK_N + offs_n)[None, :] * D + offs_d[:, None])
        qk_next = tl.dot(q, kt_n)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + base + (kb * BLOCK_N + offs_n)[:, None] * D + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        qk = qk_next
        kb = kb_next
    out = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty))


def pipe(q, k, v, idx, cnt, scale, stages, warps):
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    _pipe_kernel[(S // 128, B * H)](q, k, v, out, idx, cnt, scale * 1.4426950408889634, H, S, idx.shape[-1],
                                    D=D, BLOCK_M=128, BLOCK_N=128, num_warps=warps, num_stages=stages)
    return out


B, H, D = 1, 24, 128
rows = []
for S in (4608, 16896):
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cudnn = bench_ms(sdpa_backend_runner(q, k, v, "cudnn"))
    ref = F.scaled_dot_product_attention(q, k, v)
    for keep in (1.0, 0.2):
        sym = make_symbols(S, keep)
        idx, cnt = sym.kv_schedule()
        dens = sym.density()
        flops = 4 * B * H * S * S * D * dens
        cands = [("current", lambda: new._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5)[0])]
        for st in (2, 3):
            for w in (8,):
                cands.append((f"pipe stages={st} warps={w}", lambda st=st, w=w: pipe(q, k, v, idx, cnt, D ** -0.5, st, w)))
        for name, fn in cands:
            try:
                o = fn()
                err = rel_err(o, ref) if keep == 1.0 else rel_err(o, new._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5)[0])
                ms = bench_ms(fn)
            except Exception as e:
                print(f"{name} failed: {e!r}"[:400]); continue
            print(f"S={S:6d} keep={keep:.1f} {name:28s} {ms:7.3f} ms {flops/ms/1e9:5.0f} TF/s x{cudnn/ms:5.2f} cudnn err {err:.1e}", flush=True)
            rows.append(dict(S=S, keep=keep, name=name, ms=ms, err=err))
        print(f"S={S} cudnn {cudnn:.3f} ms", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "out"), "attn_pipe.json"), "w"))
