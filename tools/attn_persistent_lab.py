"""Experiment: the persistent form of the sparse attention kernel against the tile grid.

    python tools/attn_persistent_lab.py [--out DIR] [--seqs ...]      (CUDA machine, repository root)

At 4608 tokens and key density <= 0.2 the tile grid sat on a ~0.1 ms floor (864 programs, each building
its descriptors, loading its query tile and storing its output for a dozen or fewer key tiles), and at
16-34K tokens it was 1.16-1.24x FlexAttention where 1.3x is the target. Session 9 measured here the
variants that led to ops/attention.py's persistent kernel (one program per SM walking the tiles longest
first, 2-D descriptors per tile, the warp-specialized key loop): it, with two programs per SM, and a
4-D-descriptor version built once per program without warp specialization (the one kernel of this file;
with warp specialization it fails Triton's pass); earlier variants (the longest-first order on the grid,
the outer loop specialized) are in docs/e2e/kernels/attn_persistent_lab_s9.json. Each is checked against
the grid (output and log-sum-exp) on the same inputs; 128x128 tiles, equal kept counts per tile
(tools/order_lab.py draws them per tile)."""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from lab_common import timed_row  # tools/, beside this script

LOG2E = 1.4426950408889634
LSE_PAD_INT = 4
LSE_PAD = tl.constexpr(LSE_PAD_INT)


