"""``flashomni::sparse_attention``: softmax attention that reads sparse symbols.

For every (batch, head, query block) tile the symbols say *reuse* (no work, output zeros: the runtime
fills the cached value) or *compute*; a computed tile visits only its kept key blocks, and the softmax runs
over those keys alone, exactly as if the skipped blocks were masked with -inf. A computed row whose key
blocks are all skipped has no keys: its output is zeros and its log-sum-exp -inf.

Three implementations of one function:

* :func:`sparse_attention_reference` - fp32 PyTorch, the CPU path and the tests' yardstick;
* :func:`_sparse_attention_kernel` - Triton (FlashAttention-2 style online softmax), the CUDA path, and
  under ``TRITON_INTERPRET=1`` also runnable on CPU tensors;
* the registered custom op ``torch.ops.flashomni.sparse_attention`` that dispatches between them, with a
  fake (meta) implementation for torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _common
from ._launch import launch, launch_planned
from ._common import (
    cdiv,
    env_switch,
    plans_apply,
    hopper_with_new_triton,
    inference_only,
    keep,
    make_descriptor,
    op_for_call,
    tma_compatible,
    tma_mode as _tma_mode,
    check_float,
    check_head_dim,
    check_symbols_device,
    ensure_device_allocator,
    next_pow2,
    num_persistent_programs,
    tensors_key,
    triton_interpreting,
    use_triton,
)
from .symbols import Symbols, block_count, longest_first, scale_or_default, unpack_bits

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------
def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reuse_bits: torch.Tensor,
    skip_bits: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in ``compute_dtype``; returns ``(out in q.dtype, lse fp32)``.

    Skipped scores are replaced (``torch.where``), never added to, and values of key blocks a tile does
    not keep are zeroed before the product, so NaN/inf in skipped keys or values cannot leak. What a row
    does with its kept keys follows the kernel (and SDPA): a NaN it reads makes its output and lse NaN.
    Whether a row has keys is read from the symbols, not from the scores, so a NaN score never turns a
    row into a keyless one (zeros).
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    n_q, n_k = block_count(Sq, block_q), block_count(Skv, block_kv)
    reuse = unpack_bits(reuse_bits, n_q)  # [B,H,nQ]
    skip = unpack_bits(skip_bits, n_k)  # [B,H,nQ,nK]
    keep = ~skip & ~reuse.unsqueeze(-1)  # [B,H,nQ,nK]
    qf, kf, vf = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    out = torch.zeros(B, H, Sq, D, dtype=compute_dtype, device=q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    key_block = torch.arange(Skv, device=q.device) // block_kv
    for qb in range(n_q):
        rows = slice(qb * block_q, min(Sq, (qb + 1) * block_q))
        keep_cols = keep[:, :, qb, key_block]  # [B,H,Skv]
        s = torch.einsum("bhqd,bhkd->bhqk", qf[:, :, rows], kf) * scale
        s = torch.where(keep_cols.unsqueeze(2), s, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # keyless rows; NaN stays NaN
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        vm = torch.where(keep_cols.unsqueeze(-1), vf, torch.zeros_like(vf))
        has = keep_cols.any(-1)[:, :, None, None]  # [B,H,1,1]: the tile keeps a key block
        o = torch.einsum("bhqk,bhkd->bhqd", p, vm) / torch.where(has, l, torch.ones_like(l))
        out[:, :, rows] = torch.where(has, o, torch.zeros_like(o))
        lse[:, :, rows] = torch.where(has[..., 0], (m + torch.log(l)).squeeze(-1).float(), float("-inf"))
    return out.to(q.dtype), lse


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attn_tile(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    start_n,
    seq_kv,
    qk_scale,
    stride_ks,
    stride_vs,
    offs_n,
    offs_d,
    b,
    h,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK_KV: tl.constexpr,
    IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA_2D: tl.constexpr = False,
):
    """One (BLOCK_M x BLOCK_N) step of the online softmax. With ``USE_TMA``, ``K``/``V`` are tensor
    descriptors over ``[B, H, S, D]`` (``TMA_2D``: over this (batch, head)'s ``[S, D]``; rows past the end
    arrive as zeros either way); otherwise base pointers of this (batch, head)."""
    cols = start_n + offs_n
    k_mask = offs_d[:, None] < HEAD_DIM
    v_mask = offs_d[None, :] < HEAD_DIM
    if MASK_KV:
        k_mask = k_mask & (cols[None, :] < seq_kv)
        v_mask = v_mask & (cols[:, None] < seq_kv)
    if not USE_TMA:
        k_ptrs = K + cols[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :]
    if TMA_2D:
        kt = tl.trans(K.load([start_n, 0]))
    elif USE_TMA:
        kt = tl.trans(K.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM))
    elif EVEN_D and not MASK_KV:
        kt = tl.load(k_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=k_mask, other=0.0)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if MASK_KV:
        qk = tl.where(cols[None, :] < seq_kv, qk, float("-inf"))
    # m_i starts finite (-1e30), so a fully masked tile gives exp2(-inf) = 0, never NaN. The row max is
    # taken of the raw products and scaled once (qk_scale > 0), so each logit costs one fused multiply-add
    # (qk * scale - m) instead of a multiply and a subtract: the softmax, not the dots, bounds this loop.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA_2D:
        v = V.load([start_n, 0])
    elif USE_TMA:
        v = V.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif EVEN_D and not MASK_KV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _sparse_attention_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KvIdx,
    KvCnt,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    H,
    seq_q,
    seq_kv,
    n_qb,
    n_kb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SYM_BLOCK_Q: tl.constexpr,
    SYM_BLOCK_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
    DEVICE_TMA: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
    LSE_PAD: tl.constexpr = 4,
):
    """Block-sparse attention forward.

    Grid: ``(cdiv(seq_q, BLOCK_M), B * H)``; program ``(m, bh)`` owns query rows
    ``[m*BLOCK_M, (m+1)*BLOCK_M)`` of batch ``bh // H``, head ``bh % H``. ``BLOCK_M`` divides the symbol
    block ``SYM_BLOCK_Q``, so each program lies in exactly one query block ``qb``.

    Layouts: ``Q [B, H, seq_q, HEAD_DIM]``, ``K, V [B, H, seq_kv, HEAD_DIM]`` with any strides but a unit
    last stride; ``Out`` likewise; ``Lse [B, H, seq_q, LSE_PAD]`` fp32 contiguous, element 0 of each row written (natural
    log; see :func:`lse_empty`).
    ``KvIdx [B, H, n_qb, n_kb]`` int32: the kept key blocks of tile ``qb`` first, ascending;
    ``KvCnt [B, H, n_qb]`` int32: how many (0 for reused tiles). ``SYM_BLOCK_KV`` is a multiple of
    ``BLOCK_N``; a kept key block is walked in ``SYM_BLOCK_KV // BLOCK_N`` sub-tiles. Only the last key
    block can be partial (``KV_PARTIAL``); it is the last entry of a list when kept, and only that
    iteration pays for bounds masks. With ``USE_TMA`` (``HEAD_DIM == BLOCK_D``, 16-byte aligned strides),
    ``Q``, ``K``, ``V`` are tensor descriptors over their 4-D views and tiles arrive through the TMA engine.
    With ``DEVICE_TMA`` (``HEAD_DIM == BLOCK_D``, 16-byte aligned strides) ``Q``, ``K``, ``V`` are pointers
    and each program builds 2-D descriptors over its (batch, head)'s ``[S, D]`` in the kernel (the form
    Triton's Hopper warp specialization takes); the kept sub-tiles are then walked in one flat loop, and
    ``WARP_SPEC`` hands that loop to Triton's warp specialization (producer warps issue the TMA loads,
    consumer warps compute).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    tile = pid_bh * n_qb + start_m // SYM_BLOCK_Q
    if DEVICE_TMA:
        _descriptor_tile(
            Q, K, V, Out, Lse, KvIdx, KvCnt, tile, pid_bh, start_m, qk_scale,
            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
            stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv, n_kb,
            HEAD_DIM, SYM_BLOCK_KV, BLOCK_M, BLOCK_N, KV_PARTIAL, IEEE, WARP_SPEC, LSE_PAD,
        )
    else:
        _pointer_tile(
            Q, K, V, Out, Lse, KvIdx, KvCnt, tile, pid_bh, start_m, qk_scale,
            stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
            stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv, n_kb,
            HEAD_DIM, BLOCK_D, SYM_BLOCK_KV, BLOCK_M, BLOCK_N, KV_PARTIAL, IEEE, USE_TMA, LSE_PAD,
        )


