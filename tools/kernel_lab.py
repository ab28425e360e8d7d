"""Experiment (not shipped): kernel variants against the committed defaults and the vendor anchors, same run.

    python tools/kernel_lab.py [--parts attention,gemm] [--out DIR]      (CUDA machine, repository root)

Variants: in-kernel (device) tensor descriptors, with and without Triton's warp specialization of the
main loop (``WARP_SPEC``; on Hopper it needs device descriptors), and launch configs. The GEMM rows of the
first run (docs/e2e/kernels/kernel_lab_s7.log) also had warp-specialized GEMM-Q/GEMM-O variants; they
were not adopted and their options were removed from the kernels (docs/design.md, session 7). Every variant's
output is compared with the committed kernel's on the same inputs (and the dense rows with cuDNN), so a
fast wrong variant shows. One line per row; a JSON of all rows under ``--out``."""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from omni_compile.bench import graph_ms, make_symbols, rel_err, sdpa_backend_runner
from omni_compile.ops import Symbols
from omni_compile.ops import attention as A
from omni_compile.ops import linear_o as LO
from omni_compile.ops import linear_q as LQ

from lab_common import timed_row  # tools/, beside this script

ap = argparse.ArgumentParser()
ap.add_argument("--parts", default="attention,gemm")
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
ap.add_argument("--seqs", default="4608,16896")
args = ap.parse_args()
parts = args.parts.split(",")
rows = []


def row(kind, shape, name, fn, ref, flops, anchor_ms, extra=None):
    r = timed_row(rows, f"{kind:9s} {shape:28s}", name, fn, ref, flops=flops, keep_failures=True,
                  note=lambda r: f"x{anchor_ms / r['ms']:5.2f} anchor", kind=kind, shape=shape, **(extra or {}))
    if r is None:
        return None
    r.update(anchor_ms=anchor_ms, vs_anchor=anchor_ms / r["ms"])
    return r["ms"]


ATTN = {
    "default": None,
    "pointer w8 s3 (default before s7)": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "dev-tma w8 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, DEVICE_TMA=True),
    "ws w4 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, DEVICE_TMA=True, WARP_SPEC=True),
    "ws w4 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, DEVICE_TMA=True, WARP_SPEC=True),
    "ws w8 s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, DEVICE_TMA=True, WARP_SPEC=True),
    "ws w8 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, DEVICE_TMA=True, WARP_SPEC=True),
    "ws bn64 w4 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, DEVICE_TMA=True, WARP_SPEC=True),
    "ws bn64 w8 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, DEVICE_TMA=True, WARP_SPEC=True),
}

if "attention" in parts:
    B, H, D = 1, 24, 128
    for S in map(int, args.seqs.split(",")):
        g = torch.Generator(device="cuda").manual_seed(S)
        # heads-inner memory, as the model's sites hand q/k/v over ([B, S, H, D] viewed as [B, H, S, D])
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for _ in range(3))
        cudnn = graph_ms(sdpa_backend_runner(q, k, v, "cudnn"))  # graph replay, as the rows (lab_common)
        dense_ref = F.scaled_dot_product_attention(q, k, v)
        print(f"attention S={S} cudnn dense {cudnn:.3f} ms ({4 * B * H * S * S * D / cudnn / 1e9:.0f} TF/s)", flush=True)
        for keep, reuse in ((1.0, 0.0), (0.5, 0.0), (0.2, 0.0), (0.1, 0.0), (0.2, 0.5)):
            sym = make_symbols(S, keep, reuse)
            idx, cnt = sym.kv_schedule()
            dens = sym.density()
            flops = 4 * B * H * S * S * D * dens
            base = A._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5)[0]
            if keep == 1.0:
                print(f"  committed kernel vs cuDNN: rel err {rel_err(base, dense_ref):.1e}", flush=True)
            for name, cfg in ATTN.items():
                row("attention", f"S={S} keep={keep} reuse={reuse}", name,
                    lambda cfg=cfg: A._launch_attention(q, k, v, idx, cnt, 128, 128, D ** -0.5, config=cfg and dict(cfg)),
                    base, flops, cudnn * dens, dict(S=S, keep=keep, reuse=reuse, density=dens))
        del q, k, v
        torch.cuda.empty_cache()

