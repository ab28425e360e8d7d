"""Experiment (not shipped): the fused flashomni policy kernels' launch configs (ops/flashomni_policy.py).

    python tools/flashomni_policy_lab.py [--seqs 4608,16896,33792]      (CUDA machine, repository root)

Per sequence length, on pooled scores of structured random q, k (a joint site, 512 text tokens first): each
kernel alone as graph replays, for a grid of tiles, chunks and warps, and how many blocks each config's
output differs from the shipped config's (the sums' order changes with the chunk: boundary cases only)."""
import argparse
import itertools

import torch
import triton

from omni_compile.ops import pooled_scores
from omni_compile.ops import flashomni_policy as fp
from omni_compile.ops._common import cdiv, next_pow2
from omni_compile.ops._launch import launch

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="4608,33792")
args = ap.parse_args()


def graph(fn):
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3  # us


for S in map(int, args.seqs.split(",")):
    g = torch.Generator(device="cuda").manual_seed(0)
    nb = -(-S // 128)
    offs = torch.randn(1, 24, nb, 1, 128, device="cuda", generator=g) * 0.5
    q, k = ((torch.randn(1, 24, nb, 128, 128, device="cuda", generator=g) + offs).reshape(1, 24, nb * 128, 128)[:, :, :S]
            .to(torch.bfloat16) for _ in range(2))
    scores = pooled_scores(q, k, 128, 128)
    qt = torch.zeros(nb, dtype=torch.bool, device="cuda")
    qt[:4] = True
    qt8 = qt.view(torch.uint8)
    B, H, n_q, n_k = scores.shape
    ref = fp.flashomni_symbols(scores, scores, qt, qt, 0, 0.5, 0.05)
    print(f"S={S}: {n_q} blocks, reuse {ref[0].float().mean():.3f}, skip {ref[1].float().mean():.3f}, "
          f"whole op {graph(lambda: fp.flashomni_symbols(scores, scores, qt, qt, 0, 0.5, 0.05)):.1f} us")
    npow = max(16, next_pow2(n_q))
    log2n = npow.bit_length() - 1
    reuse = torch.empty(B, H, n_q, dtype=torch.uint8, device="cuda")
    rbits = torch.empty(B, H, cdiv(n_q, 8), dtype=torch.uint8, device="cuda")
    rows_out = []
    for chunk, w in itertools.product((8, 16, 32), (2, 4, 8)):
        if chunk * npow > 16384:
            continue
        run = lambda: launch(fp._reuse_kernel, (B * H,), scores, qt8, reuse, rbits, n_q, n_k, cdiv(n_q, 8), 0.5,
                             MODE=0, ALLOW_REUSE=True, N_POW2=npow, LOG2N=log2n, CHUNK=chunk, num_warps=w)
        run()
        diff = int((reuse.bool() != ref[0]).sum())
        rows_out.append((graph(run), f"reuse CHUNK={chunk} warps={w}", diff))
    for t, name, diff in sorted(rows_out)[:5]:
        print(f"  {name}: {t:.1f} us, {diff} differ")
    skip = torch.empty(B, H, n_q, n_k, dtype=torch.uint8, device="cuda")
    sbits = torch.empty(B, H, n_q, cdiv(n_k, 8), dtype=torch.uint8, device="cuda")
    idx = torch.empty(B, H, n_q, n_k, dtype=torch.int32, device="cuda")
    cnt = torch.empty(B, H, n_q, dtype=torch.int32, device="cuda")
    reuse.copy_(ref[0].view(torch.uint8))
    rows_out = []
    for rows, w in itertools.product((1, 2, 4, 8, 16), (2, 4, 8)):
        if rows * npow > 16384:
            continue
        run = lambda: launch(fp._skip_kernel, (cdiv(n_q, rows), B * H), scores, qt8, qt8, reuse, skip, sbits, idx, cnt,
                             n_q, n_k, cdiv(n_k, 8), 0.05, ALLOW_REUSE=True, ROWS=rows, N_POW2=npow, LOG2N=log2n,
                             num_warps=w)
        run()
        diff = int((skip.bool() != ref[1]).sum())
        rows_out.append((graph(run), f"skip ROWS={rows} warps={w}", diff))
    for t, name, diff in sorted(rows_out)[:6]:
        print(f"  {name}: {t:.1f} us, {diff} differ")
    print(f"  shipped: skip ROWS={fp._kernel_rows(npow)}")
    # the walk order over all tiles (Symbols.kv_order), O(n²) compares
    from omni_compile.ops.symbols import _longest_first_kernel, longest_first_reference

    counts = ref[5].reshape(-1)
    want = longest_first_reference(counts)
    order = torch.empty_like(counts)
    n = counts.numel()
    rows_out = []
    for bi, bj, w in itertools.product((16, 32, 64), (128, 256), (2, 4)):  # session 12 shipped 64 x 128, 4 warps
        run = lambda: launch(_longest_first_kernel, (cdiv(n, bi),), counts, order, n, BLOCK_I=bi, BLOCK_J=bj, num_warps=w)
        run()
        rows_out.append((graph(run), f"longest_first BLOCK_I={bi} BLOCK_J={bj} warps={w}", bool(torch.equal(order, want))))
    for t, name, same in sorted(rows_out)[:4]:
        print(f"  {name}: {t:.1f} us, equal: {same}")
    from omni_compile.ops.symbols import _LONGEST_FIRST_I, _LONGEST_FIRST_J

    print(f"  shipped: longest_first BLOCK_I={_LONGEST_FIRST_I} BLOCK_J={_LONGEST_FIRST_J}")