@triton.jit
def _pointer_tile(
    Q, K, V, Out, Lse, KvIdx, KvCnt, tile, bh, start_m, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    H, seq_q, seq_kv, n_kb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SYM_BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_PARTIAL: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    LSE_PAD: tl.constexpr,
):
    """Query rows ``[start_m, start_m + BLOCK_M)`` of batch*head ``bh`` (symbol tile ``tile``) through
    pointer loads, or host-built 4-D descriptors (``USE_TMA``): the software-pipelined key loop, the partial
    last key block in a pass of its own so only it pays the bounds masks, masked pointer stores."""
    b = bh // H
    h = bh % H
    cnt = tl.load(KvCnt + tile)
    idx_row = KvIdx + tile.to(tl.int64) * n_kb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    if USE_TMA:
        q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        k_base = K
        v_base = V
    else:
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = cnt
    if KV_PARTIAL:
        last = tl.load(idx_row + tl.maximum(cnt - 1, 0))
        n_full = cnt - ((cnt > 0) & (last == n_kb - 1)).to(tl.int32)
    SUB: tl.constexpr = SYM_BLOCK_KV // BLOCK_N
    for i in range(0, n_full):
        kb = tl.load(idx_row + i)
        for j in tl.static_range(SUB):
            acc, m_i, l_i = _attn_tile(
                acc, m_i, l_i, q, k_base, v_base, kb * SYM_BLOCK_KV + j * BLOCK_N, seq_kv, qk_scale,
                stride_ks, stride_vs, offs_n, offs_d, b, h, HEAD_DIM, EVEN_D, False, IEEE, USE_TMA, BLOCK_N,
            )
    if KV_PARTIAL:
        if n_full < cnt:
            for j in tl.static_range(SUB):
                acc, m_i, l_i = _attn_tile(
                    acc, m_i, l_i, q, k_base, v_base, (n_kb - 1) * SYM_BLOCK_KV + j * BLOCK_N, seq_kv,
                    qk_scale, stride_ks, stride_vs, offs_n, offs_d, b, h, HEAD_DIM, EVEN_D, True, IEEE,
                    USE_TMA, BLOCK_N,
                )

    has = l_i != 0.0  # rows without keys; a NaN row (a NaN read) keeps its NaN in the lse too
    l_safe = tl.where(has, l_i, 1.0)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=q_mask)
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + (bh.to(tl.int64) * seq_q + offs_m) * LSE_PAD, lse, mask=offs_m < seq_q)


