"""Experiment (not shipped): pooled_scores' second launch overlapped with the first (programmatic dependent
launch, PDL), and its logits on tensor cores (``tf32x3``) instead of fp32 FMA dots.

    python tools/pooled_pdl_lab.py [--out DIR] [--parts pair,walk]      (Hopper, repository root)

At 4608 tokens the whole op takes ~0.022 ms of GPU time, of which the block means of q and k read 56 MB at
~4.8 TB/s (~0.012 ms): the softmax over FLUX's 36 x 36 block means, a few MFLOP, and the gap between the two
kernels take the rest. With PDL the softmax grid is launched while the means still run (each means program
lets its dependents launch first thing) and waits in ``gdc_wait`` until the means are done and visible.
Rows (``pair``): the shipped op, each launch alone, then the pair with and without PDL and with ieee / tf32x3
logits. ``walk``: the shipped kernels' other configurations (see walk_and_mean_rows). Every row is checked
against the fp32 reference."""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from lab_common import timed_row
from omni_compile.ops import pooled as P
from omni_compile.ops.pooled import pooled_scores_reference
from omni_compile.ops.symbols import block_count

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: the PDL rows fail and are printed as such
    gdc_launch_dependents = gdc_wait = None

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))


@triton.jit
def _means(Q, K, QM, KM, H, seq_q, seq_kv, n_q, n_k, sqb, sqh, sqs, skb, skh, sks,
           HEAD_DIM: tl.constexpr, SYM_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """ops/pooled.py's _block_mean_kernel; with PDL each program lets the dependent grid launch first."""
    if PDL:
        gdc_launch_dependents()
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if blk < n_q:
        P._block_rows_mean(Q, QM, blk, bh, H, seq_q, n_q, sqb, sqh, sqs, HEAD_DIM, HEAD_DIM, SYM_BLOCK, 32)
    else:
        P._block_rows_mean(K, KM, blk - n_q, bh, H, seq_kv, n_k, skb, skh, sks, HEAD_DIM, HEAD_DIM, SYM_BLOCK, 32)


@triton.jit
def _softmax_one_tile(QM, KM, Out, n_q, n_k, seq_kv, scale, HEAD_DIM: tl.constexpr, SYM_BLOCK: tl.constexpr,
                      TILE_Q: tl.constexpr, TILE_K: tl.constexpr, TF32X3: tl.constexpr, PDL: tl.constexpr):
    """ops/pooled.py's ONE_TILE softmax; ``TF32X3`` takes the logits from three tf32 tensor-core products."""
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_q = qt * TILE_Q + tl.arange(0, TILE_Q)
    kb = tl.arange(0, TILE_K)
    q_ok = rows_q < n_q
    valid = kb < n_k
    if PDL:
        gdc_wait()
    qm = tl.load(QM + (bh.to(tl.int64) * n_q + rows_q[:, None]) * HEAD_DIM + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    km = tl.load(KM + (bh.to(tl.int64) * n_k + kb[:, None]) * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
    if TF32X3:
        dot = tl.dot(qm, tl.trans(km), input_precision="tf32x3")
    else:
        dot = tl.dot(qm, tl.trans(km), input_precision="ieee")
    rows = tl.minimum(seq_kv - kb * SYM_BLOCK, SYM_BLOCK).to(tl.float32)
    logit = tl.where(valid[None, :], dot * scale + tl.log(tl.where(valid, rows, 1.0))[None, :], float("-inf"))
    p = tl.exp(logit - tl.max(logit, 1)[:, None])
    tl.store(Out + (bh.to(tl.int64) * n_q + rows_q[:, None]) * n_k + kb[None, :], p / tl.sum(p, 1)[:, None],
             mask=q_ok[:, None] & valid[None, :])


def pair_rows(rows, B, H, D, BLK):
    for S in (4608, 4685, 8192):
        q, k = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        n = block_count(S, BLK)
        ref = pooled_scores_reference(q, k, BLK, BLK, D ** -0.5)
        qm = torch.empty(B * H, n, D, dtype=torch.float32, device="cuda")
        km = torch.empty_like(qm)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
        label = f"S={S:5d}"
        timed_row(rows, label, "shipped op", lambda: P.pooled_scores(q, k, BLK, BLK), ref, S=S)

        def means(pdl):
            _means[(2 * n, B * H)](q, k, qm, km, H, S, S, n, n, *strides, HEAD_DIM=D, SYM_BLOCK=BLK, PDL=pdl, num_warps=2)

        def softmax(tq, tk, tf32x3, pdl, warps, out):
            _softmax_one_tile[(triton.cdiv(n, tq), B * H)](qm, km, out, n, n, S, D ** -0.5, HEAD_DIM=D, SYM_BLOCK=BLK,
                                                             TILE_Q=tq, TILE_K=tk, TF32X3=tf32x3, PDL=pdl,
                                                             num_warps=warps, launch_pdl=pdl)
            return out

        means(False)
        qm_ref = qm.clone()
        timed_row(rows, label, "means alone", lambda: (means(False), qm)[1], qm_ref, S=S)
        tk = max(64, triton.next_power_of_2(n))
        for tq, warps in ((8, 2), (16, 2), (16, 4), (32, 4)):
            for tf32x3 in (False, True):
                out = torch.empty(B, H, n, n, dtype=torch.float32, device="cuda")
                tag = f"q{tq} k{tk} w{warps} {'tf32x3' if tf32x3 else 'ieee'}"
                timed_row(rows, label, f"softmax alone {tag}", lambda: softmax(tq, tk, tf32x3, False, warps, out), ref,
                          S=S, tq=tq, warps=warps, tf32x3=tf32x3)
                for pdl in (False, True):
                    timed_row(rows, label, f"pair {tag}{' pdl' if pdl else ''}",
                              lambda: (means(pdl), softmax(tq, tk, tf32x3, pdl, warps, out))[1], ref,
                              S=S, tq=tq, warps=warps, tf32x3=tf32x3, pdl=pdl)
        del q, k
        torch.cuda.empty_cache()


def walk_and_mean_rows(rows, B, H, D, BLK):
    """The shipped kernels under other configurations: the walking softmax (rows longer than one tile) with
    tf32x3 logits, and the block mean's chunk and warps on both layouts, at lengths whose q and k (56-400
    MB) do not stay in the 50 MB L2 between replays."""
    for S in (4608, 16896, 33792):
        for layout in ("contiguous", "heads-inner"):
            shape = (B, H, S, D) if layout == "contiguous" else (B, S, H, D)
            q, k = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            if layout != "contiguous":
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            n = block_count(S, BLK)
            label = f"S={S:5d} {layout:11s}"
            ref = pooled_scores_reference(q, k, BLK, BLK, D ** -0.5)
            timed_row(rows, label, "shipped op", lambda: P.pooled_scores(q, k, BLK, BLK), ref, S=S, layout=layout)
            qm = torch.empty(B * H, n, D, dtype=torch.float32, device="cuda")
            km = torch.empty_like(qm)
            strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

            def means(chunk, warps):
                P.launch(P._block_mean_kernel, (2 * n, B * H), q, k, qm, km, H, S, S, n, n, *strides, HEAD_DIM=D,
                         BLOCK_D=D, SYM_BLOCK_Q=BLK, SYM_BLOCK_KV=BLK, CHUNK_Q=chunk, CHUNK_KV=chunk, num_warps=warps)
                return qm

            means(32, 2)
            qm_ref = qm.clone()
            for chunk in (16, 32, 64, 128):
                for warps in (1, 2, 4, 8):
                    timed_row(rows, label, f"means chunk {chunk} w{warps}", lambda: means(chunk, warps), qm_ref,
                              S=S, layout=layout, chunk=chunk, warps=warps,
                              note=lambda r: f"{2 * q.numel() * 2 / r['ms'] / 1e9:5.2f} TB/s")
            if layout != "contiguous" or n <= P._SOFTMAX_TILE_K:
                continue
            out = torch.empty(B, H, n, n, dtype=torch.float32, device="cuda")
            for tq in (8, 16, 32):
                for warps in (2, 4, 8):
                    for tf32x3 in (False, True):
                        def softmax():
                            P.launch(P._block_softmax_kernel, (triton.cdiv(n, tq), B * H), qm, km, out, n, n, S,
                                     D ** -0.5, HEAD_DIM=D, BLOCK_D=D, SYM_BLOCK_KV=BLK, TILE_Q=tq, TILE_K=64,
                                     ONE_TILE=False, TF32X3=tf32x3, num_warps=warps)
                            return out
                        timed_row(rows, label, f"walk softmax q{tq} k64 w{warps} {'tf32x3' if tf32x3 else 'ieee'}",
                                  softmax, ref, S=S, tq=tq, warps=warps, tf32x3=tf32x3)
            del q, k, qm, km, out
            torch.cuda.empty_cache()


ap.add_argument("--parts", default="pair,walk")
args = ap.parse_args()
rows = []
if "pair" in args.parts:
    pair_rows(rows, 1, 24, 128, 128)
if "walk" in args.parts:
    walk_and_mean_rows(rows, 1, 24, 128, 128)
os.makedirs(args.out, exist_ok=True)
json.dump(rows, open(os.path.join(args.out, "pooled_pdl_lab.json"), "w"), indent=1)
