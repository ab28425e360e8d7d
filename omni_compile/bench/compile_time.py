"""Cold compile time of FLUX.1 under ``backend="flashomni"``: the whole model or its repeated blocks alone.

``python -m omni_compile.bench.compile_time --mode whole|regional [--layers N] [--cpu]``

Builds the FLUX.1-dev transformer (:func:`omni_compile.bench.e2e.build_flux`: full size in bf16 on a GPU;
``--cpu``: the narrow model, 2 heads of 16, at 128², in fp32), compiles it with Inductor behind the
backend, either whole (``torch.compile(model, backend="flashomni")``) or regionally (diffusers'
``model.compile_repeated_blocks(backend="flashomni")`` and ``OmniState.attach(model)``), and times the first
call (where Dynamo, the passes and Inductor run) and a second one. Inductor's on-disk cache goes to a fresh
directory, so every process compiles cold. Prints one line: ``<mode> first call <s> s, second <s> s, <n>
sites``. Time whole processes side by side with ``farm-bench`` (docs/benchmarks.md, "Compile time").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("whole", "regional"), required=True)
    ap.add_argument("--layers", type=int, default=None, help="double-stream blocks (single: twice as many)")
    ap.add_argument("--cpu", action="store_true", help="the narrow model on the CPU")
    args = ap.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")

    import torch

    import omni_compile
    from .e2e import build_flux, timesteps

    cuda = torch.cuda.is_available() and not args.cpu
    kw = dict(device="cuda", dtype=torch.bfloat16) if cuda else dict(device="cpu", dtype=torch.float32,
                                                                      narrow=True, side=128)
    model, latent, inputs = build_flux(layers=args.layers, **kw)
    state = omni_compile.OmniState(omni_compile.OmniConfig())
    if args.mode == "whole":
        run = torch.compile(model, backend="flashomni", options={"state": state})
    else:
        model.compile_repeated_blocks(backend="flashomni", options={"state": state})
        state.attach(model)
        run = model
    ts = timesteps(2, latent.device)
    times = []
    with torch.no_grad():
        for t in ts:
            t0 = time.perf_counter()
            run(**inputs(latent, t))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    print(f"{args.mode} first call {times[0]:.1f} s, second {times[1]:.2f} s, {len(state.sites)} sites, "
          f"{sum(s.rewritten for s in state.sites)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