@triton.jit
def _store_tile_descriptors(acc, m_i, l_i, Out, Lse, start_m, seq_q, stride_os,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, LSE_PAD: tl.constexpr):
    """Normalise one query tile and store it and its log-sum-exp through in-kernel descriptors over this
    (batch, head)'s ``Out [seq_q, HEAD_DIM]`` and ``Lse [seq_q, LSE_PAD]`` (rows past the end are clipped).

    Descriptors, not masked pointer stores: after a warp-specialized loop a masked pointer store wrote
    wrong rows (Triton 3.6, H200: rel. err 0.6-1.2, the descriptor store exact). A row of ``LSE_PAD``
    fp32 per query is the narrowest tile a descriptor takes (16 bytes)."""
    has = l_i != 0.0  # rows without keys; a NaN row (a NaN read) keeps its NaN in the lse too
    l_safe = tl.where(has, l_i, 1.0)
    od = tl.make_tensor_descriptor(Out, shape=[seq_q, HEAD_DIM], strides=[stride_os, 1], block_shape=[BLOCK_M, HEAD_DIM])
    od.store([start_m, 0], (acc / l_safe[:, None]).to(Out.dtype.element_ty))
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    ld = tl.make_tensor_descriptor(Lse, shape=[seq_q, LSE_PAD], strides=[LSE_PAD, 1], block_shape=[BLOCK_M, LSE_PAD])
    ld.store([start_m, 0], tl.broadcast_to(lse[:, None], [BLOCK_M, LSE_PAD]))


