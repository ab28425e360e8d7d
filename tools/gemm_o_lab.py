"""Experiment (not shipped): GEMM-O tile configurations on the H200 at FLUX's and HunyuanVideo's row
counts, on realistic reuse.

    python tools/gemm_o_lab.py [--out DIR] [--rows 4608,33792]      (CUDA machine, repository root)

The shipped configuration (``linear_o_config``, chosen by H100 sweeps at 4608 rows) against a short list
of variants: 128- or 256-wide column tiles, 4 or 8 warps, 3 or 4 stages, 64- or 128-deep K steps, group
sizes; each with the cache bias a dispatch step adds, random (query block, head) reuse 0 / 0.5 / 0.75 /
0.9, graph replays, checked against the shipped kernel's output on the same inputs."""
import argparse
import json
import os

import torch

from lab_common import timed_row
from omni_compile.bench import BLOCK, D, make_symbols
from omni_compile.ops import Symbols
from omni_compile.ops.linear_o import _launch_linear_o, linear_o_config

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
ap.add_argument("--rows", default="4608,33792")
args = ap.parse_args()

VARIANTS = {
    "BN256 w8 s3 K64": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=8),
    "BN256 w8 s4 K64": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8),
    "BN256 w8 s2 K128": dict(BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=2, GROUP_M=8),
    "BN128 w4 s3 K64": dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, GROUP_M=8),
    "BN128 w8 s4 K64": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8),
    "BN128 w4 s3 K128": dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, GROUP_M=8),
    "BN256 w8 s3 K64 G16": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=16),
    "BN256 w8 s3 K64 G4": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, GROUP_M=4),
}

rows = []
K = N = 3072
for M in map(int, args.rows.split(",")):
    a = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    cb = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
    for r in (0.0, 0.5, 0.75, 0.9):
        sym = make_symbols(M, 1.0, reuse_fraction=r)
        sym = Symbols(sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, M, M)
        idx, cnt = sym.head_schedule(M, 0, 128, False)
        f = 1.0 - sym.reuse_fraction()
        shipped = dict(linear_o_config(D, BLOCK, a.dtype, True), USE_TMA=True)
        run = lambda cfg: _launch_linear_o(a, w, bias, cb, sym.reuse_bits, idx, cnt, BLOCK, D, 0, 128, False, dict(cfg))
        ref = run(shipped)
        label = f"M={M} reuse={r}"
        timed_row(rows, label, "shipped " + str({k: v for k, v in shipped.items() if k != 'USE_TMA'}),
                  lambda: run(shipped), ref, flops=2 * M * K * N * f, M=M, reuse=r)
        for name, v in VARIANTS.items():
            cfg = dict(BLOCK_M=128, HEADS_IN_REGISTERS=True, USE_TMA=True, **v)
            timed_row(rows, label, name, lambda cfg=cfg: run(cfg), ref, flops=2 * M * K * N * f, M=M, reuse=r)
    del a, cb
    torch.cuda.empty_cache()
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "gemm_o_lab.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