_PQ = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
GQ = {  # None: the tile-grid kernel's own config (the default before session 8)
    "grid (s7 default)": ("grid", None),
    "grid tma w8 s4": ("grid", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=True)),
    "persistent w8 s4": ("persistent", dict(_PQ, num_warps=8, num_stages=4, FLATTEN=False, WARP_SPEC=False)),
    "persistent w8 s3": ("persistent", dict(_PQ, num_warps=8, num_stages=3, FLATTEN=False, WARP_SPEC=False)),
    "persistent w4 s4": ("persistent", dict(_PQ, num_warps=4, num_stages=4, FLATTEN=False, WARP_SPEC=False)),
    "persistent w4 s3 2/SM": ("persistent", dict(_PQ, num_warps=4, num_stages=3, FLATTEN=False, WARP_SPEC=False, NUM_PROGRAMS=264)),
    "persistent flat w8 s4": ("persistent", dict(_PQ, num_warps=8, num_stages=4, FLATTEN=True, WARP_SPEC=False)),
    "persistent flat w8 s3": ("persistent", dict(_PQ, num_warps=8, num_stages=3, FLATTEN=True, WARP_SPEC=False)),
    "persistent ws w4 s3": ("persistent", dict(_PQ, num_warps=4, num_stages=3, FLATTEN=False, WARP_SPEC=True)),
    "persistent ws w8 s3": ("persistent", dict(_PQ, num_warps=8, num_stages=3, FLATTEN=False, WARP_SPEC=True)),
    "persistent ws flat w4 s3": ("persistent", dict(_PQ, num_warps=4, num_stages=3, FLATTEN=True, WARP_SPEC=True)),
}
GO = {  # the persistent GEMM-O of session 8 (the same walk as GEMM-Q over all output tiles) was no faster
    # (1.088 vs 1.045 ms dense at 33792 rows, 0.636 vs 0.600 at reuse 0.5: docs/e2e/kernels/kernel_lab_s8.*)
    "grid tma (s7 default)": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, HEADS_IN_REGISTERS=True, num_warps=8, num_stages=3, USE_TMA=True),
    "grid tma w8 s4": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, HEADS_IN_REGISTERS=True, num_warps=8, num_stages=4, USE_TMA=True),
}

if "gemm" in parts:
    D = 128
    for M in (4608, 33792):
        K = N = 3072
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=g)
        cb = [torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
        cublas = graph_ms(lambda: F.linear(x, w, bias))
        # what a GEMM-O with a cache bias cannot avoid: reading the two bias terms (bf16) once
        cb_read = graph_ms(lambda: cb[0].add(cb[1], alpha=0.5)) * 2 / 3
        print(f"gemm M={M} cuBLAS {cublas:.4f} ms ({2 * M * K * N / cublas / 1e9:.0f} TF/s); "
              f"reading two cache-bias terms ~{cb_read:.4f} ms", flush=True)
        n = -(-M // 128)
        for r in (0.0, 0.5, 0.75, 0.9):
            gen = torch.Generator().manual_seed(int(r * 100) + M)
            reuse = torch.zeros(1, N // D, n, dtype=torch.bool)
            if r:
                reuse.scatter_(-1, torch.rand(1, N // D, n, generator=gen).argsort(-1)[..., :round(r * n)], True)
            sym = Symbols.from_dense(reuse, torch.zeros(1, N // D, n, 1, dtype=torch.bool), 128, 128, M, 128).to("cuda")
            f = 1.0 - sym.reuse_fraction()
            flops = 2 * M * K * N * f
            ref_q = LQ.sparse_linear_q_reference(x, w, bias, sym.reuse_bits, 128, M, D, 0)
            tiles, tcount = sym.tile_schedule(M, 0, 128)
            for name, (path, cfg) in GQ.items():
                if path == "grid":
                    fn = lambda cfg=cfg: LQ._launch_linear_q(x, w, bias, sym.reuse_bits, 128, D, 0, config=cfg and dict(cfg))
                else:
                    fn = lambda cfg=cfg: LQ._launch_linear_q_persistent(x, w, bias, tiles, tcount, 128, D, config=dict(cfg))
                row("gemm_q", f"M={M} reuse={r}", name, fn, ref_q, flops, cublas * f, dict(M=M, reuse=r, computed=f))
            hidx, hcnt = sym.head_schedule(M, 0, 128, False)
            ref_o = LO.sparse_linear_o_reference(x, w, bias, cb[0], sym.reuse_bits, 128, M, D, 0, False, cb[1], None, 0.5)

            def go(cfg):
                return LO._launch_linear_o(x, w, bias, cb[0], sym.reuse_bits, hidx, hcnt, 128, D, 0, 128, False,
                                           config=cfg and dict(cfg), cache_bias_1=cb[1], coef_1=0.5)
            for name, cfg in GO.items():
                row("gemm_o", f"M={M} reuse={r}", name, lambda cfg=cfg: go(cfg), ref_o, flops, cublas * f,
                    dict(M=M, reuse=r, computed=f, roofline_ms=cublas * f + cb_read))
        del x, w, cb
        torch.cuda.empty_cache()

os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "kernel_lab.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
# the best variant per (kind, shape), last: the table the reply carries
print("\nbest per row (ms, x committed default):")
for key in dict.fromkeys((r["kind"], r["shape"]) for r in rows):
    rs = [r for r in rows if (r["kind"], r["shape"]) == key and "ms" in r]
    if not rs:
        continue
    d = next((r for r in rs if r["name"] in ("default", "grid (s7 default)", "grid tma (s7 default)")), rs[0])
    b = min(rs, key=lambda r: r["ms"])
    print(f"{key[0]:9s} {key[1]:28s} default {d['ms']:.4f} best {b['name']:16s} {b['ms']:.4f} "
          f"x{d['ms'] / b['ms']:.2f} ({b['tflops']:.0f} TF/s, x{b['vs_anchor']:.2f} anchor, err {b['err']:.0e})")