@triton.jit
def _sparse_attention_persistent_kernel(
    Q, K, V, Out, Lse, KvIdx, KvCnt, Order, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    H, seq_q, seq_kv, n_qb, n_kb, n_items,
    HEAD_DIM: tl.constexpr, SYM_BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_PARTIAL: tl.constexpr, IEEE: tl.constexpr, WARP_SPEC: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    LSE_PAD: tl.constexpr = 4,
):
    """Block-sparse attention forward, persistent: the same function as :func:`_sparse_attention_kernel`.

    Grid ``(NUM_PROGRAMS,)`` = ``P``; in round ``r`` program ``p`` takes work item ``Order[r*P + p]`` (even
    ``r``) or ``Order[r*P + P-1-p]`` (odd ``r``), item ``bh * n_qb + m`` being query block ``m`` of batch*head
    ``bh`` (one ``BLOCK_M``-row tile: the symbol block is the tile). ``Order [n_items]`` int32 lists every
    item once, heaviest (most kept key blocks) first (:meth:`Symbols.kv_order`), so the last wave is short
    and reused tiles (count 0) come last; the zig-zag pairs each program's heavy tiles with light ones.
    Layouts as :func:`_sparse_attention_kernel`'s with ``DEVICE_TMA``: per item the program builds 2-D
    descriptors over its (batch, head)'s ``[S, HEAD_DIM]`` (``HEAD_DIM`` a power of two, 16-byte
    aligned strides) and walks the kept sub-tiles in one flat loop, handed to Triton's warp specialization
    with ``WARP_SPEC``; the partial last key block masks its columns past ``seq_kv`` (``KV_PARTIAL``)."""
    pid = tl.program_id(0)
    for r in range(0, tl.cdiv(n_items, NUM_PROGRAMS)):
        # zig-zag: odd rounds hand the list out in reverse, so the program that took a round's heaviest
        # tile takes the next round's lightest (faster than a plain stride on unequal tiles)
        w = r * NUM_PROGRAMS + tl.where(r % 2 == 0, pid, NUM_PROGRAMS - 1 - pid)
        if w < n_items:
            item = tl.load(Order + w)
            _descriptor_tile(
                Q, K, V, Out, Lse, KvIdx, KvCnt, item, item // n_qb, (item % n_qb) * BLOCK_M, qk_scale,
                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv, n_kb,
                HEAD_DIM, SYM_BLOCK_KV, BLOCK_M, BLOCK_N, KV_PARTIAL, IEEE, WARP_SPEC, LSE_PAD,
            )


