"""``flashomni::sparse_linear_o``: the output projection that reduces only over computed heads (GEMM-O).

``y = b + sum_i c_i * cache_bias_i + sum_{h computed} a[:, h] @ W[:, h].T`` for ``a [B, S, H*D]``,
``W [Cout, H*D]`` and up to three cache-bias terms with scales ``c_i`` (``c_0 = 1``).
Because the projection is linear, the reused heads' share of the reduction can be computed once (on an
update step) by :func:`cache_bias_for` and added back as a bias on dispatch steps; a Taylor forecast of the
cached features is linear too, so its terms can be cached as biases the same way — and added with their
Taylor coefficients inside the kernel (no separate pass to sum the forecast).

One Triton kernel serves both: ``select_reused=False`` reduces over computed heads (GEMM-O proper),
``select_reused=True`` over reused heads (the cache bias).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import launch
from ._common import cdiv, inference_only, next_pow2, make_descriptor, op_for_call, tma_compatible, tma_enabled, check_float, grouped_tile, load_reuse_bit, triton_interpreting, use_triton
from .linear_q import check_projection
from .symbols import Symbols, row_head_selection


def sparse_linear_o_reference(a, weight, bias, cache_bias, reuse_bits, block_q, seq_q, head_dim, row_offset, select_reused,
                              cache_bias_1=None, cache_bias_2=None, coef_1=0.0, coef_2=0.0, coefs=None):
    """fp32: zero the unselected head slices of ``a`` (``torch.where``), project, add bias terms.
    ``coefs`` (an fp32 tensor ``[1, c1, c2, ...]``), when given, replaces ``coef_1`` / ``coef_2``."""
    if coefs is not None:
        coef_1, coef_2 = coefs[1], coefs[2]
    sel = row_head_selection(reuse_bits, block_q, seq_q, a.shape[1], row_offset, select_reused)
    sel = sel.repeat_interleave(head_dim, dim=-1)
    af = torch.where(sel, a.float(), torch.zeros((), dtype=torch.float32, device=a.device))
    y = F.linear(af, weight.float(), None if bias is None else bias.float())
    if cache_bias is not None:
        y = y + cache_bias.float()
    for term, coef in ((cache_bias_1, coef_1), (cache_bias_2, coef_2)):
        if term is not None:
            y = y + coef * term.float()
    return y.to(a.dtype)


@triton.jit
def _reduce_head_chunk(acc, a_rows, w_rows, ReuseBits, bh, qb, rows, n_qbytes, head_col, kk,
                       HEAD_DIM: tl.constexpr, STRADDLE: tl.constexpr, SELECT_BIT: tl.constexpr,
                       EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """acc += a[:, head_col + kk] @ w[:, head_col + kk].T for one chunk ``kk`` of one head's slice."""
    col_k = head_col + kk
    if STRADDLE:
        row_sel = load_reuse_bit(ReuseBits, bh, qb, n_qbytes, rows >= 0) == SELECT_BIT
        a = tl.load(a_rows + col_k[None, :], mask=row_sel[:, None] & (kk[None, :] < HEAD_DIM), other=0.0)
    elif EVEN_K:
        a = tl.load(a_rows + col_k[None, :])
    else:
        a = tl.load(a_rows + col_k[None, :], mask=kk[None, :] < HEAD_DIM, other=0.0)
    if EVEN_K:
        wt = tl.load(w_rows + col_k[:, None])
    else:
        wt = tl.load(w_rows + col_k[:, None], mask=kk[:, None] < HEAD_DIM, other=0.0)
    if IEEE:
        return tl.dot(a, wt, acc, input_precision="ieee")
    return tl.dot(a, wt, acc)


