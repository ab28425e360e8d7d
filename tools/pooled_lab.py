"""Experiment (not shipped): where pooled_scores spends its time, and block-mean variants.

    python tools/pooled_lab.py [--out DIR]      (CUDA machine, repository root)

Session 8 measured pooled_scores at 0.064 ms of GPU time at 4608 tokens (15 % of a dense attention; the
target is 5 %) although it reads only ~56 MB (q and k, bf16; ~12 us at the H200's bandwidth). Rows: the
committed block-mean launch and block-softmax launch timed apart, then the block mean's chunk height and
warps, and the block softmax's tile sizes and warps as GB/s of the bytes they
must read, on the benchmark's contiguous layout and on the heads-inner layout the model sites hand over.
Each variant's means are checked against the committed kernel's."""
import argparse
import json
import os

import torch
import triton
import triton.language as tl

from omni_compile.bench import bench_ms, graph_ms
from omni_compile.ops import pooled as P
from omni_compile.ops.symbols import block_count

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
args = ap.parse_args()


@triton.jit
def _mean_variant(X, Out, S, n_blocks, stride_xb, stride_xh, stride_xs, H,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SYM_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Grid (n_blocks, B*H): ops/pooled.py's _block_rows_mean over one tensor."""
    P._block_rows_mean(X, Out, tl.program_id(0), tl.program_id(1), H, S, n_blocks, stride_xb, stride_xh, stride_xs,
                       HEAD_DIM, BLOCK_D, SYM_BLOCK, CHUNK)


def means(x, blk, chunk, warps):
    B, H, S, D = x.shape
    n = block_count(S, blk)
    out = torch.empty(B * H, n, D, dtype=torch.float32, device=x.device)
    _mean_variant[(n, B * H)](x, out, S, n, x.stride(0), x.stride(1), x.stride(2), H, HEAD_DIM=D, BLOCK_D=D,
                              SYM_BLOCK=blk, CHUNK=chunk, num_warps=warps)
    return out


rows = []
B, H, D, BLK = 1, 24, 128, 128
for S in (4608, 33792):
    for layout in ("contiguous", "heads-inner"):
        if layout == "contiguous":
            q, k = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        else:
            q, k = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        n = block_count(S, BLK)
        nbytes = 2 * q.numel() * q.element_size()
        qm = torch.empty(B * H, n, D, dtype=torch.float32, device="cuda")
        km = torch.empty_like(qm)
        scores = torch.empty(B, H, n, n, dtype=torch.float32, device="cuda")

        def committed_means():
            P.launch(P._block_mean_kernel, (2 * n, B * H), q, k, qm, km, H, S, S, n, n,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     HEAD_DIM=D, BLOCK_D=D, SYM_BLOCK_Q=BLK, SYM_BLOCK_KV=BLK, CHUNK_Q=32, CHUNK_KV=32)

        def committed_softmax():
            P.launch(P._block_softmax_kernel, (triton.cdiv(n, 32), B * H), qm, km, scores, n, n, S, D ** -0.5,
                     HEAD_DIM=D, BLOCK_D=D, SYM_BLOCK_KV=BLK, TILE_Q=32, TILE_K=32)

        committed_means()
        ref_q = qm.clone()
        for name, fn, byt in (("pooled_scores (whole op)", lambda: P.pooled_scores(q, k, BLK, BLK), nbytes),
                              ("committed block means (q and k)", committed_means, nbytes),
                              ("committed block softmax", committed_softmax, 0)):
            ms, g = bench_ms(fn), graph_ms(fn)
            rows.append(dict(S=S, layout=layout, name=name, ms=ms, graph_ms=g))
            bw = f"{byt / g / 1e6:6.0f} GB/s" if byt else ""
            print(f"S={S:5d} {layout:11s} {name:40s} {ms:.4f} ms graph {g:.4f} ms {bw}", flush=True)
        for chunk in (16, 32, 64):
            for warps in (2, 4, 8):
                name = f"means q: chunk {chunk} w{warps}"
                fn = lambda: means(q, BLK, chunk, warps)
                try:
                    err = (fn() - ref_q).abs().max().item()
                    g = graph_ms(fn)
                except Exception as e:
                    print(f"S={S} {layout} {name}: FAILED {e!r}"[:300], flush=True)
                    continue
                rows.append(dict(S=S, layout=layout, name=name, graph_ms=g, err=err))
                print(f"S={S:5d} {layout:11s} {name:40s} graph {g:.4f} ms {nbytes / 2 / g / 1e6:6.0f} GB/s "
                      f"max err {err:.1e}", flush=True)
        if layout == "contiguous":
            committed_softmax()
            ref_s = scores.clone()
            for tq in (8, 16, 32):
                for tk in (16, 32, 64):
                    for warps in (1, 2, 4):
                        name = f"softmax TILE_Q {tq} TILE_K {tk} w{warps}"
                        out = torch.empty_like(scores)

                        def fn():
                            P.launch(P._block_softmax_kernel, (triton.cdiv(n, tq), B * H), qm, km, out, n, n, S,
                                     D ** -0.5, HEAD_DIM=D, BLOCK_D=D, SYM_BLOCK_KV=BLK, TILE_Q=tq, TILE_K=tk,
                                     num_warps=warps)
                        try:
                            fn()
                            err = (out - ref_s).abs().max().item()
                            g = graph_ms(fn)
                        except Exception as e:
                            print(f"S={S} {name}: FAILED {e!r}"[:300], flush=True)
                            continue
                        rows.append(dict(S=S, layout=layout, name=name, graph_ms=g, err=err))
                        print(f"S={S:5d} {layout:11s} {name:40s} graph {g:.4f} ms max err {err:.1e}", flush=True)
        del q, k
        torch.cuda.empty_cache()
os.makedirs(args.out, exist_ok=True)
json.dump(rows, open(os.path.join(args.out, "pooled_lab.json"), "w"), indent=1)
