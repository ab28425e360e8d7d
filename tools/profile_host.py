"""Where the host time of the rewritten sites goes (a diagnostic for the GPU, not part of the package).

    python tools/profile_host.py --out DIR [--model flux] [--layers 2] [--config aggressive]

Builds the benchmark model with few blocks (full-size tokens and widths), compiles it with
``backend="flashomni"`` at one bench_e2e setting, runs a short loop, then times one update and one
dispatch step under cProfile. Writes the top functions by own time and by cumulative time per action to
``DIR/host_<model>_<action>.txt`` and prints the per-step totals last. The GPU runs ahead of the host
when the host is fast enough, so wall time per step minus device time is what the host costs."""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch


def main() -> None:
    from omni_compile import OmniConfig, OmniState
    from omni_compile.bench.e2e import MODELS, TOKEN_LAYOUTS, _sync, setting, timesteps
    from omni_compile.schedule import step_action

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/host")
    ap.add_argument("--model", default="flux")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--config", default="aggressive")
    ap.add_argument("--cpu", action="store_true", help="narrow fp32 model on the CPU (checks the script)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    small = dict(device="cpu", dtype=torch.float32, narrow=True, side=128) if args.cpu else {}
    model, latent, inputs = MODELS[args.model](layers=args.layers, **small)
    cfg = dict(policy="dense", interval=5, warmup=2, use_inductor=not args.cpu)
    if args.cpu:
        cfg.update(block_q=16, block_kv=16)
    cfg.update(setting(args.config, args.model, dict(TOKEN_LAYOUTS, flux=(1, 8, 8)) if args.cpu else TOKEN_LAYOUTS))
    state = OmniState(OmniConfig(**cfg))
    fn = torch.compile(model, backend="flashomni", options={"state": state})
    ts = timesteps(50, latent.device)
    rows = []
    with torch.no_grad():
        for i in range(12):
            kw = inputs(latent, ts[i])
            act = step_action(i, state.config.warmup, state.config.interval)
            _sync()
            t0 = time.perf_counter()
            if i >= 8 and act in ("update", "dispatch") and act not in {r[0] for r in rows}:
                pr = cProfile.Profile()
                pr.enable()
                fn(**kw)
                _sync()
                pr.disable()
                wall = (time.perf_counter() - t0) * 1000
                for sort in ("tottime", "cumulative"):
                    s = io.StringIO()
                    pstats.Stats(pr, stream=s).sort_stats(sort).print_stats(45)
                    with open(os.path.join(args.out, f"host_{args.model}_{act}.txt"), "a") as f:
                        f.write(s.getvalue())
                rows.append((act, wall))
            else:
                fn(**kw)
                _sync()
                rows.append((f"{act} (plain)", (time.perf_counter() - t0) * 1000))
    for act, wall in rows:
        print(f"{act:18s} {wall:8.1f} ms")


if __name__ == "__main__":
    main()