@triton.jit
def _sparse_linear_o_kernel(
    A, W, Bias, CacheBias, CacheBias1, CacheBias2, Y, ReuseBits, HeadIdx, HeadCnt,
    S, N, H, n_qbytes, row_offset, coef_1, coef_2, Coefs,
    stride_ab, stride_as, stride_wn, stride_cb, stride_cs, stride_yb, stride_ys,
    HEAD_DIM: tl.constexpr,
    SYM_BLOCK_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_CACHE: tl.constexpr,
    STRADDLE: tl.constexpr,
    SELECT_BIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
    HEADS_IN_REGISTERS: tl.constexpr,
    H_POW2: tl.constexpr,
    COEFS_IN_MEMORY: tl.constexpr = False,
):
    """GEMM-O. Grid: ``(cdiv(S, BLOCK_M) * cdiv(N, BLOCK_N), B)``, tiles grouped by ``GROUP_M`` rows.

    Layouts: ``A [B, S, H*HEAD_DIM]``, ``W [N, H*HEAD_DIM]``, ``CacheBias`` / ``CacheBias1`` / ``CacheBias2``
    ``[B, S, N]`` (any float dtype, one set of strides; the first ``N_CACHE`` are used, scaled by 1,
    ``coef_1``, ``coef_2``),
    ``Y [B, S, N]`` - all with unit last stride; ``Bias [N]``; ``ReuseBits [B, H, n_qbytes]`` uint8.
    ``HeadIdx [B, T, H]`` / ``HeadCnt [B, T]`` int32 (T = cdiv(S, BLOCK_M)): for row tile ``t`` the heads to
    reduce over, ascending, and how many. The reduction walks (head, k-chunk) pairs of that list, so a
    skipped head costs nothing. When a row tile straddles two query blocks (``STRADDLE``), each row also
    masks the heads its own block does not select (bit == ``SELECT_BIT`` selects). With ``USE_TMA`` (only
    when not ``STRADDLE`` and ``HEAD_DIM % BLOCK_K == 0``), ``A`` and ``W`` are tensor descriptors with
    blocks ``[1, BLOCK_M, BLOCK_K]`` and ``[BLOCK_N, BLOCK_K]``. ``COEFS_IN_MEMORY``: ``coef_1`` / ``coef_2`` are
    read from ``Coefs[1]`` / ``Coefs[2]`` (fp32) instead (a captured graph then serves every step).
    """
    if COEFS_IN_MEMORY:
        if N_CACHE > 1:
            coef_1 = tl.load(Coefs + 1)
        if N_CACHE > 2:
            coef_2 = tl.load(Coefs + 2)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    num_pid_m = tl.cdiv(S, BLOCK_M)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m % S
    cols = offs_n % N
    tile = b * num_pid_m + pid_m
    cnt = tl.load(HeadCnt + tile)
    head_list = HeadIdx + tile.to(tl.int64) * H
    CHUNKS: tl.constexpr = (HEAD_DIM + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = HEAD_DIM % BLOCK_K == 0
    if not USE_TMA:
        a_rows = A + b.to(tl.int64) * stride_ab + rows[:, None].to(tl.int64) * stride_as
        w_rows = W + cols[None, :].to(tl.int64) * stride_wn
    qb = (rows + row_offset) // SYM_BLOCK_Q
    out_mask = (offs_m[:, None] < S) & (offs_n[None, :] < N)
    # the accumulator starts from the bias terms (as in the paper's GEMM-O): loaded before the loop they
    # occupy the accumulator's registers instead of a second tile's in the epilogue
    if N_CACHE > 0:
        c_off = b.to(tl.int64) * stride_cb + offs_m[:, None].to(tl.int64) * stride_cs + offs_n[None, :]
        acc = tl.load(CacheBias + c_off, mask=out_mask, other=0.0).to(tl.float32)
        # further Taylor terms join the accumulator before the K loop too: their tiles die right away
        if N_CACHE > 1:
            acc += coef_1 * tl.load(CacheBias1 + c_off, mask=out_mask, other=0.0).to(tl.float32)
        if N_CACHE > 2:
            acc += coef_2 * tl.load(CacheBias2 + c_off, mask=out_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    if HEADS_IN_REGISTERS:
        # the whole head list up front: the loop's load coordinates then depend on registers only,
        # not on a fresh memory load each iteration
        offs_h = tl.arange(0, H_POW2)
        heads = tl.load(head_list + offs_h, mask=offs_h < cnt, other=0)
    for it in range(0, cnt * CHUNKS):
        if HEADS_IN_REGISTERS:
            h = tl.sum(tl.where(offs_h == it // CHUNKS, heads, 0))
        else:
            h = tl.load(head_list + it // CHUNKS)
        k0 = (it % CHUNKS) * BLOCK_K
        if USE_TMA:
            a = A.load([b, pid_m * BLOCK_M, h * HEAD_DIM + k0]).reshape(BLOCK_M, BLOCK_K)
            wt = tl.trans(W.load([pid_n * BLOCK_N, h * HEAD_DIM + k0]))
            if IEEE:
                acc = tl.dot(a, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, wt, acc)
        else:
            acc = _reduce_head_chunk(acc, a_rows, w_rows, ReuseBits, b * H + h, qb, rows, n_qbytes, h * HEAD_DIM,
                                     k0 + offs_k, HEAD_DIM, STRADDLE, SELECT_BIT, EVEN_K, IEEE)
    y_ptrs = Y + b.to(tl.int64) * stride_yb + offs_m[:, None].to(tl.int64) * stride_ys + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)


def linear_o_config(head_dim: int, block_q: int, dtype: torch.dtype, tma: bool = False) -> dict:
    """Tile shape; ``BLOCK_M`` never exceeds ``block_q`` so aligned row tiles never straddle blocks."""
    wide = dtype == torch.float32
    block_k = 64 if head_dim % 64 == 0 and not wide else 32
    # The head list is read into registers before the K loop (HEADS_IN_REGISTERS): with one memory load
    # per iteration the loop ran at 0.213 ms, with the list in registers 0.169 ms, and 0.159 ms with
    # 128x256 tiles through TMA (4608x3072x3072 with bias + cache bias, H100 sweeps in docs/benchmarks.md).
    cfg = dict(BLOCK_M=min(block_q, 64 if wide else 128), BLOCK_N=64 if wide else (256 if tma else 128),
               BLOCK_K=block_k, GROUP_M=8, HEADS_IN_REGISTERS=True)
    if triton_interpreting():
        return cfg
    return dict(cfg, num_warps=8 if tma and not wide else 4, num_stages=3)


def _launch_linear_o(a, weight, bias, cache_bias, reuse_bits, head_indices, head_counts, block_q, head_dim,
                     row_offset, block_m, select_reused, config=None, cache_bias_1=None, cache_bias_2=None,
                     coef_1=0.0, coef_2=0.0, coefs=None):
    B, S, _ = a.shape
    N = weight.shape[0]
    y = torch.empty(B, S, N, dtype=a.dtype, device=a.device)
    straddle = not (row_offset % block_m == 0 and block_q % block_m == 0)
    use_tma = (config or {}).get("USE_TMA")
    if use_tma is None:
        use_tma = tma_enabled() and tma_compatible(a) and tma_compatible(weight)
    block_k = (config or linear_o_config(head_dim, block_q, a.dtype))["BLOCK_K"]
    use_tma = bool(use_tma) and not straddle and head_dim % block_k == 0
    cfg = dict(config or linear_o_config(head_dim, block_q, a.dtype, use_tma))
    cfg.pop("USE_TMA", None)
    if cfg["BLOCK_M"] != block_m:
        raise ValueError(f"head schedule was built for block_m={block_m}, kernel uses {cfg['BLOCK_M']}")
    grid = (cdiv(S, block_m) * cdiv(N, cfg["BLOCK_N"]), B)
    aa, wa = a, weight
    if use_tma:
        aa = make_descriptor(a, [1, block_m, cfg["BLOCK_K"]])
        wa = make_descriptor(weight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    dummy = weight
    launch(_sparse_linear_o_kernel, grid,
        aa, wa, bias if bias is not None else dummy, cache_bias if cache_bias is not None else dummy,
        cache_bias_1 if cache_bias_1 is not None else dummy, cache_bias_2 if cache_bias_2 is not None else dummy, y,
        reuse_bits, head_indices, head_counts,
        S, N, reuse_bits.shape[1], reuse_bits.shape[2], row_offset, float(coef_1), float(coef_2),
        coefs if coefs is not None else dummy,
        a.stride(0), a.stride(1), weight.stride(0),
        cache_bias.stride(0) if cache_bias is not None else 0, cache_bias.stride(1) if cache_bias is not None else 0,
        y.stride(0), y.stride(1),
        HEAD_DIM=head_dim, SYM_BLOCK_Q=block_q, HAS_BIAS=bias is not None,
        N_CACHE=0 if cache_bias is None else 1 + (cache_bias_1 is not None) + (cache_bias_2 is not None),
        STRADDLE=straddle, SELECT_BIT=1 if select_reused else 0, IEEE=a.dtype == torch.float32, USE_TMA=use_tma,
        H_POW2=max(2, next_pow2(reuse_bits.shape[1])), COEFS_IN_MEMORY=coefs is not None, **cfg,
    )
    return y


def _sparse_linear_o_op_impl(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    cache_bias: Optional[torch.Tensor],
    reuse_bits: torch.Tensor,
    head_indices: torch.Tensor,
    head_counts: torch.Tensor,
    block_q: int,
    seq_q: int,
    head_dim: int,
    row_offset: int,
    block_m: int,
    select_reused: bool,
    cache_bias_1: Optional[torch.Tensor] = None,
    cache_bias_2: Optional[torch.Tensor] = None,
    coef_1: float = 0.0,
    coef_2: float = 0.0,
    coefs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Registered op; ``head_indices``/``head_counts`` are ``Symbols.head_schedule(S, row_offset,
    block_m, select_reused)`` of the same bits; the bias is ``cache_bias + coef_1 * cache_bias_1 +
    coef_2 * cache_bias_2`` (terms present in that order, all with the strides of ``cache_bias``), with
    ``coefs[1]`` / ``coefs[2]`` (fp32, read on the device) for ``coef_1`` / ``coef_2`` when given."""
    if use_triton(a):
        return _launch_linear_o(a, weight, bias, cache_bias, reuse_bits, head_indices, head_counts, block_q,
                                head_dim, row_offset, block_m, select_reused, cache_bias_1=cache_bias_1,
                                cache_bias_2=cache_bias_2, coef_1=coef_1, coef_2=coef_2, coefs=coefs)
    return sparse_linear_o_reference(a, weight, bias, cache_bias, reuse_bits, block_q, seq_q, head_dim, row_offset,
                                     select_reused, cache_bias_1, cache_bias_2, coef_1, coef_2, coefs)


sparse_linear_o_op = torch.library.custom_op("flashomni::sparse_linear_o", _sparse_linear_o_op_impl, mutates_args=())
inference_only(sparse_linear_o_op)


@sparse_linear_o_op.register_fake
def _(a, weight, bias, cache_bias, reuse_bits, head_indices, head_counts, block_q, seq_q, head_dim, row_offset,
      block_m, select_reused, cache_bias_1=None, cache_bias_2=None, coef_1=0.0, coef_2=0.0, coefs=None):
    return a.new_empty(a.shape[0], a.shape[1], weight.shape[0])


def _cache_terms(cache_bias, cache_scales, a, weight):
    """``(terms, coefficients)`` of a cache bias given as one tensor or a sequence of up to three terms,
    checked, all with the strides of the first (made contiguous otherwise). The first scale must be 1."""
    if cache_bias is None:
        return [], []
    terms = [cache_bias] if isinstance(cache_bias, torch.Tensor) else list(cache_bias)
    scales = [1.0] * len(terms) if cache_scales is None else [float(c) for c in cache_scales]
    if not 1 <= len(terms) <= 3 or len(scales) != len(terms):
        raise ValueError(f"cache_bias takes 1 to 3 terms with as many cache_scales; got {len(terms)} terms and "
                         f"{len(scales)} scales")
    if scales[0] != 1.0:
        raise ValueError(f"the first cache-bias term is added as is: cache_scales[0] must be 1, got {scales[0]}")
    want = [a.shape[0], a.shape[1], weight.shape[0]]
    for i, t in enumerate(terms):
        name = "cache_bias" if isinstance(cache_bias, torch.Tensor) else f"cache_bias[{i}]"
        check_float(name, t, 3, device=a.device)
        if list(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if any(t.stride() != terms[0].stride() or t.stride(-1) != 1 for t in terms):
        terms = [t.contiguous() for t in terms]
    return terms, scales


def _call(a, weight, bias, cache_bias, symbols, head_dim, row_offset, select_reused, cache_scales=None):
    check_projection("a", a, weight, bias, symbols, head_dim, row_offset, weight_in_dim=True)
    terms, scales = _cache_terms(cache_bias, cache_scales, a, weight)
    return _run(a, weight, bias, terms, scales, symbols, head_dim, row_offset, select_reused)


def sparse_linear_o_prechecked(a, weight, bias, symbols, head_dim, terms, scales, row_offset=0):
    """:func:`sparse_linear_o` without its argument checks, for a caller that built every argument itself
    (the runtime's dispatch steps: the checks and the cache terms' validation cost ~28 µs of host time a
    call at FLUX size, a quarter of the launch). ``terms``: a list of 0–3 tensors of shape ``[B, S, Cout]``
    with one set of strides (as :func:`cache_bias_for` returns them), ``scales`` their coefficients
    (``scales[0] == 1``), or an fp32 device tensor ``[1, c1, c2]`` the kernel reads them from (a captured
    CUDA graph then serves every step). Wrong arguments here give wrong results or a kernel fault, not an
    error."""
    return _run(a, weight, bias, terms, scales, symbols, head_dim, row_offset, False)


def cache_bias_prechecked(a, weight, symbols, head_dim, row_offset=0):
    """:func:`cache_bias_for` without its argument checks, for a caller that built every argument itself
    (the runtime's update steps, once per Taylor order and GEMM-O projection, as
    :func:`sparse_linear_o_prechecked` on dispatch steps). Wrong arguments give wrong results or a kernel
    fault, not an error."""
    return _run(a, weight, None, [], [], symbols, head_dim, row_offset, True)


def _run(a, weight, bias, terms, scales, symbols, head_dim, row_offset, select_reused):
    extra = terms[1:] + [None] * (3 - len(terms))
    in_memory = isinstance(scales, torch.Tensor)
    coefs = [0.0, 0.0, 0.0] if in_memory else scales[1:] + [0.0] * (3 - len(scales))
    block_m = linear_o_config(head_dim, symbols.block_q, a.dtype)["BLOCK_M"]
    if not torch.compiler.is_compiling():
        symbols._unchanged()
    idx, cnt = symbols.head_schedule(a.shape[1], row_offset, block_m, select_reused)
    return op_for_call(sparse_linear_o_op, _sparse_linear_o_op_impl, a, weight, bias, terms)(
        a, weight, bias, terms[0] if terms else None, symbols.reuse_bits, idx, cnt, symbols.block_q, symbols.seq_q,
        head_dim, row_offset, block_m, select_reused, extra[0], extra[1], coefs[0], coefs[1],
        scales if in_memory and len(terms) > 1 else None,
    )


def sparse_linear_o(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    symbols: Symbols,
    head_dim: int,
    cache_bias=None,
    row_offset: int = 0,
    cache_scales=None,
) -> torch.Tensor:
    """GEMM-O: the output projection reduced over the head slices of computed tiles, plus the cache bias.

    ``a [B, S, H*head_dim]`` (attention output, heads flattened), ``weight [Cout, H*head_dim]``,
    ``cache_bias``: None, a ``[B, S, Cout]`` tensor, or a sequence of up to three such terms added as
    ``Σ cache_scales[i] * cache_bias[i]`` inside the kernel (``cache_scales[0]`` must be 1; default all 1) —
    the runtime passes the Taylor terms of the cached projection with their coefficients ``x^i / i!``, so
    the forecast is never summed in a separate pass. Any float dtype; fp32 keeps more of the cached part's
    precision. ``sparse_linear_o(a, W, b, s, d, cache_bias_for(a, W, s, d)) == F.linear(a, W, b)`` up to
    rounding.
    """
    return _call(a, weight, bias, cache_bias, symbols, head_dim, row_offset, select_reused=False,
                 cache_scales=cache_scales)


def cache_bias_for(
    a: torch.Tensor,
    weight: torch.Tensor,
    symbols: Symbols,
    head_dim: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """The projection of the reused head slices of ``a`` (no bias): what GEMM-O adds back for them."""
    return _call(a, weight, None, None, symbols, head_dim, row_offset, select_reused=True)
