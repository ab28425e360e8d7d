"""End-to-end benchmark: a denoising loop of a full-size diffusers DiT, Inductor dense vs ``flashomni``.

``python -m omni_compile.bench.e2e --out DIR --model flux|hunyuan [--steps 50] [--max-steps N]
[--configs dense,moderate,aggressive]``

The model is built directly on the GPU in bf16 with random weights at its real size (FLUX.1-dev config at
1024² — 4,096 image + 512 text tokens; HunyuanVideo default config at a 9×90×160 latent — 32,400 video +
256 text tokens). The loop is an Euler flow-matching loop over ``--steps`` timesteps from 1000 down.

Compiles twice: ``torch.compile(model)`` (Inductor, the baseline) and ``torch.compile(model,
backend="flashomni")`` once; every flashomni setting then runs on that same compiled graph (the state's
config is switched and reset between loops — no recompile). Settings (``--configs``):

* ``dense``: ``policy="dense"`` (overhead check: the rewritten graph with every tile computed);
* ``moderate`` / ``aggressive``: ``policy="fixed"`` with reuse 0.3 / skip 0.5 and reuse 0.5 / skip 0.8,
  update interval 5, warm-up 8;
* ``blocks`` / ``blocks_aggressive``: half of the transformer blocks cached on dispatch steps (whole-block
  caching) without / with the aggressive attention setting (only when the installed runtime has block
  caching);
* any of these with ``@triton`` appended (``blocks_aggressive@triton``): the same setting with the ops'
  kernels launched through Triton's own path instead of the launch cache (``ops/_launch.py``) — a same-run
  A/B of the cache on host-bound loops.

Per step it records the wall time (``torch.cuda.synchronize`` after each call) and the step's action
(dense / update / dispatch); ``--max-steps`` runs only the first N steps of the ``--steps`` schedule and
projects the loop total from the per-action medians (marked ``projected``). The ideal speedup is computed
from a profile of one dense step: per kernel class (attention, GEMM-Q sites, GEMM-O sites, other GEMMs,
rest) its time; a dispatch step ideally saves ``attention × (1 − density) + (GEMM-Q + GEMM-O) × reuse``
of what the blocks that still run cost, full steps cost a dense step. The dense step is the faster of
Inductor's and the rewritten graph's own (``dense`` / ``split_dense``, when that row ran: ``ideal_base``).
Block times are the kernels inside each block's label on the device timeline (:func:`block_ms_by_label`).
Correctness in the same run: the ``dense`` setting's final latent against Inductor's (relative L2), and
every sparse setting's final latent error is reported as its quality figure.

**Context parallelism** (``--cp ulysses|ring``, under ``torchrun --nproc-per-node N``): every process shards
the model with diffusers' ``enable_parallelism`` (:mod:`.parallel`) before anything is compiled, so the
Inductor baseline and every flashomni setting run with the same parallel config; each rank runs the same
loop, rank 0 times it and writes the results (with every rank's cache memory). The scaling table over runs
at several N: ``--scaling DIR1/e2e_flux.json DIR2/e2e_flux.json ... --out DIR``.

Writes ``DIR/e2e_<model>.json``, ``.md`` and ``.png`` (per-step wall and GPU time per setting, speedups
beside their ideal: :mod:`omni_compile.bench.figures`), rewritten after every setting so a run cut off by a time
limit keeps what it measured. ``--replot FILE.json`` rebuilds the table and figure from a saved result.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from omni_compile import FixedBlocks
from omni_compile.policies import Fixed
from omni_compile.tune import schedule

from . import parallel

SETTINGS: Dict[str, dict] = {
    "dense": dict(policy="dense"),
    "flashomni": dict(policy="flashomni"),
    "split_dense": dict(policy="dense"),
    "moderate": dict(policy=Fixed(reuse=0.3, skip=0.5)),
    "aggressive": dict(policy=Fixed(reuse=0.5, skip=0.8)),
    "blocks": dict(policy="dense", block_cache=FixedBlocks(0.5)),
    "blocks_aggressive": dict(policy=Fixed(reuse=0.5, skip=0.8), block_cache=FixedBlocks(0.5)),
}


#: Token grids of the benchmark sizes (frames, height, width of the vision tokens), for the ``window``
#: strategy where the passes cannot infer it (FLUX packs its latents before the transformer).
TOKEN_LAYOUTS = {"flux": (1, 64, 64), "hunyuan": (9, 45, 80)}


#: suffix of a setting run with the ops' launch cache off (``ops/_launch.py``): ``blocks_aggressive@triton``
#: next to ``blocks_aggressive`` is a same-run A/B of the cache
TRITON_LAUNCH = "@triton"

#: suffix of a setting run on a compile with ``OmniConfig(cuda_graphs=True)``: dispatch steps replayed from
#: CUDA graphs (``aggressive+cg`` next to ``aggressive`` and the ``inductor_cg`` anchor)
CUDA_GRAPHS = "+cg"


#: ``r:<setting>`` rows: the quality table's rows by setting name (``--replay FILE``), and the loop's length
REPLAY: dict = {"rows": {}, "steps": 50}


def setting(name: str, model: str, layouts=None) -> dict:
    """Config changes of a benchmark setting: a name of :data:`SETTINGS`, ``s:<strategy>`` for a shipped
    policy strategy (``omni_compile.bench.presets``) at the model's token grid, or ``r:<setting>`` for the
    recorded-density replay of a row of the learned model's quality table (``--replay``,
    :mod:`omni_compile.bench.replay`: its schedule, and its policy's figures per site and update as
    content-blind bits); any of them with :data:`TRITON_LAUNCH` appended (same config, kernels launched
    through Triton's own path) or :data:`CUDA_GRAPHS` (same config on a compile with CUDA graphs)."""
    for suffix in (TRITON_LAUNCH, CUDA_GRAPHS, TRITON_LAUNCH):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    if name.startswith("r:"):
        from .replay import replay_config

        row = REPLAY["rows"].get(name[2:])
        if row is None:
            raise ValueError(f"{name}: no row {name[2:]!r} in the --replay file (rows: {sorted(REPLAY['rows'])})")
        return replay_config(row, REPLAY["steps"])
    if name.startswith("s:"):
        from .presets import strategy_policy

        grid = (layouts or TOKEN_LAYOUTS)[model]
        return dict(policy=strategy_policy(name[2:], grid), token_layout=grid)
    return SETTINGS[name]


# ---- models ---------------------------------------------------------------------------------------


#: ``narrow=True``: 2 heads of 16, a 32-wide text encoder and 16 text tokens — the model classes and the
#: driver exactly as benchmarked, small enough for a CPU smoke test (``--cpu-smoke``, tests/test_bench_e2e.py).
_NARROW = dict(heads=2, head_dim=16, text_dim=32, pooled=32, text=16, rope=(4, 6, 6))


def build_flux(device="cuda", dtype=torch.bfloat16, layers=None, single_layers=None, side=1024, narrow=False):
    """FLUX.1-dev transformer (11.9 B parameters) with random weights, and its inputs at ``side``²."""
    from diffusers import FluxTransformer2DModel

    n = _NARROW if narrow else dict(heads=24, head_dim=128, text_dim=4096, pooled=768, text=512, rope=(16, 56, 56))
    cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=n["head_dim"],
               num_attention_heads=n["heads"], joint_attention_dim=n["text_dim"], pooled_projection_dim=n["pooled"],
               guidance_embeds=True, axes_dims_rope=n["rope"])
    if layers is not None:
        cfg.update(num_layers=layers, num_single_layers=single_layers if single_layers is not None else 2 * layers)
    model = _build(FluxTransformer2DModel, cfg, device, dtype)
    h = w = side // 16
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    static = dict(
        encoder_hidden_states=torch.randn(1, n["text"], n["text_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, n["pooled"], generator=g).to(device, dtype),
        img_ids=ids.to(device), txt_ids=torch.zeros(n["text"], 3, device=device),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32), return_dict=False,
    )
    latent = torch.randn(1, h * w, 64, generator=g).to(device, dtype)

    def inputs(x, t):
        return dict(static, hidden_states=x, timestep=t.expand(1).to(dtype) / 1000)

    return model, latent, inputs


def build_hunyuan(device="cuda", dtype=torch.bfloat16, layers=None, single_layers=None, frames=9, height=90, width=160,
                  narrow=False):
    """HunyuanVideo transformer (default config, 12.8 B parameters) with random weights; a
    ``frames × height × width`` latent (9×90×160: 32,400 video tokens + 256 text tokens)."""
    from diffusers import HunyuanVideoTransformer3DModel

    n = dict(_NARROW) if narrow else dict(text_dim=4096, pooled=768, text=256)
    cfg = {}
    if narrow:
        cfg.update(num_attention_heads=n["heads"], attention_head_dim=n["head_dim"], text_embed_dim=n["text_dim"],
                   pooled_projection_dim=n["pooled"], rope_axes_dim=n["rope"], num_refiner_layers=1)
    if layers is not None:
        cfg.update(num_layers=layers, num_single_layers=single_layers if single_layers is not None else 2 * layers)
    model = _build(HunyuanVideoTransformer3DModel, cfg, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    static = dict(
        encoder_hidden_states=torch.randn(1, n["text"], n["text_dim"], generator=g).to(device, dtype),
        encoder_attention_mask=torch.ones(1, n["text"], device=device, dtype=torch.long),
        pooled_projections=torch.randn(1, n["pooled"], generator=g).to(device, dtype),
        guidance=torch.full((1,), 6000.0, device=device, dtype=dtype), return_dict=False,
    )
    latent = torch.randn(1, 16, frames, height, width, generator=g).to(device, dtype)

    def inputs(x, t):
        return dict(static, hidden_states=x, timestep=t.expand(1).to(dtype))

    return model, latent, inputs


def _build(cls, cfg, device, dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


MODELS: Dict[str, Callable] = {"flux": build_flux, "hunyuan": build_hunyuan}


# ---- the loop -------------------------------------------------------------------------------------


def timesteps(steps: int, device) -> torch.Tensor:
    return torch.linspace(1000.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def run_loop(fn, latent, inputs, steps: int, max_steps: Optional[int] = None, trace: Optional[dict] = None):
    """Euler flow-matching loop; returns (final latent, per-step seconds).

    ``trace`` (a dict) collects per step what the wall time is made of: ``host`` — seconds until the host
    had queued the whole step (when that is close to the wall time the step is host-bound: the GPU waits
    on launches), ``gc`` — seconds in Python's garbage collector, ``device_allocs`` — new device memory
    segments the caching allocator requested (each a cudaMalloc)."""
    import gc

    ts = timesteps(steps, latent.device)
    x = latent.clone()
    times = []
    n = steps if max_steps is None else min(steps, max_steps)
    gc_time = [0.0, 0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    if trace is not None:
        gc.callbacks.append(on_gc)
    try:
        for i in range(n):
            _sync()
            gc_time[0] = 0.0
            segs = _device_segments()
            t0 = time.perf_counter()
            v = fn(**inputs(x, ts[i]))[0]
            x = x + (ts[i + 1] - ts[i]) / 1000 * v.to(x.dtype)
            t1 = time.perf_counter()
            _sync()
            times.append(time.perf_counter() - t0)
            if trace is not None:
                trace.setdefault("host", []).append(t1 - t0)
                trace.setdefault("gc", []).append(gc_time[0])
                trace.setdefault("device_allocs", []).append(_device_segments() - segs)
    finally:
        if trace is not None:
            gc.callbacks.remove(on_gc)
    return x, times


@torch.no_grad()
def run_loop_pipelined(fn, latent, inputs, steps: int):
    """The same loop as :func:`run_loop` with no sync between steps (one at the end), as a pipeline runs it:
    the host may queue step ``i + 1`` while the GPU still runs step ``i``. Returns (final latent, seconds,
    per-step ms on the GPU's clock: between the events recorded after consecutive steps, so a step's GPU
    time plus any wait for the host to queue it; empty without CUDA)."""
    ts = timesteps(steps, latent.device)
    x = latent.clone()
    cuda = torch.cuda.is_available()
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    _sync()
    t0 = time.perf_counter()
    if cuda:
        ends[0].record()
    for i in range(steps):
        v = fn(**inputs(x, ts[i]))[0]
        x = x + (ts[i + 1] - ts[i]) / 1000 * v.to(x.dtype)
        if cuda:
            ends[i + 1].record()
    _sync()
    total = time.perf_counter() - t0
    return x, total, [a.elapsed_time(b) for a, b in zip(ends, ends[1:])]


def _device_segments() -> int:
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_stats().get("segment.all.allocated", 0))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


#: the action of every step of a loop: ``actions(steps, warmup, interval, final_dense=0)``
actions = schedule


def loop_total(times: List[float], acts: List[str], steps: int, all_acts: List[str]) -> tuple:
    """(total seconds for ``steps``, projected?) from measured per-step times: the measured sum when the
    loop ran every step, else per-action medians times the schedule's counts."""
    if len(times) == steps:
        return sum(times), False
    med = {a: statistics.median([t for t, b in zip(times, acts) if b == a]) for a in set(acts)}
    fallback = med.get("dispatch", med.get("update", next(iter(med.values()))))
    return sum(med.get(a, fallback) for a in all_acts), True


# ---- profile of one step --------------------------------------------------------------------------

_ATTN = ("fmha", "flash", "attention", "sdpa", "attn")
_GEMM = ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "matmul", "mm_", "_mm", "linear")


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTN):
        return "attention"
    if any(k in n for k in _GEMM):
        return "gemm"
    return "rest"


def device_ms_by_class(prof) -> dict:
    """Device ms of a profile's kernels per :func:`kernel_class`."""
    from torch.autograd import DeviceType

    out = {"attention": 0.0, "gemm": 0.0, "rest": 0.0}
    for e in prof.events():
        # record_function ranges (the block labels) show up on the device timeline too: not kernels
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False) \
                and not e.name.startswith("flashomni::"):
            out[kernel_class(e.name)] += e.time_range.elapsed_us() / 1000
    return out


@torch.no_grad()
def profile_step(fn, kwargs) -> dict:
    """Device ms of one call per kernel class, and (flashomni graphs) per site op."""
    from torch.profiler import ProfilerActivity, profile

    fn(**kwargs)
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(**kwargs)
        _sync()
    out = device_ms_by_class(prof)
    for avg in prof.key_averages():
        if avg.key.startswith("flashomni::site_"):
            out[avg.key.split("::")[1]] = avg.device_time_total / 1000
    out.update({f"block {k}": v for k, v in block_ms_by_label(prof).items()})
    out["total"] = out["attention"] + out["gemm"] + out["rest"]
    return out


def block_ms_by_label(prof, prefix: str = "flashomni::block ") -> dict:
    """Kernel ms per labelled block: the kernels that start inside the label's range on the device
    timeline, in the same units as :func:`device_ms_by_class` (so shares of its total are consistent).
    The label's own device range is not used: it spans the gaps between the block's kernels too, and its
    key-averaged ``device_time_total`` adds the kernels of the CPU-side range on top (block times
    summed to 1.17x the step's kernel time). Without device events (CPU runs): the labels' CPU time."""
    from torch.autograd import DeviceType

    ranges, kernels = [], []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        if e.name.startswith(prefix):
            ranges.append((e.time_range.start, e.time_range.end, e.name[len(prefix):]))
        elif not getattr(e, "is_user_annotation", False) and not e.name.startswith("flashomni::"):
            kernels.append((e.time_range.start, e.time_range.elapsed_us()))
    if not ranges:
        return {e.name[len(prefix):]: e.cpu_time_total / 1000 for e in prof.events() if e.name.startswith(prefix)}
    ranges.sort()
    starts = [r[0] for r in ranges]
    out = {name: 0.0 for _, _, name in ranges}
    for start, us in kernels:
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and start < ranges[i][1]:
            out[ranges[i][2]] += us / 1000
    return out


_COPY_CALLS = ("cudaMemcpyAsync", "cudaMemcpy")  # host-device copies (device-to-device ones too)
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def calls_by_caller(events, names=_COPY_CALLS) -> dict:
    """``{"op < op < …": count}``: the chain of profiled ops (innermost first, three at most) that issued each
    runtime call named in ``names`` (host-device copies by default), from a profile's ``events()``: what
    named the FLUX-size update step's copies, which its code does not show on a CPU (the argsort of
    ``Symbols.kv_order``)."""
    out: dict = {}
    for e in events:
        if e.name not in names:
            continue
        chain, p = [], getattr(e, "cpu_parent", None)
        while p is not None and len(chain) < 3:
            chain.append(p.name)
            p = getattr(p, "cpu_parent", None)
        key = " < ".join(chain) or "(top level)"
        out[key] = out.get(key, 0) + 1
    return out


@torch.no_grad()
def profile_actions(fn, latent, inputs, steps: int, done: int, warmup: int, interval: int, out_dir: str,
                    tag: str) -> dict:
    """Continue the generation past step ``done`` until one dispatch and one update step were profiled.
    Per profiled step: wall ms, host ms inside each site op, device ms per kernel class; the top of the
    profiler's table (by self CPU time) goes to ``out_dir/profile_<tag>_<action>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    from omni_compile.schedule import step_action

    t = float(timesteps(steps, latent.device)[done - 1]) if done else 1000.0
    res, step = {}, done
    while len(res) < 2 and step < done + 2 * interval + 2:
        act = step_action(step, warmup, interval)
        t = t * 0.9
        kw = inputs(latent, torch.tensor(t, device=latent.device))
        if act in ("dispatch", "update") and act not in res:
            _sync()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(**kw)
                _sync()
            wall = (time.perf_counter() - t0) * 1000
            dev = device_ms_by_class(prof)
            avgs = prof.key_averages()
            host = {a.key: a.cpu_time_total / 1000 for a in avgs if a.key.startswith("flashomni::")}
            calls = {a.key: a.count for a in avgs}
            # host waits on the device during the step (the profiled region's own final sync excluded)
            syncs = sum(calls.get(n, 0) for n in _SYNC_CALLS) - (1 if torch.cuda.is_available() else 0)
            events = prof.events()
            res[act] = dict(wall_ms=wall, device_ms=dev, host_ms=host, host_syncs=max(syncs, 0),
                            memcpy=sum(calls.get(n, 0) for n in _COPY_CALLS),
                            copies_from=calls_by_caller(events), syncs_from=calls_by_caller(events, _SYNC_CALLS))
            if out_dir is not None:
                with open(os.path.join(out_dir, f"profile_{tag}_{act}.txt"), "w") as f:
                    f.write(avgs.table(sort_by="self_cpu_time_total", row_limit=40))
                    f.write("\n\n")
                    f.write(avgs.table(sort_by="self_device_time_total", row_limit=25))
        else:
            fn(**kw)
        step += 1
    return res


# ---- driver ---------------------------------------------------------------------------------------


def configure(state, **changes) -> None:
    if hasattr(state, "configure"):
        state.configure(**changes)
    else:
        state.config = state.config.replace(**changes)
        state.reset()


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def dispatch_figures(state) -> dict:
    """Density of attention work and reused fraction over the loop's dispatch steps (state.report())."""
    rep = state.report()
    d = [s for s in rep.steps if s["action"] == "dispatch"]
    if not d:
        return {"density": 1.0, "reuse": 0.0}
    w = [s.get("work", 1) for s in d]
    tot = sum(w) or 1

    def avg(k, default):
        return sum(s.get(k, default) * x for s, x in zip(d, w)) / tot

    return {"density": avg("density", 1.0), "reuse": avg("reused", 0.0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_e2e")
    ap.add_argument("--model", default="flux", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=None, help="run only the first N steps; project the total")
    ap.add_argument("--configs", default="dense,moderate,aggressive")
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (smoke runs)")
    ap.add_argument("--no-inductor-baseline", action="store_true")
    ap.add_argument("--inductor-graphs", action="store_true",
                    help="also time Inductor with CUDA graphs (mode='reduce-overhead'): the anchor of '+cg' settings")
    ap.add_argument("--clock", default="counted", choices=("counted", "timestep"),
                    help="how the flashomni runtime places calls: 'counted' (OmniConfig.steps set: no host read, the "
                         "host can run ahead) or 'timestep' (one host read of the timestep per call, a device sync)")
    ap.add_argument("--profile", default="aggressive,blocks_aggressive",
                    help="settings whose dispatch and update steps are profiled (device time per kernel class, "
                         "host time in the site ops, host syncs and copies per step)")
    ap.add_argument("--replay", metavar="QUALITY_JSON", default=None,
                    help="the learned model's quality table (omni_compile.bench.quality's quality.json): settings "
                         "r:<setting> replay its rows' recorded densities")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="run the inductor and dense rows (every step dense: the per-step median projects exactly) "
                         "for only this many steps")
    ap.add_argument("--no-pipelined", action="store_true", help="skip the second, pipelined loop of each row")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="narrow model (2 heads of 16), fp32, CPU, no Inductor: checks the driver only")
    ap.add_argument("--replot", metavar="E2E_JSON", default=None,
                    help="measure nothing: write e2e_<model>.md and .png under --out from a saved e2e_<model>.json")
    ap.add_argument("--cp", default="none", choices=parallel.MODES,
                    help="context parallelism over the processes torchrun starts (torchrun --nproc-per-node N "
                         "-m omni_compile.bench.e2e --cp ulysses ...): diffusers' Ulysses or ring attention")
    ap.add_argument("--scaling", nargs="+", metavar="E2E_JSON", default=None,
                    help="measure nothing: write scaling_<model>.md under --out from e2e_<model>.json files of "
                         "runs at several process counts (--cp)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            write_report(args.out, json.load(f))
        return 0
    if args.scaling:
        results = []
        for path in args.scaling:
            with open(path) as f:
                results.append(json.load(f))
        os.makedirs(args.out, exist_ok=True)
        md = scaling_markdown(results)
        with open(os.path.join(args.out, f"scaling_{results[0]['model']}.md"), "w") as f:
            f.write(md)
        print(md)
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("omni_compile.bench.e2e needs a CUDA GPU (--cpu-smoke runs a tiny model on the CPU)", file=sys.stderr)
        return 2
    from omni_compile import OmniConfig, OmniState

    if args.replay:
        from .replay import load_rows

        REPLAY.update(rows=load_rows(args.replay), steps=args.steps)
    rank, world = parallel.init(args.cp)
    lead = rank == 0  # the rank that writes: every rank runs the same loop
    if lead:
        os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.cpu_smoke:
        small = dict(flux=dict(side=128), hunyuan=dict(frames=2, height=16, width=16))[args.model]
        layouts = dict(flux=(1, 8, 8), hunyuan=(2, 8, 8))  # the token grids of those sizes
        model, latent, inputs = MODELS[args.model](device="cpu", dtype=torch.float32, layers=args.layers or 1,
                                                   narrow=True, **small)
    else:
        layouts = TOKEN_LAYOUTS
        model, latent, inputs = MODELS[args.model](layers=args.layers)
    if args.cp != "none":
        parallel.enable(model, args.cp, world)
    res = dict(model=args.model, steps=args.steps, max_steps=args.max_steps, interval=args.interval,
               warmup=args.warmup, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
               triton=__import__("triton").__version__, tokens=None, rows=[], clock=args.clock, cp=args.cp, world=world,
               replay=args.replay)
    print(f"built {args.model} in {time.perf_counter() - t0:.1f} s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params", flush=True)
    all_acts = actions(args.steps, args.warmup, args.interval)
    first = inputs(latent, timesteps(args.steps, latent.device)[0])

    def record(name, fn, state=None, compile_s=None):
        trace: dict = {}
        dense_only = state is None or name in ("dense", "split_dense")
        max_steps = args.baseline_steps if dense_only and args.baseline_steps else args.max_steps
        x, times = run_loop(fn, latent, inputs, args.steps, max_steps, trace=trace)
        row_acts = all_acts if state is None else actions(args.steps, state.config.warmup, state.config.interval,
                                                          state.config.final_dense)
        acts = row_acts[: len(times)] if state is not None else ["dense"] * len(times)
        total, projected = loop_total(times, acts, args.steps, row_acts if state is not None else ["dense"] * args.steps)
        per = {a: statistics.median([t for t, b in zip(times, acts) if b == a]) * 1000 for a in set(acts)}
        host = {a: statistics.median([t for t, b in zip(trace["host"], acts) if b == a]) * 1000 for a in set(acts)}
        row = dict(name=name, total_s=total, projected=projected, step_ms=per, compile_s=compile_s,
                   times_ms=[t * 1000 for t in times], final=x, host_step_ms=host,
                   host_ms=[t * 1000 for t in trace["host"]], gc_ms=[t * 1000 for t in trace["gc"]],
                   device_allocs=trace["device_allocs"])
        if state is not None:
            row.update(dispatch_figures(state))
            row["acts"] = row_acts
            row["memory_mb"] = state.memory_bytes() / 2**20
            row["memory_mb_per_rank"] = parallel.gather(row["memory_mb"], world)  # each rank's own caches
            if name in args.profile.split(",") and state.config.final_dense == 0:
                row["profile"] = profile_actions(fn, latent, inputs, args.steps, len(times), state.config.warmup,
                                                 state.config.interval, args.out if lead else None,
                                                 f"{args.model}_{name.replace(':', '_')}")
                for act, p in row["profile"].items():
                    print(f"    profiled {act}: wall {p['wall_ms']:.1f} ms, device {p['device_ms']}, "
                          f"host in site ops {p['host_ms']}", flush=True)
        if not projected and not args.no_pipelined:
            # the whole loop again without a sync per step (a new generation: reset() for the counted clock)
            if state is not None:
                state.reset()
            xp, row["pipelined_s"], gpu_ms = run_loop_pipelined(fn, latent, inputs, args.steps)
            pacts = row_acts if state is not None else ["dense"] * args.steps
            row["pipelined_gpu_ms"] = gpu_ms
            if gpu_ms:
                row["pipelined_step_ms"] = {a: statistics.median([t for t, b in zip(gpu_ms, pacts) if b == a])
                                            for a in set(pacts)}
            row["pipelined_err"] = rel_l2(xp, x)  # the same computation: 0 unless the loop depends on timing
        res["rows"].append(row)
        print(f"  {name}: total {total:.2f} s{' (projected)' if projected else ''}"
              + (f", pipelined {row['pipelined_s']:.2f} s (rel L2 vs synced {row['pipelined_err']:.1e})"
                 if "pipelined_s" in row else "")
              + f", per-step ms {per}; host queued the step in {host} ms; gc {sum(row['gc_ms']):.1f} ms, new device "
              f"segments {sum(row['device_allocs'])}", flush=True)
        return row

    def finalize_rows():
        """Speedups vs Inductor, ideal speedups from the dense profiles, errors vs the dense settings."""
        prof_i = res.get("profile_inductor")
        prof_o = res.get("profile_flashomni_dense") or res.get("profile_split_dense")
        dense_row = next((r for r in res["rows"] if r["name"] == "dense"), None)
        for r in res["rows"]:
            n_disp = r.get("acts", all_acts).count("dispatch")
            if base:
                r["speedup"] = base["total_s"] / r["total_s"]
                r["err_vs_inductor"] = rel_l2(r["final"], base["final"])
                if "pipelined_s" in r and "pipelined_s" in base:
                    r["speedup_pipelined"] = base["pipelined_s"] / r["pipelined_s"]
            if dense_row is not None and r is not dense_row and r["name"] != "inductor":
                r["err_vs_dense"] = rel_l2(r["final"], dense_row["final"])
            cg = next((x for x in res["rows"] if x["name"] == "inductor_cg"), None)
            if cg is not None and r is not cg:
                r["speedup_vs_inductor_cg"] = cg["total_s"] / r["total_s"]
            if r["name"] in ("inductor", "inductor_cg", "dense", "split_dense") or not (prof_i and base and prof_o) or not prof_i["total"]:
                continue
            # the ideal starts from the faster dense step: Inductor's, or the rewritten graph's own with every
            # tile computed when that ran in this run and is faster (HunyuanVideo: 1.25x, the mask dropped),
            # so no setting gets credit for what the dense path already gained
            t_step, prof, r["ideal_base"] = base["total_s"] / args.steps, prof_i, "inductor"
            own = next((x for x in res["rows"] if x["name"] == ("split_dense" if "blocks" in r else "dense")), None)
            if own is not None and own["total_s"] < base["total_s"]:
                t_step, prof, r["ideal_base"] = own["total_s"] / args.steps, prof_o, own["name"]
            kept = 1.0 - r.get("cached_share", 0.0)  # device-time share of the blocks that still run
            site_saved = prof["attention"] / prof["total"] * (1 - r["density"])
            site_saved += (prof_o.get("site_linear_q", 0) + prof_o.get("site_linear_o", 0)) / prof_o["total"] * r["reuse"]
            ideal_disp = t_step * kept * (1 - site_saved)
            ideal_total = args.steps * t_step - n_disp * (t_step - ideal_disp)
            r["ideal_speedup"] = base["total_s"] / ideal_total
            r["of_ideal"] = r["speedup"] / r["ideal_speedup"]

    def write(partial: bool):
        if not lead:
            return
        finalize_rows()  # partial files too: a run cut off by a time limit still reports its speedups
        out = dict(res, partial=partial, rows=[{k: v for k, v in r.items() if k != "final"} for r in res["rows"]])
        with open(os.path.join(args.out, f"e2e_{args.model}.json"), "w") as f:
            json.dump(out, f, indent=1)
        md = write_report(args.out, out)
        if not partial:
            print(md)

    def check_dense() -> bool:
        dense_row = next((r for r in res["rows"] if r["name"] == "dense"), None)
        bad = dense_row is not None and base is not None and dense_row["err_vs_inductor"] > 0.05
        if bad:
            print(f"policy='dense' final latent differs from Inductor's: rel L2 {dense_row['err_vs_inductor']:.3g}",
                  file=sys.stderr)
        return bad

    base = None
    if not args.no_inductor_baseline:
        ind = torch.compile(model)
        t1 = time.perf_counter()
        ind(**first)
        _sync()
        c = time.perf_counter() - t1
        run_loop(ind, latent, inputs, 2)
        print(f"inductor compile {c:.1f} s", flush=True)
        res["profile_inductor"] = profile_step(ind, first)
        base = record("inductor", ind, compile_s=c)
        del ind
        torch._dynamo.reset()
        if args.inductor_graphs:
            # the other anchor: Inductor with CUDA graphs (every step replayed, dense)
            ind = torch.compile(model, mode="reduce-overhead")
            t1 = time.perf_counter()
            ind(**first)
            _sync()
            c = time.perf_counter() - t1
            run_loop(ind, latent, inputs, 3)  # cudagraph trees record on the second and later calls
            print(f"inductor reduce-overhead compile {c:.1f} s", flush=True)
            record("inductor_cg", ind, compile_s=c)
            del ind
            torch._dynamo.reset()

    # the smoke model has ~100 tokens: blocks of 16 so that text and vision blocks both exist
    smoke_blocks = dict(block_q=16, block_kv=16) if args.cpu_smoke else {}
    names = args.configs.split(",")
    split_names = [n for n in names if setting(n, args.model, layouts).get("block_cache") is not None
                   or n == "split_dense"]
    omni = state = None

    def cached_blocks(row, blocks_ms, prof):
        cached = [b.name for b in state.blocks if b.skipped_calls > 0]
        row["blocks_cached"] = len(cached)
        row["blocks"] = len(state.blocks)
        row["cached_share"] = sum(blocks_ms.get(n, 0.0) for n in cached) / max(prof["total"], 1e-9)
        write(partial=True)

    def compile_omni(cuda_graphs: bool, split: bool):
        """A flashomni compile of ``model`` for a group of settings: block caching splits the graph and CUDA
        graphs wrap it at compile time, so each combination gets its own compile."""
        nonlocal omni, state
        omni = None
        torch._dynamo.reset()
        state = OmniState(OmniConfig(policy="dense", interval=args.interval, warmup=args.warmup,
                                      block_cache=FixedBlocks(0.5) if split else None, cuda_graphs=cuda_graphs,
                                      use_inductor=not args.cpu_smoke, **smoke_blocks))
        omni = torch.compile(model, backend="flashomni", options={"state": state})
        t1 = time.perf_counter()
        omni(**first)  # a dense step: every region runs (and compiles)
        _sync()
        c = time.perf_counter() - t1
        print(f"flashomni compile{' with CUDA graphs' if cuda_graphs else ''}"
              f"{f', split at {len(state.blocks)} blocks' if split else ''}: {c:.1f} s: {state.summary()}", flush=True)
        res.setdefault("sites", state.summary())
        state.reset()
        return c

    if any(n not in split_names and not n.endswith(CUDA_GRAPHS) for n in names):
        c = compile_omni(False, False)
        res["profile_flashomni_dense"] = profile_step(omni, first)
        state.reset()
    defaults = dict(policy="dense", block_cache=None, token_layout=None)

    def clock(steps):
        return dict(steps=steps) if args.clock == "counted" else {}

    def run_setting(name, compile_s):
        from omni_compile.ops import _launch

        changes = {**defaults, **setting(name, args.model, layouts)}
        from .replay import Replay

        if isinstance(changes["policy"], Replay):
            changes["policy"] = changes["policy"].bound(len(state.sites))
        # the row's own schedule (a replayed row), else the command line's
        sched = dict(warmup=changes.pop("warmup", args.warmup), interval=changes.pop("interval", args.interval))
        changes.pop("steps", None)
        profiled = name in args.profile.split(",")
        tritons_own = name.endswith(TRITON_LAUNCH)
        try:
            with _launch.launch_cache(False) if tritons_own else contextlib.nullcontext():
                # a 4-step generation (update, dispatch, update, dispatch) first, so Triton's JIT compiles
                # every kernel the setting uses before the timed loop: the second update is the first with
                # Taylor differences, and GEMM-O specialises on how many cache-bias terms it sums (a 1.2-1.4 s
                # compile inside the timed FLUX loops of 2026-11-23, when this warm-up stopped after one
                # dispatch)
                configure(state, **dict(changes, final_dense=0), warmup=1, interval=2, **clock(4))
                run_loop(omni, latent, inputs, 4)
                if changes.get("final_dense"):  # the final dense steps need the loop's own length
                    profiled = False
                    configure(state, **changes, **sched, steps=args.steps)
                else:  # profile_actions runs past the loop
                    configure(state, **changes, **sched,
                              **clock(args.steps + (2 * sched["interval"] + 2 if profiled else 0)))
                row = record(name, omni, state, compile_s=compile_s)
        except Exception as e:  # one broken setting must not lose the others' numbers
            import traceback

            traceback.print_exc()
            print(f"  {name}: FAILED ({type(e).__name__}: {e})", flush=True)
            res.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
            return None
        row["launch_cache"] = not tritons_own
        if isinstance(changes["policy"], Replay):
            row["what"] = (f"recorded-density replay of {changes['policy'].source!r}"
                           + (f", block_cache={changes['block_cache']!r}" if changes.get("block_cache") else "")
                           + f", interval {sched['interval']}, warm-up {sched['warmup']}"
                           + (f", final dense {changes['final_dense']}" if changes.get("final_dense") else ""))
        write(partial=True)
        return row

    for name in [n for n in names if n not in split_names and not n.endswith(CUDA_GRAPHS)]:
        run_setting(name, c if name == names[0] else None)

    if split_names:
        c = compile_omni(False, True)
        prof = profile_step(omni, first)
        blocks_ms = {k[len("block "):]: v for k, v in prof.items() if k.startswith("block ")}
        res["profile_split_dense"] = {k: v for k, v in prof.items() if not k.startswith("block ")}
        res["block_ms"] = blocks_ms
        for name in [n for n in split_names if not n.endswith(CUDA_GRAPHS)]:
            row = run_setting(name, c if name == split_names[0] else None)
            if row is not None:
                cached_blocks(row, blocks_ms, prof)

    for split in (False, True):
        graphed = [n for n in names if n.endswith(CUDA_GRAPHS) and (n in split_names) == split]
        if not graphed:
            continue
        c = compile_omni(True, split)
        for name in graphed:
            row = run_setting(name, c if name == graphed[0] else None)
            if row is not None and split and res.get("block_ms"):
                cached_blocks(row, res["block_ms"], res["profile_split_dense"])
    write(partial=False)
    failed = check_dense()
    parallel.finish(world)
    return 1 if failed else 0


def scaling_markdown(results: list) -> str:
    """Loop seconds of every setting at each process count, and speedups against Inductor with the same
    parallel config and against Inductor on one process (``--scaling``)."""
    results = sorted(results, key=lambda r: r.get("world", 1))
    base = {r.get("world", 1): next((x["total_s"] for x in r["rows"] if x["name"] == "inductor"), None) for r in results}
    one = base.get(1)
    names = [x["name"] for x in results[0]["rows"]]
    for r in results[1:]:
        names += [x["name"] for x in r["rows"] if x["name"] not in names]
    head = " | ".join(f"{r.get('world', 1)}× {r.get('cp', 'none')}" for r in results)
    lines = [f"{results[0]['model']}: {results[0]['steps']} steps, {results[0]['device']}; loop seconds "
             "(speedup against Inductor with the same parallel config; against Inductor on one process)", "",
             f"| setting | {head} |", "|---|" + "---:|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            row = next((x for x in r["rows"] if x["name"] == name), None)
            if row is None:
                cells.append("—")
                continue
            b = base.get(r.get("world", 1))
            cell = f"{row['total_s']:.2f}{'*' if row.get('projected') else ''}"
            parts = [f"{b / row['total_s']:.2f}x" if b else None, f"{one / row['total_s']:.2f}x" if one else None]
            if any(parts):
                cell += " (" + "; ".join(p or "—" for p in parts) + ")"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, res: dict) -> str:
    """Write ``e2e_<model>.md`` and ``e2e_<model>.png`` for a result under ``out_dir``; returns the markdown."""
    from . import figures

    os.makedirs(out_dir, exist_ok=True)
    md = markdown(res)
    with open(os.path.join(out_dir, f"e2e_{res['model']}.md"), "w") as f:
        f.write(md)
    figures.write(figures.e2e_charts(res), os.path.join(out_dir, f"e2e_{res['model']}.png"))
    return md


def markdown(res: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    par = (f"; context parallel: {res['cp']} over {res['world']} processes (rank 0's times)"
           if res.get("cp", "none") != "none" else "")
    lines = [f"{res['model']}: {res['steps']} steps, interval {res['interval']}, warm-up {res['warmup']}, "
             f"{res['device']}, torch {res['torch']}, triton {res['triton']}; sites: {res.get('sites')}{par}", ""]
    for key in ("profile_inductor", "profile_flashomni_dense"):
        p = res.get(key)
        if p:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in p.items())
            lines.append(f"- {key} (device ms): {parts}")
    for r in res["rows"]:
        for act, p in (r.get("profile") or {}).items():
            lines.append(f"- {r['name']}, one {act} step profiled: wall {p['wall_ms']:.1f} ms, device "
                         + ", ".join(f"{k} {v:.1f}" for k, v in p["device_ms"].items())
                         + f" ms; host syncs {p.get('host_syncs', '?')}, host-device copies {p.get('memcpy', '?')}"
                         + "".join(f"; {what} from {v}" for what, v in (("copies", p.get("copies_from")),
                                                                         ("syncs", p.get("syncs_from"))) if v))
    if res.get("block_ms"):
        total = (res.get("profile_split_dense") or {}).get("total")
        lines.append(f"- blocks (kernel ms, split graph, dense step): {len(res['block_ms'])} blocks, "
                     f"{sum(res['block_ms'].values()):.1f} ms in all"
                     + (f" of the step's {total:.1f}" if total else ""))
    cg = any(r["name"] == "inductor_cg" for r in res["rows"])  # the CUDA-graph anchor's column when it ran
    lines += ["", "| setting | loop s | pipelined s | dense ms | update ms | dispatch ms | density | reuse | blocks cached | "
              "speedup | pipelined speedup | " + ("vs Inductor+CUDA graphs | " if cg else "")
              + "ideal | of ideal | rel L2 vs dense | compile s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cg else "") + "---:|---:|---:|---:|"]
    for r in res["rows"]:
        sm = r["step_ms"]
        lines.append(
            f"| {r['name']} | {r['total_s']:.2f}{'*' if r['projected'] else ''} | {f(r.get('pipelined_s'), '.2f')} | "
            f"{f(sm.get('dense'), '.1f')} | "
            f"{f(sm.get('update'), '.1f')} | {f(sm.get('dispatch'), '.1f')} | {f(r.get('density'), '.3f')} | "
            f"{f(r.get('reuse'), '.2f')} | {str(r['blocks_cached']) + '/' + str(r['blocks']) if 'blocks' in r else '—'} | "
            f"{f(r.get('speedup'), '.2f')} | {f(r.get('speedup_pipelined'), '.2f')} | "
            + (f"{f(r.get('speedup_vs_inductor_cg'), '.2f')} | " if cg else "") + f"{f(r.get('ideal_speedup'), '.2f')} | "
            f"{f(r.get('of_ideal'), '.0%')} | {f(r.get('err_vs_dense', r.get('err_vs_inductor')), '.2e')} | "
            f"{f(r.get('compile_s'), '.0f')} |")
    lines.append("")
    lines.append("`*` projected from per-action median step times (`--max-steps`). *Loop s* syncs after every step "
                 "(per-step times); *pipelined s* runs the same loop again with one sync at the end, as a pipeline "
                 f"does (not for projected rows); flashomni clock: {res.get('clock', 'timestep')}.")
    lines.append("")
    for r in res["rows"]:
        if r.get("what"):
            lines.append(f"- {r['name']}: {r['what']}")
    for r in res["rows"]:
        if r.get("host_step_ms"):
            lines.append(f"- {r['name']}: the host had queued a step after (median ms) "
                         + ", ".join(f"{a} {v:.1f}" for a, v in sorted(r["host_step_ms"].items()))
                         + " (wall: " + ", ".join(f"{a} {v:.1f}" for a, v in sorted(r["step_ms"].items()))
                         + f"); garbage collector {sum(r.get('gc_ms', [])):.1f} ms in the loop; "
                         f"{sum(r.get('device_allocs', []))} new device segments"
                         + ("; pipelined, a step took the GPU (median ms) "
                            + ", ".join(f"{a} {v:.1f}" for a, v in sorted(r["pipelined_step_ms"].items()))
                            if r.get("pipelined_step_ms") else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
