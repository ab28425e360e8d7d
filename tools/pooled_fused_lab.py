"""Experiment (not shipped): pooled_scores in one launch (pooling, then the head's last program writes the
softmax) against the two-launch path, on the benchmark's lengths.

    python tools/pooled_fused_lab.py [--out DIR]      (CUDA machine, repository root)

Rows per length: the shipped choice, then both paths forced (``fused`` of ``_launch_pooled``), graph
replays and wall time, each checked against the fp32 reference. Where the fused kernel does not apply
(more key blocks than one softmax tile) only the two-launch row runs."""
import argparse
import json
import os

import torch

from lab_common import timed_row
from omni_compile.ops import pooled as P
from omni_compile.ops.symbols import block_count

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
ap.add_argument("--seqs", default="4608,4685,8192")
args = ap.parse_args()

rows = []
for S in map(int, args.seqs.split(",")):
    q, k = (torch.randn(1, 24, S, 128, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(2))
    ref = P.pooled_scores_reference(q, k, 128, 128, 128 ** -0.5)
    n = block_count(S, 128)
    timed_row(rows, f"S={S}", "shipped", lambda: P.pooled_scores(q, k, 128, 128), ref, S=S)
    timed_row(rows, f"S={S}", "two launches", lambda: P._launch_pooled(q, k, 128, 128, 128 ** -0.5, fused=False), ref, S=S)
    if n <= P._SOFTMAX_TILE_K:
        timed_row(rows, f"S={S}", "one launch", lambda: P._launch_pooled(q, k, 128, 128, 128 ** -0.5, fused=True), ref, S=S)
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "pooled_fused_lab.json"), "w") as f:
    json.dump(rows, f, indent=1)
