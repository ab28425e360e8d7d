"""``flashomni::sparse_linear_q``: the query projection that skips reused (query block, head) tiles.

``y = x @ W.T + b`` for ``x [B, S, Cin]``, ``W [H*D, Cin]``. Output column ``c`` belongs to head
``c // D``; row ``r`` is query position ``r + row_offset`` of the symbols' sequence (in joint text+image
attention the image projection only sees the image rows, which sit after the text tokens). Where the
(query block, head) tile is reused, ``y`` is zero and no matrix work is done for a GEMM tile made only of
such elements. Skipping is valid because everything between this projection and the attention kernel is
per-(token, head) local, and the attention kernel never reads the rows of a reused tile.

Two kernels: a persistent one (one program per SM walking the list of computed tiles that
:meth:`Symbols.tile_schedule` builds on the device; Hopper with Triton 3.6+, one head per column tile, row
tiles inside query blocks: :func:`persistent_rows`) and a tile grid for everything else (any head_dim, tiles
that straddle blocks or heads), which early-exits on reused tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common
from ._launch import launch, launch_planned
from ._common import cdiv, env_switch, inference_only, keep, plans_apply, tensors_key, ensure_device_allocator, hopper_with_new_triton, make_descriptor, num_persistent_programs, op_for_call, tma_compatible, tma_enabled, tma_mode, tma_strides_compatible, check_float, check_head_dim, check_symbols_device, grouped_tile, load_reuse_bit, triton_interpreting, use_triton
from .symbols import Symbols, row_head_selection


def sparse_linear_q_reference(x, weight, bias, reuse_bits, block_q, seq_q, head_dim, row_offset):
    """fp32 ``F.linear``, then zeros on reused tiles via ``torch.where`` (NaN inputs there cannot leak)."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    sel = row_head_selection(reuse_bits, block_q, seq_q, x.shape[1], row_offset, select_reused=False)
    sel = sel.repeat_interleave(head_dim, dim=-1)  # [B, S, H*D]
    return torch.where(sel, y, torch.zeros_like(y)).to(x.dtype)