@triton.jit
def _persistent_attention(
    Q, K, V, Out, Lse, Order, KvIdx, KvCnt, qk_scale,
    B, H, seq_q, seq_kv, n_qb, n_kb, n_items,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, KV_PARTIAL: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid ``(NUM_PROGRAMS,)``; program p takes work items ``Order[p], Order[p + NUM_PROGRAMS], ...``, item
    ``bh * n_qb + m`` being query tile m of batch*head bh. Q/K/V/Out ``[B, H, S, HEAD_DIM]`` (unit last
    stride), Lse ``[B*H, seq_q, LSE_PAD]`` fp32; KvIdx/KvCnt as the committed kernel's."""
    pid = tl.program_id(0)
    qd = tl.make_tensor_descriptor(Q, shape=[B, H, seq_q, HEAD_DIM], strides=[stride_qb, stride_qh, stride_qs, 1],
                                   block_shape=[1, 1, BLOCK, HEAD_DIM])
    kd = tl.make_tensor_descriptor(K, shape=[B, H, seq_kv, HEAD_DIM], strides=[stride_kb, stride_kh, stride_ks, 1],
                                   block_shape=[1, 1, BLOCK, HEAD_DIM])
    vd = tl.make_tensor_descriptor(V, shape=[B, H, seq_kv, HEAD_DIM], strides=[stride_vb, stride_vh, stride_vs, 1],
                                   block_shape=[1, 1, BLOCK, HEAD_DIM])
    od = tl.make_tensor_descriptor(Out, shape=[B, H, seq_q, HEAD_DIM], strides=[stride_ob, stride_oh, stride_os, 1],
                                   block_shape=[1, 1, BLOCK, HEAD_DIM])
    ld = tl.make_tensor_descriptor(Lse, shape=[B * H, seq_q, LSE_PAD], strides=[seq_q * LSE_PAD, LSE_PAD, 1],
                                   block_shape=[1, BLOCK, LSE_PAD])
    offs_n = tl.arange(0, BLOCK)
    for w in range(pid, n_items, NUM_PROGRAMS):
        item = tl.load(Order + w)
        bh = item // n_qb
        m = item % n_qb
        b = bh // H
        h = bh % H
        cnt = tl.load(KvCnt + item)
        idx_row = KvIdx + item.to(tl.int64) * n_kb
        q = qd.load([b, h, m * BLOCK, 0]).reshape(BLOCK, HEAD_DIM)
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        for it in range(0, cnt):
            start_n = tl.load(idx_row + it) * BLOCK
            kt = tl.trans(kd.load([b, h, start_n, 0]).reshape(BLOCK, HEAD_DIM))
            if IEEE:
                qk = tl.dot(q, kt, input_precision="ieee") * qk_scale
            else:
                qk = tl.dot(q, kt) * qk_scale
            if KV_PARTIAL:
                qk = tl.where((start_n + offs_n)[None, :] < seq_kv, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = vd.load([b, h, start_n, 0]).reshape(BLOCK, HEAD_DIM)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        od.store([b, h, m * BLOCK, 0], (acc / l_safe[:, None]).to(Out.dtype.element_ty).reshape(1, 1, BLOCK, HEAD_DIM))
        ld.store([bh, m * BLOCK, 0], tl.broadcast_to(lse[:, None], [BLOCK, LSE_PAD]).reshape(1, BLOCK, LSE_PAD))


def persistent_attention_4d(q, k, v, kv_indices, kv_counts, order, block, scale, programs, warps, stages):
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B * H, Sq, LSE_PAD_INT, dtype=torch.float32, device=q.device)
    n_qb, n_kb = kv_counts.shape[-1], kv_indices.shape[-1]
    n_items = B * H * n_qb
    kw = {} if os.environ.get("TRITON_INTERPRET") == "1" else dict(num_warps=warps, num_stages=stages)
    _persistent_attention[(min(programs, n_items),)](
        q, k, v, out, lse, order, kv_indices, kv_counts, scale * LOG2E,
        B, H, Sq, Skv, n_qb, n_kb, n_items,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=D, BLOCK=block, KV_PARTIAL=Skv % block != 0, NUM_PROGRAMS=programs,
        IEEE=q.dtype == torch.float32, **kw)
    return out, lse.view(B, H, Sq, LSE_PAD_INT)[..., 0]


def main():
    from omni_compile.bench import make_symbols
    from omni_compile.ops import attention as A
    from omni_compile.ops._common import ensure_device_allocator
    from omni_compile.ops.symbols import longest_first

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--seqs", default="4608,16896,32656")
    args = ap.parse_args()
    ensure_device_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B, H, D, BLK = 1, 24, 128, 128
    rows = []
    for S in map(int, args.seqs.split(",")):
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for _ in range(3))
        for keep, reuse in ((1.0, 0.0), (0.2, 0.0), (0.1, 0.0), (0.2, 0.5), (0.1, 0.5)):
            sym = make_symbols(S, keep, reuse)
            idx, cnt = sym.kv_schedule()
            order = longest_first(cnt)
            dens = sym.density()
            cfg = A.attention_config(D, BLK, BLK, q.dtype, q.device)
            launch = lambda **extra: A._launch_attention(q, k, v, idx, cnt, BLK, BLK, D ** -0.5, dict(cfg, **extra),
                                                         kv_order=order)
            base, base_lse = launch(PERSISTENT=False)
            fin = torch.isfinite(base_lse)
            variants = {
                "committed default": lambda: launch(PERSISTENT=False),  # the tile grid
                "persistent (shipped)": lambda: launch(PERSISTENT=True),
                "persistent 2/SM": lambda: launch(PERSISTENT=True, NUM_PROGRAMS=2 * sms),
                "persistent 4d no-ws w8 s3": lambda: persistent_attention_4d(q, k, v, idx, cnt, order, BLK, D ** -0.5,
                                                                             sms, 8, 3),
            }
            lse_ok = lambda out: dict(lse_ok=bool(torch.equal(torch.isfinite(out[1]), fin))
                                      and (out[1][fin] - base_lse[fin]).abs().max().item() < 2e-2)
            for name, fn in variants.items():
                timed_row(rows, f"S={S:6d} keep={keep:.1f} reuse={reuse:.1f} d={dens:.3f}", name, fn, base,
                          flops=4 * B * H * S * S * D * dens, check=lse_ok, S=S, keep=keep, reuse=reuse, density=dens)
        del q, k, v
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    json.dump(rows, open(os.path.join(args.out, "attn_persistent_lab.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
