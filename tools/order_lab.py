"""Experiment (not shipped): does the persistent attention need its longest-first walk, can another walk
of the same list balance unequal tiles as well as the grid, and what does building the list cost the host?

    python tools/order_lab.py [--out DIR] [--seqs 4608,16896,32656] [--only NAME,...]   (CUDA machine, repository root)

`Symbols.kv_order` is built once per site per update (session 9: a device argsort, whose FLUX update-step
profile counted three device copies each). Rows: the persistent kernel (its zig-zag walk: program p takes p, 2P-1-p,
2P+p, ...) over the tiles longest first, in index order, and computed-first (reused tiles last, index
order otherwise), and the tile grid, on symbols whose kept key blocks vary per tile (the benchmark's
`make_symbols(..., varied=True)` at keep 0.25: 1 .. ~n/2 blocks, reuse 0.3) as real policies' do; then
two other walks of the longest-first list by a lab kernel around the shipped kernel's per-tile body
(`_descriptor_tile`): a plain stride (p, p+P, ...) and dynamic (each program takes the next tile from an
atomic counter, as the hardware scheduler hands blocks of a grid to free SMs); then the host time to
issue `Symbols.kv_order`'s `longest_first` (the ranking kernel since session 10) against argsort and a
counting-sort formula of the same order. Each output is checked against the grid's.

Session 9 (H200): the plain-stride persistent kernel was 1.14x faster than the grid at 4608 tokens and
5 % slower at 16896 and 32656, hence PERSISTENT_MAX_WAVES in ops/attention.py (its masks then: counts
uniform in 1 .. n/2 and each tile reused with probability 0.3, drawn by this file). Session 10 (H200,
graph replays, docs/e2e/kernels/order_lab_s10.log): zig-zag 0.1146 vs stride 0.1242 vs grid 0.1400 ms at
4608, but the grid still first at 16896 (1.315 vs 1.378 zig-zag, 1.448 stride) and 32656 (4.949 vs
5.381, 5.486); the dynamic walk without warp specialization 2.6-2.9x slower than the grid, with it not
compiled; hence the zig-zag in the shipped kernel and the wave bound kept. (The session's first run,
order_lab_s10_wall.log, timed wall clocks, in which the shipped launcher's host time showed at 4608.)"""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from omni_compile.bench import make_symbols
from omni_compile.ops import attention as A
from omni_compile.ops._common import ensure_device_allocator
from omni_compile.ops.symbols import longest_first, longest_first_reference

from host_launch import host_us  # tools/, beside this script
from lab_common import timed_row


@triton.jit
def _lab_tile(Q, K, V, Out, Lse, KvIdx, KvCnt, item, qk_scale,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv, n_qb, n_kb,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, KV_PARTIAL: tl.constexpr, IEEE: tl.constexpr,
              WARP_SPEC: tl.constexpr, LSE_PAD: tl.constexpr):
    A._descriptor_tile(Q, K, V, Out, Lse, KvIdx, KvCnt, item, item // n_qb, (item % n_qb) * BLOCK, qk_scale,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv, n_kb,
                       HEAD_DIM, BLOCK, BLOCK, BLOCK, KV_PARTIAL, IEEE, WARP_SPEC, LSE_PAD)


@triton.jit
def _walked_attention(Q, K, V, Out, Lse, KvIdx, KvCnt, Order, Counter, qk_scale,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                      H, seq_q, seq_kv, n_qb, n_kb, n_items,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, KV_PARTIAL: tl.constexpr, IEEE: tl.constexpr,
                      WARP_SPEC: tl.constexpr, LSE_PAD: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                      DYNAMIC: tl.constexpr):
    """Grid ``(NUM_PROGRAMS,)`` over ``Order``'s tiles: a plain stride (program p takes p, p+P, ...: the
    session-9 walk), or (``DYNAMIC``) the next list position from ``Counter [1]`` int32 (zero at launch)
    until the list is done."""
    pid = tl.program_id(0)
    if DYNAMIC:
        w = tl.atomic_add(Counter, 1)
        while w < n_items:
            _lab_tile(Q, K, V, Out, Lse, KvIdx, KvCnt, tl.load(Order + w), qk_scale,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv,
                      n_qb, n_kb, HEAD_DIM, BLOCK, KV_PARTIAL, IEEE, WARP_SPEC, LSE_PAD)
            w = tl.atomic_add(Counter, 1)
    else:
        for w in range(pid, n_items, NUM_PROGRAMS):
            _lab_tile(Q, K, V, Out, Lse, KvIdx, KvCnt, tl.load(Order + w), qk_scale,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, H, seq_q, seq_kv,
                      n_qb, n_kb, HEAD_DIM, BLOCK, KV_PARTIAL, IEEE, WARP_SPEC, LSE_PAD)