@triton.jit
def _pointer_k_loop(acc, X, W, b, rows, cols, K, stride_xb, stride_xs, stride_wn,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """acc += X[b, rows, :] @ W[cols, :].T with plain pointer loads (rows/cols already clamped in range)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xs + offs_k[None, :]
    w_ptrs = W + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            xa = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            xa = tl.load(x_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        if IEEE:
            acc = tl.dot(xa, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, wt, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _descriptor_k_loop(acc, X, W, b, row0, col0, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
    """acc += X[b, row0:row0+BLOCK_M, :] @ W[col0:col0+BLOCK_N, :].T through tensor descriptors (host- or
    kernel-built: ``X`` with blocks ``[1, BLOCK_M, BLOCK_K]``, ``W`` ``[BLOCK_N, BLOCK_K]``; out-of-range
    rows and columns arrive as zeros)."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        xa = X.load([b, row0, k * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
        wt = tl.trans(W.load([col0, k * BLOCK_K]))
        if IEEE:
            acc = tl.dot(xa, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, wt, acc)
    return acc


@triton.jit
def _tile_coords(tile, T, H):
    """(batch, row tile, head) of a flat tile index ``(b*T + t)*H + h``."""
    return tile // (H * T), (tile // H) % T, tile % H


@triton.jit
def _sparse_linear_q_kernel(
    X, W, Bias, Y, ReuseBits,
    S, N, K, H, n_qbytes, row_offset,
    stride_xb, stride_xs, stride_wn, stride_yb, stride_ys,
    HEAD_DIM: tl.constexpr,
    SYM_BLOCK_Q: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """GEMM-Q. Grid: ``(cdiv(S, BLOCK_M) * cdiv(N, BLOCK_N), B)``, tiles grouped by ``GROUP_M`` rows.

    Layouts: ``X [B, S, K]`` (unit last stride), ``W [N, K]`` (unit last stride), ``Bias [N]``,
    ``Y [B, S, N]`` (unit last stride), ``ReuseBits [B, H, n_qbytes]`` uint8 contiguous. A tile is
    computed when any of its (row, column) elements belongs to a computed (query block, head); the
    epilogue then writes zeros on the reused elements, so tiles need not align with blocks or heads.
    With ``USE_TMA``, ``X`` and ``W`` are tensor descriptors (blocks ``[1, BLOCK_M, BLOCK_K]`` and
    ``[BLOCK_N, BLOCK_K]``; out-of-range rows and columns arrive as zeros).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(S, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = (offs_m[:, None] < S) & (offs_n[None, :] < N)
    qb = (offs_m + row_offset) // SYM_BLOCK_Q
    head = offs_n // HEAD_DIM
    reused = load_reuse_bit(ReuseBits, b * H + head[None, :], qb[:, None], n_qbytes, in_bounds)
    computed = reused == 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if tl.max(computed.to(tl.int32)) > 0:
        rows = offs_m % S  # clamped: out-of-range rows are computed on valid memory and never stored
        cols = offs_n % N
        if USE_TMA:
            acc = _descriptor_k_loop(acc, X, W, b, pid_m * BLOCK_M, pid_n * BLOCK_N, K, BLOCK_M, BLOCK_K, IEEE)
        else:
            acc = _pointer_k_loop(acc, X, W, b, rows, cols, K, stride_xb, stride_xs, stride_wn,
                                  BLOCK_K, EVEN_K, IEEE)
        if HAS_BIAS:
            acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    acc = tl.where(computed, acc, 0.0)
    y_ptrs = Y + b.to(tl.int64) * stride_yb + offs_m[:, None].to(tl.int64) * stride_ys + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=in_bounds)


@triton.jit
def _sparse_linear_q_persistent_kernel(
    X, W, Bias, Y, Tiles, TileCount,
    B, S, N, K, T, H, num_tiles,
    stride_xb, stride_xs, stride_wn, stride_yb, stride_ys,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    IEEE: tl.constexpr,
    FILL_REUSED: tl.constexpr = True,
):
    """GEMM-Q over the computed tiles only. Grid: ``(NUM_PROGRAMS,)``, each program walking the tile list
    with stride ``NUM_PROGRAMS``.

    Layouts as in :func:`_sparse_linear_q_kernel`; one column tile is one head (``BLOCK_N == head_dim``)
    and row tiles never straddle query blocks, so a tile is either computed or reused whole.
    ``Tiles [num_tiles]`` int32 flat ``(b*T + t)*H + h``, computed ones first (:meth:`Symbols.tile_schedule`),
    ``TileCount [1]`` int32 how many are computed. Descriptors are built in the kernel (global scratch from
    the allocator): rows past ``S`` and columns past ``K`` load as zeros and are not stored. Reused tiles
    get zeros from a second, store-only walk (``FILL_REUSED``), so the output needs no separate clearing
    pass; without it they keep whatever the memory held.
    """
    pid = tl.program_id(0)
    xd = tl.make_tensor_descriptor(X, shape=[B, S, K], strides=[stride_xb, stride_xs, 1],
                                   block_shape=[1, BLOCK_M, BLOCK_K])
    wd = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    yd = tl.make_tensor_descriptor(Y, shape=[B, S, N], strides=[stride_yb, stride_ys, 1],
                                   block_shape=[1, BLOCK_M, BLOCK_N])
    computed = tl.load(TileCount)
    for i in tl.range(pid, computed, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        b, t, h = _tile_coords(tl.load(Tiles + i), T, H)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _descriptor_k_loop(acc, xd, wd, b, t * BLOCK_M, h * BLOCK_N, K, BLOCK_M, BLOCK_K, IEEE)
        if HAS_BIAS:
            acc += tl.load(Bias + h * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.float32)[None, :]
        yd.store([b, t * BLOCK_M, h * BLOCK_N], acc.to(Y.dtype.element_ty).reshape(1, BLOCK_M, BLOCK_N))
    if FILL_REUSED:
        zeros = tl.zeros([1, BLOCK_M, BLOCK_N], dtype=Y.dtype.element_ty)
        for i in range(computed + pid, num_tiles, NUM_PROGRAMS):
            b, t, h = _tile_coords(tl.load(Tiles + i), T, H)
            yd.store([b, t * BLOCK_M, h * BLOCK_N], zeros)


def linear_q_config(dtype: torch.dtype, tma: bool = False) -> dict:
    """Tile shape. Dense, 128x256 tiles through TMA ran fastest (0.151 ms vs 0.163 ms for 128x128 through
    TMA, 4608x3072x3072 on an H100), but a 256-wide tile spans two 128-wide heads and is computed when
    either is, so at random reuse 0.5 it skipped far less (0.837 ms vs 0.696 ms at 33792 rows): tiles
    stay 128 wide, one head each at head_dim 128. ``tma`` is accepted for symmetry with GEMM-O."""
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
        return cfg if triton_interpreting() else dict(cfg, num_warps=4, num_stages=3)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    return cfg if triton_interpreting() else dict(cfg, num_warps=8, num_stages=3)


def persistent_rows(x: torch.Tensor, weight: torch.Tensor, block_q: int, head_dim: int, row_offset: int) -> int:
    """Row-tile height of the persistent GEMM-Q for this call, or 0 where it does not apply.

    It applies where a tile is one (query block, head) or a whole part of one: ``head_dim`` a power of two
    (one head per column tile), row tiles that never straddle query blocks (``row_offset`` a multiple of
    the tile height ``min(128, block_q)``), and operands whose strides the in-kernel descriptors take
    (16-byte multiples; the op checks the base alignment); on a Hopper GPU with Triton 3.6+ (measured there), or wherever the descriptor mode
    is ``"device"`` (the interpreter too: how CI tests it). ``OMNI_COMPILE_PERSISTENT_GEMM=0`` turns it off.
    """
    if not _PERSISTENT or not use_triton(x) or tma_mode() == "off":
        return 0
    if tma_mode() != "device" and not (x.dtype != torch.float32 and hopper_with_new_triton(x.device)):
        return 0
    block_m = min(128, block_q)
    if head_dim & (head_dim - 1) or row_offset % block_m:
        return 0
    # strides only: under torch.compile this runs on fake tensors, which have no data pointer; the op
    # checks the base pointers' alignment when it runs (and takes the tile grid where they are not)
    if not (tma_strides_compatible(x) and tma_strides_compatible(weight)):
        return 0
    return block_m


_PERSISTENT = env_switch("OMNI_COMPILE_PERSISTENT_GEMM")


def persistent_linear_q_config(dtype: torch.dtype, block_m: int, head_dim: int) -> dict:
    """Tiles of the persistent GEMM-Q: ``block_m`` rows, one head wide, 64-deep K steps (32 in fp32)."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=head_dim, BLOCK_K=32 if dtype == torch.float32 else 64,
               FLATTEN=False, WARP_SPEC=False)
    # 8 warps and 4 stages: faster than the tile grid at HunyuanVideo size on the H200, and the form the
    # GPU tests and end-to-end runs use (docs/design.md, "GEMM-Q and GEMM-O": fewer stages, two programs per
    # SM, warp specialization and the flattened loop were slower).
    return cfg if triton_interpreting() else dict(cfg, num_warps=8, num_stages=4)


def _persistent_plan(x, weight, bias, block_m, head_dim, fill_reused, config=None) -> tuple:
    """``(grid, keywords, needs the device allocator)`` of a persistent launch on these operands."""
    B, S, _ = x.shape
    tiles = B * cdiv(S, block_m) * (weight.shape[0] // head_dim)
    cfg = dict(config or persistent_linear_q_config(x.dtype, block_m, head_dim))
    programs = cfg.pop("NUM_PROGRAMS", None) or num_persistent_programs(x.device)
    kwargs = dict(HAS_BIAS=bias is not None, NUM_PROGRAMS=programs, IEEE=x.dtype == torch.float32,
                  FILL_REUSED=fill_reused, **cfg)
    return (min(programs, tiles),), kwargs, not triton_interpreting()


def _launch_linear_q_persistent(x, weight, bias, tiles, tile_count, block_m, head_dim, config=None, fill_reused=True,
                                planned=None):
    """One launch. ``planned``: ``(call key, plan)`` the public wrapper kept (the key fixes every argument's
    specialization but the schedule's), launched without per-argument keying; otherwise planned here."""
    B, S, K = x.shape
    N = weight.shape[0]
    T = cdiv(S, block_m)
    H = N // head_dim
    if tiles.numel() != B * T * H or tile_count.numel() != 1:
        raise ValueError(f"tile schedule has {tiles.numel()} tiles, the call needs B*T*H = {B * T * H}")
    y = _output(B, S, N, x, fill_reused)
    grid, kwargs, needs_allocator = (planned[1] if planned is not None
                                     else _persistent_plan(x, weight, bias, block_m, head_dim, fill_reused, config))
    if needs_allocator:
        ensure_device_allocator()
    args = (x, weight, bias if bias is not None else weight, y, tiles, tile_count, B, S, N, K, T, H, B * T * H,
            x.stride(0), x.stride(1), weight.stride(0), y.stride(0), y.stride(1))
    if planned is not None:
        launch_planned((planned[0], tiles.dtype, tiles.data_ptr() % 16 == 0, tile_count.dtype,
                        tile_count.data_ptr() % 16 == 0), _sparse_linear_q_persistent_kernel, grid, args, kwargs)
    else:
        launch(_sparse_linear_q_persistent_kernel, grid, *args, **kwargs)
    return y


def _output(B: int, S: int, N: int, like: torch.Tensor, fill_reused: bool) -> torch.Tensor:
    """The persistent launch's uninitialised output (one function, so tests can poison what
    ``fill_reused=False`` leaves unwritten)."""
    return torch.empty(B, S, N, dtype=like.dtype, device=like.device)


def _launch_linear_q(x, weight, bias, reuse_bits, block_q, head_dim, row_offset, config=None):
    B, S, K = x.shape
    N = weight.shape[0]
    y = torch.empty(B, S, N, dtype=x.dtype, device=x.device)
    use_tma = (config or {}).get("USE_TMA")
    if use_tma is None:
        use_tma = tma_enabled() and tma_compatible(x) and tma_compatible(weight)
    cfg = dict(config or linear_q_config(x.dtype, use_tma))
    cfg.pop("USE_TMA", None)
    xa, wa = x, weight
    if use_tma:
        xa = make_descriptor(x, [1, cfg["BLOCK_M"], cfg["BLOCK_K"]])
        wa = make_descriptor(weight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    grid = (cdiv(S, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), B)
    launch(_sparse_linear_q_kernel, grid,
        xa, wa, bias if bias is not None else weight, y, reuse_bits,
        S, N, K, reuse_bits.shape[1], reuse_bits.shape[2], row_offset,
        x.stride(0), x.stride(1), weight.stride(0), y.stride(0), y.stride(1),
        HEAD_DIM=head_dim, SYM_BLOCK_Q=block_q, HAS_BIAS=bias is not None,
        EVEN_K=K % cfg["BLOCK_K"] == 0, IEEE=x.dtype == torch.float32, USE_TMA=use_tma, **cfg,
    )
    return y


def _sparse_linear_q_op_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    reuse_bits: torch.Tensor,
    block_q: int,
    seq_q: int,
    head_dim: int,
    row_offset: int,
    tiles: Optional[torch.Tensor] = None,
    tile_count: Optional[torch.Tensor] = None,
    fill_reused: bool = True,
) -> torch.Tensor:
    """Registered op. ``tiles`` / ``tile_count``: ``Symbols.tile_schedule(S, row_offset, block_m)`` of the
    same bits with ``block_m = min(128, block_q)``, given where :func:`persistent_rows` allows the
    persistent kernel; without them, with operands whose base is not 16-byte aligned (which a compiled
    caller's wrapper cannot see), or on the reference path the tile-grid kernel runs."""
    if use_triton(x):
        if tiles is not None and tile_count is not None and tma_compatible(x) and tma_compatible(weight):
            return _launch_linear_q_persistent(x, weight, bias, tiles, tile_count, min(128, block_q), head_dim,
                                               fill_reused=fill_reused)
        return _launch_linear_q(x, weight, bias, reuse_bits, block_q, head_dim, row_offset)
    return sparse_linear_q_reference(x, weight, bias, reuse_bits, block_q, seq_q, head_dim, row_offset)


sparse_linear_q_op = torch.library.custom_op("flashomni::sparse_linear_q", _sparse_linear_q_op_impl, mutates_args=())
inference_only(sparse_linear_q_op)


@sparse_linear_q_op.register_fake
def _(x, weight, bias, reuse_bits, block_q, seq_q, head_dim, row_offset, tiles=None, tile_count=None, fill_reused=True):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


def check_projection(name_x, x, weight, bias, symbols, head_dim, row_offset, weight_in_dim):
    """Checks shared by GEMM-Q and GEMM-O; returns the number of heads."""
    check_float(name_x, x, 3)
    check_float("weight", weight, 2, x.dtype, x.device)
    if bias is not None:
        check_float("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != weight.shape[0]:
            # the kernels read weight.shape[0] entries of it: a shorter bias would be read past its end
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (the weight's output features), "
                             f"got {list(bias.shape)}")
    check_head_dim("head_dim", head_dim)
    if weight.shape[1] != x.shape[2]:
        in_name = "H*D" if weight_in_dim else "Cin"
        raise ValueError(f"weight must have shape [{'Cout' if weight_in_dim else 'H*D'}, {in_name}={x.shape[2]}], got {list(weight.shape)}")
    if not isinstance(symbols, Symbols):
        raise TypeError(f"symbols must be a Symbols, got {type(symbols).__name__}")
    check_symbols_device(symbols, x.device)
    hd = weight.shape[0] if not weight_in_dim else weight.shape[1]
    if hd % head_dim:
        raise ValueError(f"weight's head axis ({hd}) is not a multiple of head_dim={head_dim}")
    heads = hd // head_dim
    if not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    if symbols.batch != x.shape[0] or symbols.heads != heads:
        raise ValueError(
            f"symbols were built for (batch, heads) = ({symbols.batch}, {symbols.heads}), "
            f"but {name_x} and weight give ({x.shape[0]}, {heads})"
        )
    if x.shape[1] + row_offset > symbols.seq_q:
        raise ValueError(
            f"{name_x} rows + row_offset = {x.shape[1]} + {row_offset} exceed symbols.seq_q = {symbols.seq_q}"
        )
    return heads


def sparse_linear_q(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    symbols: Symbols,
    head_dim: int,
    row_offset: int = 0,
    fill_reused: bool = True,
) -> torch.Tensor:
    """GEMM-Q: ``F.linear(x, weight, bias)`` on computed (query block, head) tiles, zeros on reused ones.

    ``x [B, S, Cin]``, ``weight [H*head_dim, Cin]``; row ``r`` of ``x`` is query position ``r + row_offset``
    of the sequence ``symbols`` describe (``S + row_offset <= symbols.seq_q``).

    ``fill_reused=False``: the reused tiles are left unwritten where the persistent kernel runs (Hopper),
    so they hold arbitrary values, NaN included; elsewhere they are zeros as before. That saves writing
    the reused share of ``[B, S, H*D]`` (at 33792 rows and reuse 0.75, 156 MB: ~0.04 ms of a ~0.3 ms call),
    and is only for callers that never read those tiles: the runtime's sites, whose attention skips
    reused tiles and whose passes proved every op between the projection and the attention per-(token,
    head) local.
    """
    key = _call_key(x, weight, bias, symbols, head_dim, row_offset, fill_reused)
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        check_projection("x", x, weight, bias, symbols, head_dim, row_offset, weight_in_dim=False)
        block_m = persistent_rows(x, weight, symbols.block_q, head_dim, row_offset)
        if key is None or not use_triton(x):
            if not torch.compiler.is_compiling():
                symbols._unchanged()
            tiles, count = symbols.tile_schedule(x.shape[1], row_offset, block_m) if block_m else (None, None)
            return op_for_call(sparse_linear_q_op, _sparse_linear_q_op_impl, x, weight, bias)(
                x, weight, bias, symbols.reuse_bits, symbols.block_q, symbols.seq_q, head_dim, row_offset, tiles, count,
                fill_reused,
            )
        # the key holds the bases' alignment, so the op's alignment check is decided here once
        persistent = block_m and tma_compatible(x) and tma_compatible(weight)
        call = keep(_CALLS, key, (block_m, _persistent_plan(x, weight, bias, block_m, head_dim, fill_reused))
                    if persistent else (0, None))
    block_m, plan = call
    symbols._unchanged()
    if block_m:
        tiles, count = symbols.tile_schedule(x.shape[1], row_offset, block_m)
        return _launch_linear_q_persistent(x, weight, bias, tiles, count, block_m, head_dim, fill_reused=fill_reused,
                                           planned=(key, plan))
    return _launch_linear_q(x, weight, bias, symbols.reuse_bits, symbols.block_q, head_dim, row_offset)


#: the public wrapper's checked eager calls by :func:`_call_key`: ``(row-tile height, launch plan)`` of the
#: persistent kernel, or ``(0, None)`` for the tile grid
_CALLS: dict = {}


def _call_key(x, weight, bias, symbols, head_dim, row_offset, fill_reused=True):
    """What the wrapper's checks and its kernel choice read (None while torch.compile traces): the operands'
    shapes, strides, dtypes, devices and base alignment, the symbols' shape and device, the head layout and
    the process-wide modes. Measured on the CPU with the launch stubbed (FLUX's 4608 x 3072 x 3072 shapes
    at 512 rows): 58 µs a call (plus ~8 µs of per-argument launch keying) -> 24 µs."""
    if type(symbols) is not Symbols or not plans_apply(x, weight, bias):
        return None
    return (*tensors_key(x, weight, bias), symbols._shape(), symbols.device, head_dim, row_offset, fill_reused,
            _common._mode, tma_mode(), _PERSISTENT)