@triton.jit
def _descriptor_tile(
    Q, K, V, Out, Lse, KvIdx, KvCnt, tile, bh, start_m, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    H, seq_q, seq_kv, n_kb,
    HEAD_DIM: tl.constexpr, SYM_BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_PARTIAL: tl.constexpr, IEEE: tl.constexpr, WARP_SPEC: tl.constexpr, LSE_PAD: tl.constexpr,
):
    """Query rows ``[start_m, start_m + BLOCK_M)`` of batch*head ``bh`` (symbol tile ``tile``) through 2-D
    descriptors built here over this (batch, head)'s ``[S, HEAD_DIM]``: every kept sub-tile in one flat
    (warp-specialized) loop, the descriptor epilogue. The grid kernel's ``DEVICE_TMA`` form runs one per
    program, the persistent kernel one per work item.

    One flat loop over every kept sub-tile, the partial last key block included (each tile then masks the
    columns past the end): the shape Triton's warp specialization pipelines. A separate pass for that block
    after the specialized loop makes lengths off a 128 multiple (HunyuanVideo's 32656 tokens) several
    times slower (docs/design.md, "Attention kernel")."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    SUB: tl.constexpr = SYM_BLOCK_KV // BLOCK_N
    b = bh // H
    h = bh % H
    cnt = tl.load(KvCnt + tile)
    idx_row = KvIdx + tile.to(tl.int64) * n_kb
    qd = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                   shape=[seq_q, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
    kd = tl.make_tensor_descriptor(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh,
                                   shape=[seq_kv, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
    vd = tl.make_tensor_descriptor(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh,
                                   shape=[seq_kv, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
    q = qd.load([start_m, 0])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for it in tl.range(0, cnt * SUB, warp_specialize=WARP_SPEC):
        kb = tl.load(idx_row + it // SUB)
        acc, m_i, l_i = _attn_tile(
            acc, m_i, l_i, q, kd, vd, kb * SYM_BLOCK_KV + (it % SUB) * BLOCK_N, seq_kv, qk_scale,
            stride_ks, stride_vs, offs_n, offs_d, b, h, HEAD_DIM, True, KV_PARTIAL, IEEE, True, BLOCK_N, True,
        )
    _store_tile_descriptors(acc, m_i, l_i, Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
                            Lse + bh.to(tl.int64) * seq_q * LSE_PAD, start_m, seq_q, stride_os,
                            HEAD_DIM, BLOCK_M, LSE_PAD)

_WARP_SPEC = env_switch("OMNI_COMPILE_WARP_SPEC")
_PERSISTENT = env_switch("OMNI_COMPILE_PERSISTENT_ATTENTION")


def persistent_attention_applies(q: torch.Tensor, block_q: int, block_kv: int) -> bool:
    """Whether a call on ``q`` with these symbol blocks runs the persistent kernel, which reads
    :meth:`Symbols.kv_order`: in-kernel descriptors (the Hopper warp-specialized configuration, or the
    descriptor mode ``"device"``: the interpreter too, how CI tests it), a power-of-two head dim, and a
    query block that is one kernel tile, and at most :data:`PERSISTENT_MAX_WAVES` waves of tiles.
    ``OMNI_COMPILE_PERSISTENT_ATTENTION=off`` turns it off (the tile grid then runs; at FLUX's 4608 tokens
    and low key density the grid is slower, docs/design.md, "Attention kernel")."""
    if not _PERSISTENT or not use_triton(q) or _tma_mode() == "off":
        return False
    B, H, Sq, D = q.shape
    if not _few_waves(B * H * block_count(Sq, block_q), q.device):
        return False
    cfg = attention_config(D, block_q, block_kv, q.dtype, q.device)
    wants = cfg.get("DEVICE_TMA", False) or _tma_mode() == "device"
    return bool(wants) and max(16, next_pow2(D)) == D and cfg["BLOCK_M"] == block_q


#: the persistent attention runs where the tiles make at most this many waves of one program per SM: with
#: few waves a static walk of the longest-first list balances unequal tiles better than the grid; with many,
#: the grid's dynamic block scheduling does. The crossing lies near 15-17 waves on the H200 (docs/design.md,
#: "Attention kernel"); 12 keeps the lengths where persistence gains more than 1 %.
PERSISTENT_MAX_WAVES = 12


def _few_waves(tiles: int, device: torch.device) -> bool:
    # the interpreter's 3 programs would make every drawn shape "many waves": there the bound is off
    return device.type != "cuda" or tiles <= PERSISTENT_MAX_WAVES * num_persistent_programs(device)


def warp_specialization_available(device: Optional[torch.device] = None) -> bool:
    """Whether the attention kernel may use Triton's warp specialization here: a Hopper GPU (compute
    capability 9.x) and Triton 3.6 or newer, where it was measured and tested (``OMNI_COMPILE_WARP_SPEC=0``
    turns it off). Elsewhere the kernel keeps its plain software-pipelined loop."""
    return _WARP_SPEC and hopper_with_new_triton("cuda" if device is None else device)


def attention_config(head_dim: int, block_q: int, block_kv: int, dtype: torch.dtype,
                     device: Optional[torch.device] = None) -> dict:
    """Tile shape and launch parameters (chosen by GPU sweeps against the anchors, ``omni_compile.bench``).

    On Hopper, 16-bit inputs with ``head_dim == 128`` and 128-multiple blocks use warp specialization with
    in-kernel descriptors and 4 consumer warps (a third faster dense on the H200, 1.10-1.15x at key density
    0.2, the same output; docs/design.md, "Attention kernel"). Other shapes keep the pointer-load loop: the
    warp-specialized variants with 64-wide key tiles give NaN there."""
    cfg = _pointer_config(block_q, block_kv, dtype)
    if triton_interpreting():
        return cfg
    if (dtype != torch.float32 and head_dim == 128 and cfg["BLOCK_M"] == 128 and cfg["BLOCK_N"] == 128
            and warp_specialization_available(device)):
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, DEVICE_TMA=True, WARP_SPEC=True)
    return cfg


def _pointer_config(block_q: int, block_kv: int, dtype: torch.dtype) -> dict:
    """The plain software-pipelined loop's tiles (H100 sweeps, docs/benchmarks.md)."""
    wide = dtype == torch.float32
    block_m = min(block_q, 64 if wide else 128)
    block_n = min(block_kv, 32 if wide else 128)
    if triton_interpreting():
        return dict(BLOCK_M=block_m, BLOCK_N=block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if wide else 8, num_stages=2 if wide else 3)


LSE_PAD = 4


def lse_empty(B: int, H: int, S: int, device) -> torch.Tensor:
    """The log-sum-exp output ``[B, H, S]`` fp32, every entry ``LSE_PAD`` floats apart (strides ``(H·S·4,
    S·4, 4)``): the warp-specialized kernel stores it through a descriptor, whose narrowest tile row is 16
    bytes. Every path returns this layout, so the op's fake and its implementations agree."""
    return torch.empty(B, H, S, LSE_PAD, dtype=torch.float32, device=device)[..., 0]