def walked_attention(q, k, v, idx, cnt, order, scale, programs, dynamic, warp_spec=True, block=128):
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    out = A.heads_inner_empty(B, H, Sq, D, q)
    lse = A.lse_empty(B, H, Sq, q.device)
    n_qb, n_kb = cnt.shape[-1], idx.shape[-1]
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    kw = {} if os.environ.get("TRITON_INTERPRET") == "1" else dict(num_warps=4, num_stages=2)
    _walked_attention[(programs,)](
        q, k, v, out, lse, idx, cnt, order, counter, scale * A._LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Sq, Skv, n_qb, n_kb, B * H * n_qb,
        HEAD_DIM=D, BLOCK=block, KV_PARTIAL=Skv % block != 0, IEEE=q.dtype == torch.float32, WARP_SPEC=warp_spec,
        LSE_PAD=A.LSE_PAD, NUM_PROGRAMS=programs, DYNAMIC=dynamic, **kw)
    return out, lse


def counting_order(cnt, n_kb):
    """The same stable longest-first order without a sort: bucket starts from a histogram, ranks inside a
    bucket from a cumulative sum of the one-hot counts."""
    c = cnt.reshape(-1).long()
    onehot = torch.nn.functional.one_hot(n_kb - c, n_kb + 1)  # bucket 0 = the most kept blocks
    start = onehot.sum(0).cumsum(0) - onehot.sum(0)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    order = torch.empty_like(c)
    order[start[n_kb - c] + rank] = torch.arange(c.numel(), device=c.device)
    return order.to(torch.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--seqs", default="4608,16896,32656")
    ap.add_argument("--only", default="", help="comma-separated row names to time (default: all), e.g. "
                    "grid,persistent_longest_first for where PERSISTENT_MAX_WAVES should sit")
    args = ap.parse_args()
    only = [n.replace("_", " ") for n in args.only.split(",") if n]  # "_" for a space: device_call.sh splits on spaces
    ensure_device_allocator()
    rows = []
    H, D, BLK = 24, 128, 128
    for S in map(int, args.seqs.split(",")):
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        sym = make_symbols(S, 0.25, 0.3, seed=S, varied=True)
        idx, cnt = sym.kv_schedule()
        n_kb = idx.shape[-1]
        lpt = sym.kv_order()
        assert torch.equal(counting_order(cnt, n_kb), lpt)
        natural = torch.arange(cnt.numel(), device="cuda", dtype=torch.int32)
        computed_first = torch.argsort((cnt.reshape(-1) == 0).to(torch.int8), stable=True).to(torch.int32)
        cfg = A.attention_config(D, BLK, BLK, q.dtype, q.device)
        grid = lambda: A._launch_attention(q, k, v, idx, cnt, BLK, BLK, D ** -0.5, dict(cfg, PERSISTENT=False))
        base = grid()[0]
        variants = {"grid": grid}
        for name, order in (("persistent longest first", lpt), ("persistent index order", natural),
                            ("persistent computed first", computed_first)):
            variants[name] = (lambda o: lambda: A._launch_attention(q, k, v, idx, cnt, BLK, BLK, D ** -0.5,
                                                                    dict(cfg, PERSISTENT=True), kv_order=o))(order)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # the dynamic walk with warp specialization fails Triton's specialization pass (3.6 on the H200 and
        # 3.9 for sm_90: "Other parent ops are not supported"); without it the key loop is the pipelined one
        for name, dyn, ws in (("lab: plain stride longest first", False, True), ("lab: dynamic, no WS", True, False)):
            variants[name] = (lambda d, w: lambda: walked_attention(q, k, v, idx, cnt, lpt, D ** -0.5, sms, d, w))(dyn, ws)
        for name, fn in variants.items():
            if only and name not in only:
                continue
            timed_row(rows, f"S={S:6d} d={sym.density():.3f}", name, fn, base, S=S, density=sym.density())
        for name, fn in (("host: longest_first (ranking kernel)", lambda: longest_first(cnt)),
                         ("host: argsort (session 9)", lambda: longest_first_reference(cnt)),
                         ("host: counting order", lambda: counting_order(cnt, n_kb))):
            if only and name not in only:
                continue
            us = host_us(fn)
            rows.append(dict(S=S, name=name, host_us=us))
            print(f"S={S:6d} {name:40s} {us:7.1f} us of host time a call", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    json.dump(rows, open(os.path.join(args.out, "order_lab.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
