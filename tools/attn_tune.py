"""Experiment (not shipped): tile configs of the attention kernel against cuDNN, same run.

    python tools/attn_tune.py        (on a CUDA machine, repository root; prints one line per row)

Session 6 ran it with a variant inner loop (scale folded into the exponent's multiply-add, the P.V product
accumulating into the rescaled accumulator) and the committed kernel as "old default"; the variant was
reverted (docs/design.md, session 6). Log: docs/e2e/kernels/attn_inner_loop_s6.log."""
import json, os, sys, itertools
import torch, triton
import torch.nn.functional as F
from omni_compile.ops import attention as new
from omni_compile.bench import make_symbols, bench_ms, sdpa_backend_runner, rel_err

out = os.environ.get("OUT", "out")
rows = []
B, H, D = 1, 24, 128
configs = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=True),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
]
for S in (4608, 16896, 33792):
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cudnn = bench_ms(sdpa_backend_runner(q, k, v, "cudnn"))
    ref = F.scaled_dot_product_attention(q, k, v)
    for keep in (1.0, 0.2, 0.1):
        if S == 33792 and keep == 0.1:
            continue
        sym = make_symbols(S, keep)
        idx, cnt = sym.kv_schedule()
        dens = sym.density() if callable(getattr(sym, "density", None)) else keep
        flops = 4 * B * H * S * S * D * dens
        scale = D ** -0.5
        def row(name, fn):
            try:
                o = fn()[0]
                err = rel_err(o, ref) if keep == 1.0 else float("nan")
                ms = bench_ms(lambda: fn())
            except Exception as e:
                print(f"{name} S={S} keep={keep} failed: {e!r}"[:300]); return
            r = dict(S=S, keep=keep, kernel=name, ms=ms, tflops=flops / ms / 1e9, vs_cudnn=cudnn / ms * dens, err=err)
            rows.append(r)
            print(f"S={S:6d} keep={keep:.1f} {name:60s} {ms:7.3f} ms {r['tflops']:5.0f} TF/s  x{cudnn/ms:5.2f} cudnn  err {err:.1e}", flush=True)
        for c in configs:
            cs = dict(c)
            if S == 33792 and c is not configs[0]:
                continue
            row("config " + " ".join(f"{a}={b}" for a, b in c.items()), lambda: new._launch_attention(q, k, v, idx, cnt, 128, 128, scale, config=dict(cs)))
        print(f"S={S} keep={keep} cudnn dense {cudnn:.3f} ms ({4*B*H*S*S*D/cudnn/1e9:.0f} TF/s)", flush=True)
os.makedirs(out, exist_ok=True)
json.dump(rows, open(os.path.join(out, "attn_tune.json"), "w"), indent=1)
