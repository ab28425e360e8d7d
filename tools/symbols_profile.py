"""Experiment (not shipped): where the update-step symbol generation spends its time (bench's symbols row).

    python tools/symbols_profile.py [--out DIR] [--seqs 4608]      (CUDA machine, repository root)

Profiles omni_compile.bench.symbol_generation_row's pipeline with torch.profiler: the top host and device
ops, and the host-device copies and synchronisations (which stall a pipelined loop)."""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from omni_compile import bench

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
ap.add_argument("--seqs", default="4608")
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
for S in map(int, args.seqs.split(",")):
    q, k = (torch.randn(1, bench.H, S, bench.D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    captured = {}
    bench.bench_ms = lambda fn: captured.setdefault("fn", fn) and 0.0
    bench.symbol_generation_row(q, k, 1.0)
    fn = captured["fn"]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=40)
    dev = events.table(sort_by="self_device_time_total", row_limit=15)
    # every copy and read-back, not only those among the top rows (session 12's table cut them off)
    stalls = "\n".join(f"{e.key}: {e.count} calls, {e.self_cpu_time_total:.1f} us host" for e in events
                       if any(w in e.key for w in ("Memcpy", "Synchronize", "_local_scalar_dense", "nonzero")))
    open(os.path.join(args.out, f"symbols_profile_{S}.txt"), "w").write(table + "\n\n" + dev + "\n\n" + stalls)
    print(f"S={S}: 5 calls\n{table}\n{dev}\ncopies and read-backs:\n{stalls}")
