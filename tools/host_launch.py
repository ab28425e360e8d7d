"""Host time per call of the sparse ops, layer by layer (a GPU diagnostic, not part of the package).

    python tools/host_launch.py [--out DIR] [--seq 4608] [--width 3072]

At FLUX size (one single-stream block's projections and attention, bf16, reuse 0.5, key density 0.2)
times, for each op, N back-to-back calls on the host without a sync (the GPU queue absorbs them), so the
figure is what one call costs the host: the public function (argument checks, schedule lookup, launch),
the registered op through the dispatcher, the bare launch (the op's implementation) through the ops'
launch cache and through Triton's own launch, and a Triton launch of an empty kernel. cuBLAS /
SDPA calls are the reference: what the dense graph pays per call. GPU time per call comes from
``triton.testing.do_bench``. Prints a table; writes it to ``DIR/host_launch.md``."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < 0:
        tl.store(x_ptr + pid, n)


def host_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main() -> None:
    from omni_compile.bench.kernels import make_symbols
    from omni_compile.ops import _launch, cache_bias_for, sparse_attention, sparse_linear_o, sparse_linear_q
    from omni_compile.ops.attention import _sparse_attention_op_impl
    from omni_compile.ops.linear_o import _sparse_linear_o_op_impl, linear_o_config
    from omni_compile.ops.linear_q import _sparse_linear_q_op_impl

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/host")
    ap.add_argument("--seq", type=int, default=4608)
    ap.add_argument("--width", type=int, default=3072)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev, dt, D = "cuda", torch.bfloat16, 128
    S, C = args.seq, args.width
    H = C // D
    sym = make_symbols(S, 0.2, 0.5, device=dev)
    if sym.heads != H:  # bench's symbols are for its own head count: rebuild at this width
        raise SystemExit(f"make_symbols gives {sym.heads} heads, this run needs {H} (width {C})")
    x = torch.randn(1, S, C, device=dev, dtype=dt)
    w = torch.randn(C, C, device=dev, dtype=dt) / C ** 0.5
    b = torch.randn(C, device=dev, dtype=dt)
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
    terms = [cache_bias_for(x, w, sym, D), cache_bias_for(x, w, sym, D)]
    scales = [1.0, 2.0]
    idx, cnt = sym.kv_schedule()
    block_m = linear_o_config(D, sym.block_q, dt)["BLOCK_M"]
    hidx, hcnt = sym.head_schedule(S, 0, block_m, False)
    scale = D ** -0.5
    empty = torch.zeros(1, device=dev)

    def tritons_own(fn):  # the same call with the ops' launch cache off (ops/_launch.py)
        def call():
            with _launch.launch_cache(False):
                return fn()
        return call

    impl_q = lambda: _sparse_linear_q_op_impl(x, w, b, sym.reuse_bits, sym.block_q, S, D, 0)
    impl_o = lambda: _sparse_linear_o_op_impl(
        x, w, b, terms[0], sym.reuse_bits, hidx, hcnt, sym.block_q, S, D, 0, block_m, False, terms[1], None, 2.0, 0.0)
    impl_a = lambda: _sparse_attention_op_impl(q, k, v, sym.reuse_bits, sym.skip_bits, idx, cnt, sym.block_q,
                                               sym.block_kv, scale, True)
    rows = [
        ("triton launch, empty kernel", lambda: _empty_kernel[(1,)](empty, 1, BLOCK=16)),
        ("F.linear (cuBLAS)", lambda: F.linear(x, w, b)),
        ("sparse_linear_q: public", lambda: sparse_linear_q(x, w, b, sym, D)),
        ("sparse_linear_q: registered op", lambda: torch.ops.flashomni.sparse_linear_q(x, w, b, sym.reuse_bits, sym.block_q, S, D, 0)),
        ("sparse_linear_q: implementation", impl_q),
        ("sparse_linear_q: implementation, Triton's own launch", tritons_own(impl_q)),
        ("sparse_linear_o + 2 terms: public", lambda: sparse_linear_o(x, w, b, sym, D, terms, cache_scales=scales)),
        ("sparse_linear_o + 2 terms: implementation", impl_o),
        ("sparse_linear_o + 2 terms: implementation, Triton's own launch", tritons_own(impl_o)),
        ("SDPA (cuDNN/flash)", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("sparse_attention: public", lambda: sparse_attention(q, k, v, sym, scale, heads_inner=True)),
        ("sparse_attention: implementation", impl_a),
        ("sparse_attention: implementation, Triton's own launch", tritons_own(impl_a)),
    ]
    lines = [f"host time per call, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"S={S}, width {C}, bf16, reuse 0.5, key density 0.2", "",
             "| call | host us | GPU us |", "|---|---:|---:|"]
    for name, fn in rows:
        h = host_us(fn)
        g = triton.testing.do_bench(fn, warmup=10, rep=50) * 1000
        lines.append(f"| {name} | {h:.1f} | {g:.1f} |")

    def as_tuple(r):
        return r if isinstance(r, tuple) else (r,)

    same = []
    for impl in (impl_q, impl_o, impl_a):
        got, want = as_tuple(impl()), as_tuple(tritons_own(impl)())
        same.append(all(torch.equal(g, w_) for g, w_ in zip(got, want)))
    lines += ["", f"cached launch == Triton's own launch, bit for bit (GEMM-Q, GEMM-O, attention): {same}"]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "host_launch.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
