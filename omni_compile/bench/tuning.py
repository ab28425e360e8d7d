"""``omni-compile tune``: the tuner (:func:`omni_compile.tune`) from the command line, on the learned zoo
model by default or on any model a factory function builds.

    python -m omni_compile.bench.tuning --out DIR --psnr 30 [--ssim 0.9] [--captions 4] [--cost flux]
    python -m omni_compile.bench.tuning --out DIR --psnr 30 --target mypkg.mymodule:factory

``--target module:function``: ``function()`` returns ``(model, generate, inputs)`` as :func:`omni_compile.tune`
takes them. Without it the zoo model is tuned on the first ``--captions`` evaluation captions (one
generation per caption, 28 steps, batched CFG), images in [0, 1]. ``--cost``: ``measured`` (wall time on
this device), ``flux`` or ``hunyuan`` (the work each generation did, priced by the H200 profile of a dense
FLUX.1 / HunyuanVideo step: ``WorkModel.flux_h200()``; what a CPU run can say about GPU speed).

Writes ``tune.json`` (every trial), ``tune.md`` (the report, the text plot) and ``tune.png`` (speed-up
against quality, the front and the budget), and prints the chosen ``OmniConfig``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time



def zoo_target(captions: int = 4, steps: int = None, block: int = 64, device="cpu"):
    """``(model, generate, inputs)`` of the zoo model: one input per caption (its seed its index)."""
    from ..zoo import data as zdata
    from ..zoo import sampler as zsampler

    zoo = zsampler.load_zoo(device=device)
    steps = steps or zoo.config["sampler"]["num_inference_steps"]
    caps = zdata.eval_captions(captions)

    def generate(model, i):
        return zsampler.sample(model, zoo.text_encoder, [caps[i]], config=zoo.config, num_inference_steps=steps,
                               seed=i)

    return zoo.transformer, generate, list(range(len(caps)))


def charts(report: dict):
    """One panel: speed-up over dense against the budget's first figure, every trial, the front, the
    starting point, the chosen setting and the budget."""
    from .figures import Chart, Series

    b = report["budget"]
    key = "psnr" if b.get("psnr") is not None else ("ssim" if b.get("ssim") is not None else "metric")
    limit = b.get(key) if key != "metric" else b.get("metric_min")
    tr = report["trials"]

    def y(t):
        v = t["quality"][key]
        return float(v) if not isinstance(v, str) else float("nan")

    front = sorted((t for t in tr if t.get("front")), key=lambda t: t["speedup"])
    series = [Series("tried", [t["speedup"] for t in tr], [y(t) for t in tr], style="dots"),
              Series("front", [t["speedup"] for t in front], [y(t) for t in front], style="line")]
    for label, idx in (("start", report["default_index"]), ("chosen", report.get("best_index"))):
        if idx is not None:
            series.append(Series(label, [tr[idx]["speedup"]], [y(tr[idx])], style="dots"))
    return [Chart(f"tuner: {len(tr)} settings, {report['seconds']:.0f} s ({report['cost_model']})", series,
                  xlabel="speed-up over dense", ylabel=key, hlines=[(limit, "budget", (214, 39, 40))])]


def main(argv=None) -> int:
    from omni_compile import OmniConfig, WorkModel
    from omni_compile.tune import Budget, default_space, tune

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--psnr", type=float, default=None, help="PSNR budget (dB) against the dense output")
    p.add_argument("--ssim", type=float, default=None, help="SSIM budget (image outputs)")
    p.add_argument("--worst", action="store_true", help="judge the worst calibration input, not the mean")
    p.add_argument("--captions", type=int, default=4, help="zoo model: calibration captions")
    p.add_argument("--steps", type=int, default=None, help="zoo model: sampling steps (default 28)")
    p.add_argument("--target", default=None, help="module:function returning (model, generate, inputs)")
    p.add_argument("--cost", default="measured", choices=("measured", "flux", "hunyuan"))
    p.add_argument("--blocks", default="change", help="block-caching rules the search may use: change, fixed, both, none")
    p.add_argument("--max-trials", type=int, default=40)
    args = p.parse_args(argv)
    if args.psnr is None and args.ssim is None:
        p.error("give a budget: --psnr and/or --ssim")
    os.makedirs(args.out, exist_ok=True)
    if args.target:
        mod, _, fn = args.target.partition(":")
        model, generate, inputs = getattr(importlib.import_module(mod), fn)()
        base = OmniConfig()
    else:
        model, generate, inputs = zoo_target(args.captions, args.steps)
        base = OmniConfig(block_q=64, block_kv=64, use_inductor=False)
    budget = Budget(psnr=args.psnr, ssim=args.ssim, worst=args.worst, data_range=None if args.target else 1.0)
    cost = {"measured": "measured", "flux": WorkModel.flux_h200(), "hunyuan": WorkModel.hunyuan_h200()}[args.cost]
    rules = {"fixed": ("fixed",), "change": ("change",), "both": ("fixed", "change"), "none": ()}[args.blocks]
    t0 = time.time()

    def log(msg):
        print(f"[tune {time.time() - t0:6.0f}s] {msg}", flush=True)

    from .quality import cpu_fast_paths

    with cpu_fast_paths(not args.target):
        res = tune(model, generate, inputs, budget, base=base, space=default_space(rules), cost=cost,
                   max_trials=args.max_trials, log=log)
    rep = res.report
    d = rep.to_dict()
    front = {id(t) for t in rep.front()}
    for t, row in zip(rep.trials, d["trials"]):
        row["front"] = id(t) in front
    d["chosen"] = repr(res.config)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(d, f, indent=1)
    with open(os.path.join(args.out, "tune.md"), "w") as f:
        f.write("```\n" + rep.format() + "\n```\n")
    from .figures import write

    write(charts(d), os.path.join(args.out, "tune.png"), cols=1)
    print(rep.format())
    print(f"chosen: {res.config!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
