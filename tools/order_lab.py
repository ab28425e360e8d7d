"""Experiment (not shipped): does the persistent attention need its longest-first walk, and what does
building that walk cost the host?

    python tools/order_lab.py [--out DIR]      (CUDA machine, repository root)

`Symbols.kv_order` is one device argsort per site per update (the FLUX update-step profile counted three
device copies inside each). Rows: the persistent kernel walking the tiles longest first, in index order,
and computed-first (reused tiles last, index order otherwise), and the tile grid, on symbols whose kept
key blocks vary per tile (uniform in [1, 0.5 n] blocks, reuse 0.3) as real policies' do; then the host
time to issue `kv_order_of` (argsort) against a counting-sort formula of the same order. Each order's
output is checked against the grid's."""
import argparse
import json
import os

import torch

from omni_compile.bench import bench_ms, rel_err
from omni_compile.ops import Symbols
from omni_compile.ops import attention as A
from omni_compile.ops._common import ensure_device_allocator

from host_launch import host_us  # tools/, beside this script


def varied_symbols(S, H, reuse, seed, block=128):
    g = torch.Generator().manual_seed(seed)
    n = -(-S // block)
    kept = torch.randint(1, max(2, n // 2 + 1), (1, H, n, 1), generator=g)
    rank = torch.rand(1, H, n, n, generator=g).argsort(-1).argsort(-1)
    skip = rank >= kept
    re = torch.rand(1, H, n, generator=g) < reuse
    return Symbols.from_dense(re, skip, block, block, S, S).to("cuda")


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
    args = ap.parse_args()
    ensure_device_allocator()
    rows = []
    H, D, BLK = 24, 128, 128
    for S in (4608, 16896, 32656):
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        sym = varied_symbols(S, H, 0.3, S)
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
        for name, fn in variants.items():
            err = rel_err(fn()[0], base)
            ms = bench_ms(fn)
            rows.append(dict(S=S, density=sym.density(), name=name, ms=ms, err=err))
            print(f"S={S:6d} d={sym.density():.3f} {name:28s} {ms:8.4f} ms  err {err:.1e}", flush=True)
        for name, fn in (("host: kv_order_of (argsort)", lambda: A.kv_order_of(cnt)),
                         ("host: counting order", lambda: counting_order(cnt, n_kb))):
            us = host_us(fn)
            rows.append(dict(S=S, name=name, host_us=us))
            print(f"S={S:6d} {name:40s} {us:7.1f} us of host time a call", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    json.dump(rows, open(os.path.join(args.out, "order_lab.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
