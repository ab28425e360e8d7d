"""``flashomni::flashomni_symbols``: the ``flashomni`` policy's update-step decision and its symbols in two
launches.

On an update step the policy (``omni_compile.policies.flashomni``; docs/runtime.md states its rules) reads a
site's pooled scores and decides, per (batch item, head), which vision query blocks to reuse (the low tail
of their vision→text contribution and text→vision guidance) and, per computed vision query block, which
non-text key blocks to skip (the low tail of the row's pooled mass, the row's largest block always kept).
In PyTorch ops that is ~50 small kernels a site, plus a dozen to pack the bits and decode the key lists:
host-bound at every size. Here it is two Triton programs:

* ``_reuse_kernel``, one program per (batch, head): the metrics, both tails and the packed reuse bits;
* ``_skip_kernel``, one program per (query blocks, batch·head) tile: each row's skip tail, its skip bits,
  bool mask and key list (the attention's ``kv_schedule``), in one read of the scores.

A tail is taken without a sort. With keys ordering the blocks as a stable ascending sort does (a value's
IEEE bits — values are >= 0, so the bits order as the values — then its index), the running sum up to key
``m``, ``S(m) = Σ_{key_j <= m} x_j``, is nondecreasing in ``m`` (also in fp32 with the additions in one
fixed order: rounding is monotone, so a sum cannot shrink when a zero term becomes a positive one), and the
tail is every candidate keyed at or below the largest ``m`` with ``S(m) <= budget``: a bisection over the
key range, ~40 masked row sums. A bitonic ``tl.sort`` of packed keys is ten times slower in Triton's CPU
interpreter (where CI runs the kernels) and each block's running sum from ``n`` compares with the others
is n² work (docs/design.md, "Policies").

The PyTorch helpers here (:func:`low_tail`, :func:`skip_tail`, :func:`contribution`, :func:`guidance`) are
the policy's own definition, and :func:`flashomni_symbols_reference` composes them: the op's reference and
CPU path, beside its kernels as every op's reference is (``omni_compile.policies.flashomni`` and ``topk``
call them from here). The kernels sum in other orders, so a block whose running sum
lies within rounding of its budget may land on the other side; elsewhere the two agree bit for bit.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, inference_only, next_pow2, op_for_call, triton_interpreting, use_triton
from ._launch import launch
from .symbols import block_count, pack_bits, selected_first_reference

__all__ = ["flashomni_symbols", "flashomni_symbols_reference", "flashomni_decision", "low_tail", "skip_tail",
           "contribution", "guidance", "MODES"]

#: the decision's three forms (module docstring of ``omni_compile.policies.flashomni``)
MODES = {"joint": 0, "self": 1, "cross": 2}


# ---- the definition, in PyTorch ----------------------------------------------------------------------


def low_tail(score: torch.Tensor, cand: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool mask (shape of ``score [..., n]``): the candidates in the low tail — sorted ascending (stable), a
    candidate is selected when the cumulative score up to and including it is ``<= tau`` × the candidates'
    total. ``cand`` broadcasts against ``score``. ``tau == 0`` selects nothing."""
    cand = cand.expand_as(score)
    if tau <= 0:
        return torch.zeros_like(cand)
    s = _candidate_scores(score.float(), cand)
    return _tail_of_sorted(s, cand, tau * s.sum(-1, keepdim=True))


def skip_tail(scores: torch.Tensor, rows: torch.Tensor, kv_protect: torch.Tensor, tau_kv: float) -> torch.Tensor:
    """``[B, H, nQ, nK]`` bool skip mask: in selected ``rows [B, H, nQ]``, the unprotected key blocks
    (sorted ascending, stable) whose cumulative mass up to and including them is ``<= tau_kv`` — an
    absolute budget, since pooled rows sum to 1. The row's largest block (the first, on ties) is always
    kept."""
    B, H, nQ, nK = scores.shape
    if tau_kv <= 0:
        return torch.zeros(B, H, nQ, nK, dtype=torch.bool, device=scores.device)
    cand = (~kv_protect).view(1, 1, 1, nK).expand(B, H, nQ, nK)
    skip = _tail_of_sorted(_candidate_scores(scores.float(), cand), cand, tau_kv)
    top = scores.argmax(-1, keepdim=True)
    skip = skip.scatter(-1, top, False)
    return skip & rows.unsqueeze(-1)


