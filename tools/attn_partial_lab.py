"""Experiment (not shipped): the attention kernel on sequence lengths that end in a partial key block.

    python tools/attn_partial_lab.py [--out DIR]      (CUDA machine, repository root)

HunyuanVideo's joint sequence (32400 image + 256 text tokens) ends in a 16-row key block that every query
tile keeps (the text). Session 8 found the warp-specialized kernel 2.4x slower than the pointer loop there
(10.6 vs 4.4 ms a site call in an end-to-end profile) while it was faster on 128-multiple lengths: the
partial block ran in a pass after the specialized loop. The first run of this lab (docs/e2e/kernels/
attn_partial_lab_s8.log) had that form as a row (81.9 ms dense at 32656 against 26.0 with the block inside
the loop); the kernel now always takes it inside. Rows: the pointer loop, the warp-specialized default, and
in-kernel descriptors without specialization, on lengths on and off a 128 multiple with the last key block
always kept, each checked against the pointer kernel's output."""
import argparse
import json
import os

import torch

from omni_compile.ops import Symbols
from omni_compile.ops import attention as A

from lab_common import timed_row  # tools/, beside this script

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
args = ap.parse_args()
B, H, D, BLK = 1, 24, 128, 128
VARIANTS = {
    "pointer w8 s3": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "ws w4 s2 (default)": dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, DEVICE_TMA=True, WARP_SPEC=True),
    "dev-tma, no ws": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, DEVICE_TMA=True),
}
rows = []
for S in (32768, 32656, 4608, 4352 + 77):
    n = -(-S // BLK)
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for _ in range(3))
    for keep, reuse_f in ((1.0, 0.0), (0.2, 0.5), (0.1, 0.5)):
        gc = torch.Generator().manual_seed(n)
        kept = max(1, round(keep * n))
        order = torch.rand(B, H, n, n, generator=gc).argsort(-1)
        skip = torch.ones(B, H, n, n, dtype=torch.bool)
        skip.scatter_(-1, order[..., :kept], False)
        skip[..., -1] = False  # the text block: kept by every tile
        reuse = torch.zeros(B, H, n, dtype=torch.bool)
        if reuse_f:
            reuse.scatter_(-1, torch.rand(B, H, n, generator=gc).argsort(-1)[..., :round(reuse_f * n)], True)
        sym = Symbols.from_dense(reuse, skip, BLK, BLK, S, S).to("cuda")
        idx, cnt = sym.kv_schedule()
        dens = sym.density()
        base = A._launch_attention(q, k, v, idx, cnt, BLK, BLK, D ** -0.5, config=dict(VARIANTS["pointer w8 s3"]))[0]
        for name, cfg in VARIANTS.items():
            timed_row(rows, f"S={S:6d} keep={keep:.1f} reuse={reuse_f:.1f} d={dens:.3f}", name,
                      lambda cfg=cfg: A._launch_attention(q, k, v, idx, cnt, BLK, BLK, D ** -0.5, config=dict(cfg))[0],
                      base, flops=4 * B * H * S * S * D * dens, S=S, keep=keep, reuse=reuse_f, density=dens)
    del q, k, v
    torch.cuda.empty_cache()
os.makedirs(args.out, exist_ok=True)
json.dump(rows, open(os.path.join(args.out, "attn_partial_lab.json"), "w"), indent=1)
