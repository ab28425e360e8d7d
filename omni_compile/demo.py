"""The main job, for now: the sparse ops on whatever device is here.

Builds random attention inputs at a realistic shape (GPU) or a small one (CPU), then for several
densities of kept work runs ``sparse_attention`` and prints time, density and error against dense
attention restricted to the same blocks. On the GPU the Triton kernels run; on the CPU the fp32
reference does (the Triton kernels are exercised on CPU by the test suite through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .ops import Symbols, sparse_attention, sparse_linear_o, sparse_linear_q, cache_bias_for


def _time(fn, reps):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def random_symbols(B, H, S, block, reuse_fraction, skip_fraction, device, seed=0):
    """Reuse and skip bits drawn at the given fractions (first key block always kept, so no row is empty)."""
    g = torch.Generator().manual_seed(seed)
    n = -(-S // block)
    reuse = torch.rand(B, H, n, generator=g) < reuse_fraction
    skip = torch.rand(B, H, n, n, generator=g) < skip_fraction
    skip[..., 0] = False
    return Symbols.from_dense(reuse, skip, block, block, S, S).to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    B, H, D = 1, args.heads or (24 if cuda else 4), 128 if cuda else 64
    S = args.seq or (4608 if cuda else 1024)
    reps = 20 if cuda else 2
    print(f"omni-compile ops demo on {torch.cuda.get_device_name() if cuda else 'CPU'}: "
          f"B={B} H={H} S={S} D={D} {str(dtype).replace('torch.', '')}")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    dense_ms = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    print(f"{'reuse':>6} {'skip':>6} {'density':>8} {'attn ms':>9} {'vs SDPA':>8} {'max err':>9}")
    print(f"{'-':>6} {'-':>6} {1.0:8.3f} {dense_ms:9.3f} {1.0:8.2f} {'(SDPA)':>9}")
    for reuse_f, skip_f in [(0.0, 0.0), (0.0, 0.5), (0.3, 0.5), (0.5, 0.8)]:
        s = random_symbols(B, H, S, 128, reuse_f, skip_f, device)
        ms = _time(lambda: sparse_attention(q, k, v, s), reps)
        out = sparse_attention(q, k, v, s)
        # dense attention with the same blocks masked, in fp32, as the check
        reuse, skip = s.to_dense()
        blk = torch.arange(S, device=device) // 128
        keep = (~skip & ~reuse.unsqueeze(-1))[:, :, blk][:, :, :, blk]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep | ~keep.any(-1, keepdim=True))
        ref = torch.where(keep.any(-1, keepdim=True), ref, 0.0)
        err = (out.float() - ref).abs().max().item()
        print(f"{reuse_f:6.2f} {skip_f:6.2f} {s.density():8.3f} {ms:9.3f} {dense_ms / ms:8.2f} {err:9.2e}")
    # GEMM-Q / GEMM-O at reuse 0.5
    x = torch.randn(B, S, H * D, device=device, dtype=dtype)
    w = torch.randn(H * D, H * D, device=device, dtype=dtype) / (H * D) ** 0.5
    s = random_symbols(B, H, S, 128, 0.5, 0.0, device)
    lin_ms = _time(lambda: F.linear(x, w), reps)
    q_ms = _time(lambda: sparse_linear_q(x, w, None, s, D), reps)
    cb = cache_bias_for(x, w, s, D)
    o_ms = _time(lambda: sparse_linear_o(x, w, None, s, D, cb), reps)
    err = (sparse_linear_o(x, w, None, s, D, cb).float() - F.linear(x.float(), w.float())).abs().max().item()
    print(f"GEMM {S}x{H * D}x{H * D} at reuse 0.5: F.linear {lin_ms:.3f} ms, GEMM-Q {q_ms:.3f} ms, "
          f"GEMM-O {o_ms:.3f} ms (GEMM-O + cache bias vs F.linear: max err {err:.2e})")


if __name__ == "__main__":
    main()