def heads_inner_empty(B: int, H: int, S: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[B, H, S, D]`` tensor laid out as ``[B, S, H, D]`` in memory (heads inner): the
    layout a model's ``out.transpose(1, 2).flatten(2)`` reads without a copy."""
    return torch.empty(B, S, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


class _LaunchPlan(NamedTuple):
    """What one attention launch needs besides its tensors, decided once per :func:`_plan_key`."""
    kernel: object
    grid: tuple
    ints: tuple  # the runtime integers after ``qk_scale``: strides and sizes
    kwargs: dict  # constexprs and launch options
    persistent: bool
    descriptor_blocks: Optional[tuple]  # (BLOCK_M, BLOCK_N) of host-side descriptors built per call
    needs_allocator: bool  # in-kernel descriptors on a GPU: their scratch comes from triton's allocator


def _out_strides(B: int, H: int, S: int, D: int, heads_inner: bool) -> tuple:
    """``out``'s strides over (batch, head, row) as :func:`heads_inner_empty` / ``torch.empty`` give them."""
    return (S * H * D, D, H * D) if heads_inner else (H * S * D, S * D, D)


def _attention_launch_plan(q, k, v, block_q, block_kv, heads_inner, persistent, config) -> _LaunchPlan:
    """Kernel, grid, integers and constexprs of a launch on these inputs; ``persistent``: the caller passes
    a walk (or none, which the launch then builds where a config forces ``PERSISTENT``)."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    cfg = dict(config or attention_config(D, block_q, block_kv, q.dtype, q.device))
    use_tma = cfg.pop("USE_TMA", None)
    block_d = max(16, next_pow2(D))
    requested = bool(cfg.pop("DEVICE_TMA", False)) or _tma_mode() == "device"
    warp_spec = bool(cfg.pop("WARP_SPEC", False))
    # in-kernel descriptors: a block spans the whole head (D a power of two) and 16-byte aligned strides
    device_tma = (requested and _tma_mode() != "off" and block_d == D
                  and all(tma_compatible(t) for t in (q, k, v)))
    if device_tma:
        use_tma = False
    else:
        warp_spec = False
        if config is None and requested:
            # inputs the descriptors cannot take or descriptors turned off: the pointer-load loop's own
            # tiles, not the warp-specialized ones
            cfg = _pointer_config(block_q, block_kv, q.dtype)
    if use_tma is None:
        # pointer loads by default: through TMA descriptors this kernel ran 5 % slower (419 vs 443 TFLOP/s
        # dense at 16896 on an H100); the descriptor path stays for tests and sweeps (USE_TMA=True)
        use_tma = _tma_mode() == "on" and block_d == D and all(tma_compatible(t) for t in (q, k, v))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), *_out_strides(B, H, Sq, D, heads_inner))
    n_qb, n_kb = block_count(Sq, block_q), block_count(Skv, block_kv)
    n_items = B * H * n_qb
    # the caller decided (persistent_attention_applies) by passing the walk; PERSISTENT in a config
    # overrides for sweeps and tests. Inputs the descriptors cannot take still get the grid
    persistent = bool(cfg.pop("PERSISTENT", persistent)) and device_tma and cfg["BLOCK_M"] == block_q
    common = dict(HEAD_DIM=D, SYM_BLOCK_KV=block_kv, KV_PARTIAL=Skv % block_kv != 0,
                  IEEE=q.dtype == torch.float32, WARP_SPEC=warp_spec, LSE_PAD=LSE_PAD)
    if persistent:
        programs = cfg.pop("NUM_PROGRAMS", None) or num_persistent_programs(q.device)
        return _LaunchPlan(_sparse_attention_persistent_kernel, (min(programs, n_items),),
                           (*strides, H, Sq, Skv, n_qb, n_kb, n_items), dict(common, NUM_PROGRAMS=programs, **cfg),
                           True, None, not triton_interpreting())
    cfg.pop("NUM_PROGRAMS", None)
    return _LaunchPlan(_sparse_attention_kernel, (cdiv(Sq, cfg["BLOCK_M"]), B * H), (*strides, H, Sq, Skv, n_qb, n_kb),
                       dict(common, BLOCK_D=block_d, SYM_BLOCK_Q=block_q, USE_TMA=use_tma, DEVICE_TMA=device_tma, **cfg),
                       False, (cfg["BLOCK_M"], cfg["BLOCK_N"]) if use_tma else None,
                       device_tma and not triton_interpreting())


#: launch plans by :func:`_plan_key`; a few entries per model (one per site shape and layout)
_PLANS: dict = {}


def _plan_key(q, k, v, block_q, block_kv, heads_inner, persistent) -> tuple:
    """Everything :func:`_attention_launch_plan` reads: the inputs' shapes, strides, dtypes, device and base
    alignment, the blocks, the layout and walk, and the process-wide modes (descriptors, warp
    specialization, persistence). Another call with this key gets the same plan."""
    return (*tensors_key(q, k, v), block_q, block_kv, heads_inner, persistent, _tma_mode(), _WARP_SPEC)


def _launch_attention(q, k, v, kv_indices, kv_counts, block_q, block_kv, scale, config=None, heads_inner=False,
                      kv_order=None, plan_key=None):
    """One launch. Without ``config`` the plan is kept by :func:`_plan_key` (``plan_key`` when the caller
    built it already); a ``config`` (sweeps, tests) or ``OMNI_COMPILE_CALL_PLANS=0`` plans afresh on every
    call and launches through the full key."""
    if scale <= 0:
        # the kernel takes each row's max of the raw products and scales it (max(s*x) = s*max(x) needs s > 0);
        # a negative scale is the positive one on -q, a zero scale is q * 0 at scale 1 (both exact, NaN and
        # inf propagate as in (q.k) * 0). Their plan is keyed on the new q
        q, scale, plan_key = (q * 0, 1.0, None) if scale == 0 else (-q, -scale, None)
    kept = config is None and _common.CALL_PLANS
    if not kept:
        plan = _attention_launch_plan(q, k, v, block_q, block_kv, heads_inner, kv_order is not None, config)
    else:
        if plan_key is None:
            plan_key = _plan_key(q, k, v, block_q, block_kv, heads_inner, kv_order is not None)
        plan = _PLANS.get(plan_key)
        if plan is None:
            plan = keep(_PLANS, plan_key, _attention_launch_plan(q, k, v, block_q, block_kv, heads_inner,
                                                                 kv_order is not None, None))
    B, H, Sq, D = q.shape
    # the kernel writes through out's strides, so either layout costs the same
    out = heads_inner_empty(B, H, Sq, D, q) if heads_inner else torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device)
    lse = lse_empty(B, H, Sq, q.device)
    if plan.needs_allocator:
        ensure_device_allocator()
    if plan.persistent:
        if kv_order is None:
            kv_order = longest_first(kv_counts)
        args = (q, k, v, out, lse, kv_indices, kv_counts, kv_order, scale * _LOG2E, *plan.ints)
    elif plan.descriptor_blocks is not None:
        bm, bn = plan.descriptor_blocks
        args = (make_descriptor(q, [1, 1, bm, D]), make_descriptor(k, [1, 1, bn, D]), make_descriptor(v, [1, 1, bn, D]),
                out, lse, kv_indices, kv_counts, scale * _LOG2E, *plan.ints)
    else:
        args = (q, k, v, out, lse, kv_indices, kv_counts, scale * _LOG2E, *plan.ints)
    if kept and plan.descriptor_blocks is None:
        # the plan key fixes q, k, v and the fresh outputs; the schedules' alignment and dtype complete it
        schedules = tuple((t.dtype, t.data_ptr() % 16 == 0) for t in args[5:8 if plan.persistent else 7])
        launch_planned((plan_key, schedules), plan.kernel, plan.grid, args, plan.kwargs)
    else:
        launch(plan.kernel, plan.grid, *args, **plan.kwargs)
    return out, lse


# ------------------------------------------------------------------------------------------------
# Custom op
# ------------------------------------------------------------------------------------------------
def _sparse_attention_op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reuse_bits: torch.Tensor,
    skip_bits: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    heads_inner: bool = False,
    kv_order: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Registered op. ``kv_indices``/``kv_counts`` are ``Symbols.kv_schedule()`` of the same bits, and
    ``kv_order`` their ``Symbols.kv_order()``, given where :func:`persistent_attention_applies` allows the
    persistent kernel; without it, with inputs whose base is not 16-byte aligned (which a compiled
    caller's wrapper cannot see), or on the reference path the tile grid runs. ``heads_inner``: ``out`` is
    laid out as ``[B, S, H, D]`` in memory (see :func:`heads_inner_empty`)."""
    if use_triton(q):
        return _launch_attention(q, k, v, kv_indices, kv_counts, block_q, block_kv, scale, heads_inner=heads_inner,
                                 kv_order=kv_order)
    out, lse = sparse_attention_reference(q, k, v, reuse_bits, skip_bits, block_q, block_kv, scale)
    if heads_inner:
        out = heads_inner_empty(*out.shape, out).copy_(out)
    return out, lse_empty(*lse.shape, lse.device).copy_(lse)


sparse_attention_op = torch.library.custom_op("flashomni::sparse_attention", _sparse_attention_op_impl, mutates_args=())
inference_only(sparse_attention_op)


@sparse_attention_op.register_fake
def _(q, k, v, reuse_bits, skip_bits, kv_indices, kv_counts, block_q, block_kv, scale, heads_inner=False,
      kv_order=None):
    B, H, Sq, D = q.shape
    out = heads_inner_empty(B, H, Sq, D, q) if heads_inner else q.new_empty(B, H, Sq, D)
    return out, lse_empty(B, H, Sq, q.device)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    symbols: Symbols,
    scale: Optional[float] = None,
    return_lse: bool = False,
    heads_inner: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over ``q [B, H, Sq, D]``, ``k, v [B, H, Skv, D]`` that does only the work ``symbols`` keep.

    Returns ``out [B, H, Sq, D]`` (dtype of ``q``; contiguous, or with ``heads_inner=True`` laid out as
    ``[B, Sq, H, D]`` in memory — what ``out.transpose(1, 2).flatten(2)`` reads without a copy, as the
    runtime's sites do), and with ``return_lse=True`` also the natural-log log-sum-exp ``[B, H, Sq]`` fp32
    (-inf on reused tiles and rows with no kept key; entries 16 bytes apart, see :func:`lse_empty`).
    ``scale`` defaults to ``1/sqrt(D)``.
    """
    key = _call_key(q, k, v, symbols, heads_inner)
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        check_float("q", q, 4)
        check_float("k", k, 4, q.dtype, q.device)
        check_float("v", v, 4, q.dtype, q.device)
        B, H, Sq, D = q.shape
        check_head_dim("q.shape[-1] (head dim)", D)
        if k.shape[:2] != (B, H) or k.shape[-1] != D:
            raise ValueError(f"k must have shape [B={B}, H={H}, Skv, D={D}], got {list(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
        if not isinstance(symbols, Symbols):
            raise TypeError(f"symbols must be a Symbols, got {type(symbols).__name__}")
        symbols.check_for("symbols", B, H, Sq, k.shape[2])
        check_symbols_device(symbols, q.device)
        persistent = persistent_attention_applies(q, symbols.block_q, symbols.block_kv)
        if key is not None and use_triton(q):
            call = keep(_CALLS, key, (persistent, _plan_key(q, k, v, symbols.block_q, symbols.block_kv, heads_inner,
                                                            persistent)))
    if call is not None or not torch.compiler.is_compiling():  # (a kept call runs eagerly)
        symbols._unchanged()
    idx, cnt = symbols.kv_schedule()
    scale = scale_or_default(scale, q.shape[-1])
    if call is not None:
        # eager CUDA (or interpreted) call with checks and plan known for this key: straight to the launch
        persistent, plan_key = call
        out, lse = _launch_attention(q, k, v, idx, cnt, symbols.block_q, symbols.block_kv, scale, heads_inner=heads_inner,
                                     kv_order=symbols.kv_order() if persistent else None, plan_key=plan_key)
    else:
        order = symbols.kv_order() if persistent else None
        out, lse = op_for_call(sparse_attention_op, _sparse_attention_op_impl, q, k, v)(
            q, k, v, symbols.reuse_bits, symbols.skip_bits, idx, cnt, symbols.block_q, symbols.block_kv,
            scale, heads_inner, order,
        )
    return (out, lse) if return_lse else out


#: the public wrapper's checked calls by :func:`_call_key`: ``(persistent walk, launch plan key)``
_CALLS: dict = {}


def _call_key(q, k, v, symbols, heads_inner) -> Optional[tuple]:
    """What the wrapper's checks and its kernel choice read, for plain tensors in eager mode (None while
    torch.compile traces: there the registered op runs, on fake tensors). The checks' outcome and
    :func:`persistent_attention_applies` are functions of this key: shapes, strides, dtypes, devices, base
    alignment, the symbols' shape and device, the layout, and the process-wide modes (kernel backend,
    descriptors, warp specialization, persistence and its wave bound). Measured on the CPU with the launch
    stubbed: 71 µs a call (plus ~10 µs of per-argument launch keying) -> 34 µs, of which ~16 µs
    allocate the two outputs."""
    if type(symbols) is not Symbols or not plans_apply(q, k, v):
        return None
    return (*tensors_key(q, k, v), symbols._shape(), symbols.device, heads_inner, _common._mode, _tma_mode(),
            _WARP_SPEC, _PERSISTENT, PERSISTENT_MAX_WAVES)