def _candidate_scores(score: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    # a Python 0.0, not a 0-d device tensor: one fill kernel and allocation fewer per call on a GPU
    return torch.where(cand, score, 0.0)


def _tail_of_sorted(s: torch.Tensor, cand: torch.Tensor, budget) -> torch.Tensor:
    """The candidates of ``s`` (0 elsewhere) that, sorted ascending (stable), have a cumulative sum up to and
    including them ``<= budget`` (a float or a tensor broadcasting against the cumulative sums). The sort's
    indices are a permutation of the last axis, so the scatter writes every element of an empty tensor:
    no zero fill first."""
    order = torch.sort(torch.where(cand, s, float("inf")), dim=-1, stable=True).indices
    cum = torch.gather(s, -1, order).cumsum(-1)
    sel_sorted = (cum <= budget) & torch.gather(cand, -1, order)
    return torch.empty_like(cand).scatter_(-1, order, sel_sorted)


def contribution(P: torch.Tensor, from_rows: torch.Tensor) -> torch.Tensor:
    """``C_i = Σ_{j in from_rows} P[j, i]``: ``[B, H, n]`` from ``P [B, H, n, n]``."""
    return (P.float() * from_rows.view(1, 1, -1, 1)).sum(-2)


def guidance(P: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``G_i = Σ_{j in cols} P[i, j] / Σ_{i' in rows} P[i', j]`` for ``i`` in ``rows`` (0 elsewhere):
    ``[B, H, nRows]`` from ``P [B, H, nRows, nCols]``."""
    M = P.float() * rows.view(1, 1, -1, 1) * cols.view(1, 1, 1, -1)
    colsum = M.sum(-2, keepdim=True)
    beta = torch.where(colsum > 0, M / colsum.clamp_min(1e-30), 0.0)
    return beta.sum(-1)


def flashomni_mode(kind: str, text_q_blocks: int, num_q_blocks: int) -> int:
    """Which form of the decision a site takes: ``MODES["joint"]`` for a joint site with text and vision
    query blocks, ``MODES["cross"]`` for cross-attention, else ``MODES["self"]`` (vision-only metrics; a
    site of text alone has no candidates)."""
    if kind == "cross":
        return MODES["cross"]
    if kind == "joint" and 0 < text_q_blocks < num_q_blocks:
        return MODES["joint"]
    return MODES["self"]


def flashomni_decision(scores: torch.Tensor, square: torch.Tensor, q_text: torch.Tensor, kv_text: torch.Tensor,
                       mode: int, tau_q: float, tau_kv: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(reuse [B, H, nQ], skip [B, H, nQ, nK])`` of the ``flashomni`` policy in PyTorch ops, from the
    pooled ``scores`` on the ``(block_q, block_kv)`` grid and ``square`` on the ``(block_q, block_q)`` grid
    (ignored for cross-attention), the blocks' text masks and the form ``mode`` (:func:`flashomni_mode`).
    Reused blocks are vision blocks; skip bits lie on computed vision rows only; every computed row keeps
    its largest key block: the runtime's contract holds by construction."""
    vis_q = ~q_text
    if mode == MODES["cross"]:
        reuse = low_tail(guidance(scores, vis_q, torch.ones_like(kv_text)), vis_q, tau_q)
    elif mode == MODES["joint"]:
        C = contribution(square, q_text)
        G = guidance(square, vis_q, q_text)
        # both tails in one sort, gather, cumsum and scatter: ~10 launches fewer per site than two calls
        both = low_tail(torch.stack((C, G)), vis_q, tau_q)
        reuse = both[0] & both[1]
    else:
        reuse = low_tail(contribution(square, torch.ones_like(vis_q)), vis_q, tau_q)
    reuse = reuse & vis_q
    skip = skip_tail(scores, ~reuse & vis_q.view(1, 1, -1), kv_text, tau_kv)
    return reuse, skip


def flashomni_symbols_reference(scores, square, q_text, kv_text, mode: int, tau_q: float, tau_kv: float,
                                allow_reuse: bool):
    """:func:`flashomni_symbols` in PyTorch ops (the definition; the CPU path)."""
    reuse, skip = flashomni_decision(scores, square, q_text, kv_text, mode, tau_q, tau_kv)
    if not allow_reuse:
        reuse = torch.zeros_like(reuse)
    idx, cnt = selected_first_reference(~(skip | reuse.unsqueeze(-1)))
    return reuse, skip, pack_bits(reuse), pack_bits(skip), idx, cnt


# ---- the kernels -----------------------------------------------------------------------------------


@triton.jit
def _low_tail(x, cand, budget, pos, LOG2N: tl.constexpr):
    """Bool ``[R, N]``: per row the candidates of ``x [R, N]`` (fp32, >= 0) in the low tail of ``budget``
    (``[R]`` or a scalar): those whose key is at most the largest key ``m`` with ``Σ_{key_j <= m} x_j <=
    budget`` over candidates ``j``, found by bisection (the module docstring). ``pos [R, N]`` are the column
    indices, ``N = 2**LOG2N``. NaN is never selected and adds nothing."""
    val = tl.where(x == 0.0, 0.0, x)  # -0.0's sign bit would key it below everything
    ok = cand & (val == val)
    w = tl.where(ok, val, 0.0)
    key = (val.to(tl.int32, bitcast=True).to(tl.int64) << LOG2N) | pos.to(tl.int64)
    lo = tl.full([x.shape[0]], -1, dtype=tl.int64)  # the keys up to lo fit the budget (none do: 0)
    hi = tl.full([x.shape[0]], (0x7F800000 + 1) << LOG2N, dtype=tl.int64)  # past every finite value's key
    for _ in range(31 + LOG2N):  # hi - lo halves each step, from under 2**(31 + LOG2N) to 1
        mid = lo + (hi - lo) // 2
        fits = tl.sum(tl.where(key <= mid[:, None], w, 0.0), 1) <= budget
        lo = tl.where(fits, mid, lo)
        hi = tl.where(fits, hi, mid)
    return ok & (key <= lo[:, None])


@triton.jit
def _pack_row_bits(bits, R: tl.constexpr, N: tl.constexpr):
    """``[R, N // 8]`` uint8 of bool ``bits [R, N]``, little-endian within each byte (``numpy.packbits(...,
    bitorder="little")``)."""
    b = tl.reshape(bits.to(tl.int32), [R, N // 8, 8])
    weight = (1 << tl.arange(0, 8)).to(tl.int32)
    return tl.sum(b * weight[None, None, :], 2).to(tl.uint8)


@triton.jit
def _chunk(QText, j0, n, CHUNK: tl.constexpr, TEXT_ONLY: tl.constexpr):
    """Blocks ``j0 .. j0 + CHUNK - 1`` and which of them a metric reads: those below ``n``, and with
    ``TEXT_ONLY`` only text blocks (``QText [n]`` uint8)."""
    idx = j0 + tl.arange(0, CHUNK)
    sel = idx < n
    if TEXT_ONLY:
        sel = sel & (tl.load(QText + idx, mask=sel, other=0) != 0)
    return idx, sel


@triton.jit
def _reuse_kernel(P, QText, Reuse, ReuseBits, n_q, n_cols, n_qbytes, tau_q,
                  MODE: tl.constexpr, ALLOW_REUSE: tl.constexpr, N_POW2: tl.constexpr, LOG2N: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Grid ``(B*H,)``. ``P [B*H, n_q, n_cols]`` fp32 contiguous: the square scores (``n_cols == n_q``) for
    joint/self sites, the scores for cross sites; ``QText [n_q]`` uint8 (a bool mask's bytes). Writes the
    decision ``Reuse [B*H, n_q]`` uint8 and, zeroed unless ``ALLOW_REUSE``, ``ReuseBits [B*H, n_qbytes]``.
    Metrics: ``MODE`` 0 (joint) contribution over text rows and guidance over text columns, both tails;
    1 (self) contribution over all rows; 2 (cross) guidance over all columns. The sums walk ``CHUNK`` rows
    (columns) of ``P`` at a time, skipping chunks without a text row (column) in joint mode. Both tails
    bisect together, as the two rows of one ``[2, N_POW2]`` tile: a program is a chain of dependent row
    sums, and one chain is half as long as two."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_POW2)
    inside = offs < n_q
    text = tl.load(QText + offs, mask=inside, other=0) != 0
    vis = inside & ~text
    base = P + bh * n_q * n_cols
    c = tl.zeros([N_POW2], dtype=tl.float32)
    if MODE != 2:
        for j0 in range(0, n_q, CHUNK):
            rows, rsel = _chunk(QText, j0, n_q, CHUNK, MODE == 0)
            if tl.max(rsel.to(tl.int32), 0) > 0:
                tile = tl.load(base + rows[:, None] * n_cols + offs[None, :], mask=rsel[:, None] & inside[None, :],
                               other=0.0)
                c += tl.sum(tile, 0)
    g = tl.zeros([N_POW2], dtype=tl.float32)
    if MODE != 1:
        for j0 in range(0, n_cols, CHUNK):
            cols, csel = _chunk(QText, j0, n_cols, CHUNK, MODE == 0)
            if tl.max(csel.to(tl.int32), 0) > 0:
                # tile[j, i] = P[i, j] over vision rows i: column j's vision mass normalises it
                tile = tl.load(base + offs[None, :] * n_cols + cols[:, None], mask=csel[:, None] & vis[None, :],
                               other=0.0)
                colsum = tl.sum(tile, 1)
                g += tl.sum(tl.where(colsum[:, None] > 0, tile / tl.maximum(colsum, 1e-30)[:, None], 0.0), 0)
    if MODE == 1:
        g = c  # one metric: the second row repeats the first
    if MODE == 2:
        c = g
    first = (tl.arange(0, 2) == 0)[:, None]
    x = tl.where(vis[None, :], tl.where(first, c[None, :], g[None, :]), 0.0)  # [2, N_POW2]: C, G
    tails = _low_tail(x, vis[None, :], tau_q * tl.sum(x, 1), offs[None, :], LOG2N)
    sel = vis & (tl.sum(tails.to(tl.int32), 0) == 2)  # in both tails
    reuse = sel & (tau_q > 0)
    tl.store(Reuse + bh * n_q + offs, reuse.to(tl.uint8), mask=inside)
    bytes_ = tl.arange(0, N_POW2 // 8)
    if ALLOW_REUSE:
        packed = tl.reshape(_pack_row_bits(reuse[None, :], 1, N_POW2), [N_POW2 // 8])
    else:
        packed = tl.zeros([N_POW2 // 8], dtype=tl.uint8)
    tl.store(ReuseBits + bh * n_qbytes + bytes_, packed, mask=bytes_ < n_qbytes)


@triton.jit
def _skip_kernel(S, QText, KvText, Reuse, Skip, SkipBits, Idx, Cnt, n_q, n_k, n_kbytes, tau_kv,
                 ALLOW_REUSE: tl.constexpr, ROWS: tl.constexpr, N_POW2: tl.constexpr, LOG2N: tl.constexpr):
    """Grid ``(cdiv(n_q, ROWS), B*H)``. ``S [B*H, n_q, n_k]`` fp32 contiguous scores; ``QText [n_q]``,
    ``KvText [n_k]`` uint8 text masks; ``Reuse [B*H, n_q]`` uint8 the decision ``_reuse_kernel`` wrote.
    For ``ROWS`` query blocks: ``Skip [B*H, n_q, n_k]`` uint8 (a bool tensor's bytes), ``SkipBits [B*H,
    n_q, n_kbytes]``, and the key list ``Idx [B*H, n_q, n_k]`` int32 (kept blocks ascending, then the
    rest) with its count ``Cnt [B*H, n_q]`` int32; a reused row keeps none (with ``ALLOW_REUSE``)."""
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = qt * ROWS + tl.arange(0, ROWS)
    rin = rows < n_q
    cols = tl.arange(0, N_POW2)
    cin = cols < n_k
    flat = bh * n_q + rows
    ok = rin[:, None] & cin[None, :]
    row_ptr = S + flat[:, None] * n_k
    s = tl.load(row_ptr + cols[None, :], mask=ok, other=0.0)
    kv_text = tl.load(KvText + cols, mask=cin, other=1) != 0
    low = _low_tail(s, ok & ~kv_text[None, :], tau_kv, cols[None, :], LOG2N)
    top = tl.argmax(tl.where(ok, s, float("-inf")), 1, tie_break_left=True)
    q_text = tl.load(QText + rows, mask=rin, other=1) != 0
    decided = tl.load(Reuse + flat, mask=rin, other=0) != 0
    computed = rin & ~q_text & ~decided
    skip = low & (cols[None, :] != top[:, None]) & computed[:, None] & (tau_kv > 0)
    tl.store(Skip + flat[:, None] * n_k + cols[None, :], skip.to(tl.uint8), mask=ok)
    packed = _pack_row_bits(skip, ROWS, N_POW2)
    bytes_ = tl.arange(0, N_POW2 // 8)
    tl.store(SkipBits + flat[:, None] * n_kbytes + bytes_[None, :], packed,
             mask=rin[:, None] & (bytes_[None, :] < n_kbytes))
    kept = cin[None, :] & ~skip
    if ALLOW_REUSE:
        kept = kept & ~decided[:, None]
    k = kept.to(tl.int32)
    upto = tl.cumsum(k, 1)  # kept entries up to and including each column
    total = tl.sum(k, 1)
    slot = tl.where(kept, upto - 1, total[:, None] + cols[None, :] - upto)
    tl.store(Idx + flat[:, None] * n_k + slot, cols[None, :] + tl.zeros([ROWS, N_POW2], dtype=tl.int32), mask=ok)
    tl.store(Cnt + flat, total, mask=rin)


#: rows longer than this take the PyTorch path (a program holds whole rows in registers)
_MAX_ROW = 4096


#: launch configs, the fastest measured on the H200 at FLUX to HunyuanVideo sizes (docs/design.md,
#: "Policies"): one row and 2 warps per skip program; 8-row chunks with 4 warps per reuse program.
_SKIP_ROWS, _SKIP_WARPS = 1, 2
_REUSE_CHUNK, _REUSE_WARPS = 8, 4


def _kernel_rows(n_pow2: int) -> int:
    """Query blocks per skip program: ``_SKIP_ROWS`` on a GPU; in Triton's CPU interpreter, where each
    program is a Python-level loop, ~4096 keys' worth (16 rows of FLUX's 36 key blocks): the same code with
    another tile height."""
    return max(1, min(16, 4096 // n_pow2)) if triton_interpreting() else _SKIP_ROWS


def _warps(n: int) -> dict:
    return {} if triton_interpreting() else dict(num_warps=n)


def _launch_flashomni_symbols(scores, square, q_text, kv_text, mode, tau_q, tau_kv, allow_reuse):
    B, H, n_q, n_k = scores.shape
    dev = scores.device
    P = (scores if mode == MODES["cross"] else square).contiguous()
    S = scores.contiguous()
    qt = q_text.contiguous().view(torch.uint8)
    kt = kv_text.contiguous().view(torch.uint8)
    n_qbytes, n_kbytes = block_count(n_q, 8), block_count(n_k, 8)
    reuse = torch.empty(B, H, n_q, dtype=torch.bool, device=dev)
    reuse_bits = torch.empty(B, H, n_qbytes, dtype=torch.uint8, device=dev)
    nq_pow2 = max(16, next_pow2(n_q))
    if tau_q <= 0:  # nothing reused (skipping alone, as the topk policy's): no metrics to compute
        reuse.zero_()
        reuse_bits.zero_()
    else:
        launch(_reuse_kernel, (B * H,), P, qt, reuse.view(torch.uint8), reuse_bits, n_q, P.shape[-1], n_qbytes,
               float(tau_q), MODE=mode, ALLOW_REUSE=bool(allow_reuse), N_POW2=nq_pow2,
               LOG2N=nq_pow2.bit_length() - 1, CHUNK=_REUSE_CHUNK, **_warps(_REUSE_WARPS))
    skip = torch.empty(B, H, n_q, n_k, dtype=torch.bool, device=dev)
    skip_bits = torch.empty(B, H, n_q, n_kbytes, dtype=torch.uint8, device=dev)
    idx = torch.empty(B, H, n_q, n_k, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, H, n_q, dtype=torch.int32, device=dev)
    nk_pow2 = max(16, next_pow2(n_k))
    rows = _kernel_rows(nk_pow2)
    launch(_skip_kernel, (cdiv(n_q, rows), B * H), S, qt, kt, reuse.view(torch.uint8), skip.view(torch.uint8),
           skip_bits, idx, cnt, n_q, n_k, n_kbytes, float(tau_kv), ALLOW_REUSE=bool(allow_reuse), ROWS=rows,
           N_POW2=nk_pow2, LOG2N=nk_pow2.bit_length() - 1, **_warps(_SKIP_WARPS))
    if not allow_reuse:
        reuse = torch.zeros_like(reuse)
    return reuse, skip, reuse_bits, skip_bits, idx, cnt


#: the op's outputs (torch.library infers the schema from the annotation: a fixed-length tuple)
_SixTensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _flashomni_symbols_impl(scores: torch.Tensor, square: torch.Tensor, q_text: torch.Tensor, kv_text: torch.Tensor,
                            mode: int, tau_q: float, tau_kv: float, allow_reuse: bool
                            ) -> _SixTensors:
    n_q, n_k = scores.shape[-2:]
    if use_triton(scores) and max(n_q, n_k) <= _MAX_ROW and scores.numel() > 0:
        return _launch_flashomni_symbols(scores, square, q_text, kv_text, mode, tau_q, tau_kv, allow_reuse)
    return flashomni_symbols_reference(scores, square, q_text, kv_text, mode, tau_q, tau_kv, allow_reuse)


flashomni_symbols_op = torch.library.custom_op("flashomni::flashomni_symbols", _flashomni_symbols_impl,
                                               mutates_args=())
inference_only(flashomni_symbols_op)


@flashomni_symbols_op.register_fake
def _(scores, square, q_text, kv_text, mode, tau_q, tau_kv, allow_reuse):
    B, H, n_q, n_k = scores.shape
    return (scores.new_empty(B, H, n_q, dtype=torch.bool), scores.new_empty(B, H, n_q, n_k, dtype=torch.bool),
            scores.new_empty(B, H, block_count(n_q, 8), dtype=torch.uint8),
            scores.new_empty(B, H, n_q, block_count(n_k, 8), dtype=torch.uint8),
            scores.new_empty(B, H, n_q, n_k, dtype=torch.int32), scores.new_empty(B, H, n_q, dtype=torch.int32))


def flashomni_symbols(scores: torch.Tensor, square, q_text: torch.Tensor, kv_text: torch.Tensor, mode: int,
                      tau_q: float, tau_kv: float, allow_reuse: bool = True):
    """The ``flashomni`` decision and what the symbols hold of it: ``(reuse [B, H, nQ] bool, skip [B, H, nQ,
    nK] bool, reuse_bits, skip_bits, kv_indices [B, H, nQ, nK] int32, kv_counts [B, H, nQ] int32)`` — the
    masks (:func:`flashomni_decision`, with ``reuse`` all False unless ``allow_reuse``, though the rows it
    would reuse still carry no skip bits), their packed bits (``Symbols`` format) and the attention's key
    lists (``Symbols.kv_schedule``).

    ``scores [B, H, nQ, nK]`` fp32 pooled scores on the ``(block_q, block_kv)`` grid; ``square [B, H, nQ,
    nQ]`` on the ``(block_q, block_q)`` grid (joint/self modes; None for cross); ``q_text [nQ]`` and
    ``kv_text [nK]`` bool. On CUDA two Triton launches (module docstring); rows of more than 4096 blocks and
    CPU tensors take :func:`flashomni_symbols_reference`."""
    if mode not in MODES.values():
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scores.dim() != 4 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be a [B, H, nQ, nK] float32 tensor, got {scores.dtype} {list(scores.shape)}")
    B, H, n_q, n_k = scores.shape
    if square is None:
        if mode != MODES["cross"]:
            raise ValueError("the joint and self modes read the square scores; got None")
        square = scores
    elif tuple(square.shape) != (B, H, n_q, n_q) or square.dtype != torch.float32:
        raise ValueError(f"square must be a [B, H, {n_q}, {n_q}] float32 tensor, got {square.dtype} "
                         f"{list(square.shape)}")
    for name, t, n in (("q_text", q_text, n_q), ("kv_text", kv_text, n_k)):
        if t.dtype != torch.bool or tuple(t.shape) != (n,) or t.device != scores.device:
            raise ValueError(f"{name} must be a bool tensor of shape [{n}] on {scores.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    return op_for_call(flashomni_symbols_op, _flashomni_symbols_impl, scores, square)(
        scores, square, q_text, kv_text, int(mode), float(tau_q), float(tau_kv), bool(allow_reuse))
