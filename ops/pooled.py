"""``flashomni::pooled_scores``: the block-level attention estimate policies read on update steps.

Queries and keys are mean-pooled over their blocks (a partial last block is averaged over its real rows),
and for each pooled query block a softmax over key blocks of ``scale * q_mean . k_mean + log(n_k)`` gives
``[B, H, nQ, nK]`` (fp32, rows sum to 1). The ``log(n_k)`` term (``n_k`` = rows in key block ``k``) makes a
partial last key block weigh by its size, as the mass of ``n_k`` keys with equal logits would; with equal
block sizes it cancels.

Cost: one read of q and k (memory-bound pooling) plus an ``nQ x nK x D`` product, small next to one dense
attention at the same length.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, device_capability, inference_only, op_for_call, check_float, check_head_dim, next_pow2, triton_interpreting, use_triton
from ._launch import launch
from .symbols import block_count, check_block_size, scale_or_default


def _block_means(x: torch.Tensor, block: int):
    B, H, S, D = x.shape
    n = block_count(S, block)
    pad = n * block - S
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
    sums = xf.reshape(B, H, n, block, D).sum(3)
    # rows per block, the last one short: made on x's device (writing a Python int into it would be a
    # host-to-device copy on CUDA)
    counts = (S - block * torch.arange(n, device=x.device)).clamp_(max=block).float()
    return sums / counts[:, None], counts


def pooled_scores_reference(q, k, block_q, block_kv, scale):
    qm, _ = _block_means(q, block_q)
    km, kc = _block_means(k, block_kv)
    logits = torch.einsum("bhqd,bhkd->bhqk", qm, km) * scale + torch.log(kc)
    return torch.softmax(logits, dim=-1)


@triton.jit
def _block_rows_mean(X, Out, blk, bh, H, S, n_blocks, stride_xb, stride_xh, stride_xs,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SYM_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Out[bh, blk, :] = the mean of block ``blk``'s rows of X[b, h] (``CHUNK`` rows per load).

    The chunks are summed elementwise into a ``[CHUNK, BLOCK_D]`` accumulator and reduced across rows once
    at the end: a cross-thread reduction per chunk holds the loads back (half the bandwidth on the H200)."""
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    acc2 = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    for r in tl.static_range(0, SYM_BLOCK, CHUNK):
        rows = blk * SYM_BLOCK + r + tl.arange(0, CHUNK)
        acc2 += tl.load(base + rows[:, None].to(tl.int64) * stride_xs + offs_d[None, :],
                        mask=(rows[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
    acc = tl.sum(acc2, 0)
    count = tl.minimum(S - blk * SYM_BLOCK, SYM_BLOCK).to(tl.float32)
    tl.store(Out + (bh.to(tl.int64) * n_blocks + blk) * HEAD_DIM + offs_d, acc / count, mask=offs_d < HEAD_DIM)


@triton.jit
def _block_mean_kernel(
    Q, K, QM, KM, H, seq_q, seq_kv, n_q, n_k,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SYM_BLOCK_Q: tl.constexpr, SYM_BLOCK_KV: tl.constexpr,
    CHUNK_Q: tl.constexpr, CHUNK_KV: tl.constexpr,
):
    """Grid ``(n_q + n_k, B*H)``: programs ``0 .. n_q-1`` pool query blocks, the rest key blocks (one launch
    for both). ``Q [B, H, seq_q, HEAD_DIM]``, ``K [B, H, seq_kv, HEAD_DIM]`` (unit last stride) ->
    ``QM [B*H, n_q, HEAD_DIM]``, ``KM [B*H, n_k, HEAD_DIM]`` fp32 contiguous: the mean of each block's rows."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if blk < n_q:
        _block_rows_mean(Q, QM, blk, bh, H, seq_q, n_q, stride_qb, stride_qh, stride_qs,
                         HEAD_DIM, BLOCK_D, SYM_BLOCK_Q, CHUNK_Q)
    else:
        _block_rows_mean(K, KM, blk - n_q, bh, H, seq_kv, n_k, stride_kb, stride_kh, stride_ks,
                         HEAD_DIM, BLOCK_D, SYM_BLOCK_KV, CHUNK_KV)


@triton.jit
def _tile_logits(qm, km_base, c, n_k, seq_kv, scale, offs_d,
                 HEAD_DIM: tl.constexpr, SYM_BLOCK_KV: tl.constexpr, TILE_K: tl.constexpr, TF32X3: tl.constexpr):
    """Logits ``[TILE_Q, TILE_K]`` of key blocks ``c .. c+TILE_K`` (``-inf`` past ``n_k``) and their indices.
    ``TF32X3``: the fp32 product from three tf32 tensor-core products (hi*hi + hi*lo + lo*hi, within ~1e-7
    relative of the fp32 one) instead of fp32 FMAs."""
    kb = c + tl.arange(0, TILE_K)
    valid = kb < n_k
    km = tl.load(km_base + kb[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    rows = tl.minimum(seq_kv - kb * SYM_BLOCK_KV, SYM_BLOCK_KV).to(tl.float32)
    if TF32X3:
        dot = tl.dot(qm, tl.trans(km), input_precision="tf32x3")
    else:
        dot = tl.dot(qm, tl.trans(km), input_precision="ieee")
    logit = dot * scale + tl.log(tl.where(valid, rows, 1.0))[None, :]
    return tl.where(valid[None, :], logit, float("-inf")), kb, valid


@triton.jit
def _block_softmax_kernel(
    QM, KM, Out, n_q, n_k, seq_kv, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SYM_BLOCK_KV: tl.constexpr,
    TILE_Q: tl.constexpr, TILE_K: tl.constexpr, ONE_TILE: tl.constexpr = False, TF32X3: tl.constexpr = False,
):
    """Grid ``(cdiv(n_q, TILE_Q), B*H)``. ``QM [B*H, n_q, HEAD_DIM]``, ``KM [B*H, n_k, HEAD_DIM]`` fp32 block
    means -> ``Out [B*H, n_q, n_k]`` fp32: softmax over key blocks of ``scale * qm.km + log(block rows)``.
    A program takes ``TILE_Q`` query blocks and walks the key blocks ``TILE_K`` at a time twice (running
    max and sum, then the normalised write); the products are fp32 ``tl.dot`` tiles, so each key block's
    mean is read once per ``TILE_Q`` query blocks, not once per query block. With ``ONE_TILE`` (``n_k <=
    TILE_K``) one tile holds the whole row: its logits are computed once and normalised in registers."""
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = qt * TILE_Q + tl.arange(0, TILE_Q)
    q_ok = rows_q < n_q
    qm = tl.load(QM + (bh.to(tl.int64) * n_q + rows_q[:, None]) * HEAD_DIM + offs_d[None, :],
                 mask=q_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    km_base = KM + bh.to(tl.int64) * n_k * HEAD_DIM
    out_rows = Out + (bh.to(tl.int64) * n_q + rows_q[:, None]) * n_k
    if ONE_TILE:
        logit, kb, valid = _tile_logits(qm, km_base, 0, n_k, seq_kv, scale, offs_d, HEAD_DIM, SYM_BLOCK_KV, TILE_K, TF32X3)
        p = tl.exp(logit - tl.max(logit, 1)[:, None])
        tl.store(out_rows + kb[None, :], p / tl.sum(p, 1)[:, None], mask=q_ok[:, None] & valid[None, :])
    else:
        m = tl.full([TILE_Q], float("-inf"), dtype=tl.float32)
        s = tl.zeros([TILE_Q], dtype=tl.float32)
        for c in range(0, n_k, TILE_K):
            logit, kb, valid = _tile_logits(qm, km_base, c, n_k, seq_kv, scale, offs_d, HEAD_DIM, SYM_BLOCK_KV, TILE_K, TF32X3)
            m_new = tl.maximum(m, tl.max(logit, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), 1)
            m = m_new
        for c in range(0, n_k, TILE_K):
            logit, kb, valid = _tile_logits(qm, km_base, c, n_k, seq_kv, scale, offs_d, HEAD_DIM, SYM_BLOCK_KV, TILE_K, TF32X3)
            tl.store(out_rows + kb[None, :], tl.exp(logit - m[:, None]) / s[:, None], mask=q_ok[:, None] & valid[None, :])


#: block-softmax tiles, warps and products. The logits come from tensor cores (``TF32X3``: three tf32
#: products, ~9e-8 relative error against the fp32 reference, as with fp32 FMAs), about four times faster
#: than fp32 FMAs on the H200 (docs/design.md, "Pooled scores and the update step"). A row is walked 64 key
#: blocks at a time, 32 query blocks a program; where one 64-block tile holds the whole row (FLUX's 36 key
#: blocks), 16 query blocks a program.
_SOFTMAX_TILE_K = 64
_SOFTMAX_WALK = dict(TILE_Q=32, num_warps=4, TF32X3=True)
_SOFTMAX_ONE_TILE = dict(TILE_Q=16, num_warps=4, TF32X3=True)
#: the block mean's warps: 2 warps with 32-row chunks read within 2 % of the best of 1-8 warps and 16-128-row
#: chunks on the H200, at every size
_MEAN_WARPS = 2


def _warps(n: int) -> dict:
    return {} if triton_interpreting() else dict(num_warps=n)


def _softmax_config(n_k: int, device: torch.device) -> dict:
    """The block softmax's tiles and launch options: one tile per row where ``n_k`` fits, tensor-core
    logits where the GPU has tf32 (compute capability 8+; the interpreter computes either in fp32)."""
    cfg = dict(_SOFTMAX_ONE_TILE if n_k <= _SOFTMAX_TILE_K else _SOFTMAX_WALK)
    warps = cfg.pop("num_warps")
    if cfg["TF32X3"] and device.type == "cuda" and not triton_interpreting() and device_capability(device)[0] < 8:
        cfg["TF32X3"] = False
    return dict(cfg, ONE_TILE=n_k <= _SOFTMAX_TILE_K, TILE_K=_SOFTMAX_TILE_K, **_warps(warps))


def _launch_pooled(q, k, block_q, block_kv, scale):
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    n_q, n_k = block_count(Sq, block_q), block_count(Skv, block_kv)
    bd = max(16, next_pow2(D))
    qm = torch.empty(B * H, n_q, D, dtype=torch.float32, device=q.device)
    km = torch.empty(B * H, n_k, D, dtype=torch.float32, device=q.device)
    launch(_block_mean_kernel, (n_q + n_k, B * H),
        q, k, qm, km, H, Sq, Skv, n_q, n_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HEAD_DIM=D, BLOCK_D=bd, SYM_BLOCK_Q=block_q, SYM_BLOCK_KV=block_kv,
        CHUNK_Q=min(block_q, 32), CHUNK_KV=min(block_kv, 32), **_warps(_MEAN_WARPS),
    )
    scores = torch.empty(B, H, n_q, n_k, dtype=torch.float32, device=q.device)
    cfg = _softmax_config(n_k, q.device)
    launch(_block_softmax_kernel, (cdiv(n_q, cfg["TILE_Q"]), B * H),
        qm, km, scores, n_q, n_k, Skv, scale, HEAD_DIM=D, BLOCK_D=bd, SYM_BLOCK_KV=block_kv, **cfg,
    )
    return scores


def _pooled_scores_op_impl(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: float) -> torch.Tensor:
    if use_triton(q):
        return _launch_pooled(q, k, block_q, block_kv, scale)
    return pooled_scores_reference(q, k, block_q, block_kv, scale)


pooled_scores_op = torch.library.custom_op("flashomni::pooled_scores", _pooled_scores_op_impl, mutates_args=())
inference_only(pooled_scores_op)


@pooled_scores_op.register_fake
def _(q, k, block_q, block_kv, scale):
    B, H, Sq, _ = q.shape
    return q.new_empty(B, H, block_count(Sq, block_q), block_count(k.shape[2], block_kv), dtype=torch.float32)


def pooled_scores(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Block-level attention estimate ``[B, H, nQ, nK]`` fp32 from block-mean-pooled ``q`` and ``k``
    (softmax over key blocks; see the module docstring). ``scale`` defaults to ``1/sqrt(D)``."""
    check_float("q", q, 4)
    check_float("k", k, 4, q.dtype, q.device)
    check_head_dim("q.shape[-1] (head dim)", q.shape[-1])
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have shape [B, H, Skv, D] matching q {list(q.shape)}, got {list(k.shape)}")
    check_block_size("block_q", block_q)
    check_block_size("block_kv", block_kv)
    return op_for_call(pooled_scores_op, _pooled_scores_op_impl, q, k)(q, k, block_q, block_kv, scale_or_default(scale, q.shape[-1]))
