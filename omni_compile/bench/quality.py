"""Quality of the update–dispatch runtime on the learned zoo model: density, PSNR/SSIM vs dense, detector.

    python -m omni_compile.bench.quality --out docs/zoo [--captions 64] [--steps 28] [--settings dense,flashomni,...]

Samples the fixed evaluation captions (``data.eval_captions(n)``, caption ``i`` seeded ``seed + i``) with the
shipped zoo model once dense (eager diffusers attention: the reference) and, for each setting, through
``torch.compile(transformer, backend="flashomni", options={"state": OmniState(OmniConfig(...))})`` (compiled
once per setting, ``use_inductor=False`` unless ``--inductor``, ``torch._dynamo.reset()`` between settings),
with the sampler's defaults (28 steps, batched CFG, guidance from the shipped ``config.json``). Per setting
it reports

* **density**: the fraction of the dense attention work done, from ``state.report()`` (work-weighted over
  every attention call of the whole loop: dense and update steps count 1), and the same over dispatch
  steps only;
* **PSNR** (dB, signal range 1, per image then averaged) and **SSIM** (:func:`ssim` below:
  11x11 Gaussian window, sigma 1.5, on [0, 1] RGB, mean over channels and images) of the final images
  against the dense sampler's images;
* the **detector's object accuracy** (position + colour + shape, as in ``zoo.evaluate``) and caption-exact
  rate on the generated images.

Writes ``quality.json`` and ``quality.md`` into ``--out`` after every setting (so a partial run leaves a
partial table), ``quality_samples.png`` (dense row vs each setting for the first captions) at the end, and
prints progress. Block size 64 by default: the sequence is 1,036 tokens (12 text + 1,024 image), 17 blocks;
block 0 holds the 12 text tokens and 52 image tokens, so it counts as a text block (never reused, its keys
never skipped), and the last block holds 12 image tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from omni_compile import ComputedShare, FixedBlocks, ResidualChange
from omni_compile.policies import Fixed, FlashOmni
from omni_compile.tune import psnr, ssim  # noqa: F401  (the metrics' home; re-exported for the lab)

from ..zoo import data as zdata
from ..zoo import detector as zdet
from ..zoo import sampler as zsampler

# ---- image metrics -----------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


# ---- faster CPU runs ------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_fast_paths(enabled: bool = True):
    """Faster CPU quality runs with the same results: while active, the runtime's dense and update steps on
    the CPU run PyTorch's SDPA and ``F.linear`` (as on CUDA) instead of the ops' reference, and the ops'
    attention reference (the CPU path of dispatch steps) is replaced by SDPA with the symbols' block mask
    expanded to tokens. The reference walks query blocks, masking a copy of ``v`` per block to keep
    non-finite skipped values out (a guarantee quality runs, whose inputs are finite, do not need); SDPA
    does the same arithmetic in one fused call, about 2–3x faster on the zoo model's dispatch steps and 7x
    on its dense ones. Outputs agree with the reference to ~3e-7 (tests/test_quality.py). Not used under
    Triton's interpreter or on CUDA (both keep their paths); the log-sum-exp the replacement returns is
    NaN (no runtime path reads it)."""
    if not enabled:
        yield
        return
    from omni_compile import runtime
    from omni_compile.ops import _common
    from omni_compile.ops import attention as ops_attention

    dense_attention, dense_linear = runtime._dense_attention, runtime._dense_linear
    reference = ops_attention.sparse_attention_reference

    def fast_dense_attention(state, q, k, v, scale):
        if q.is_cuda or _common.use_triton(q):
            return dense_attention(state, q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def fast_dense_linear(state, x, weight, bias, head_dim, row_offset, seq_q, kind):
        if x.is_cuda or _common.use_triton(x):
            return dense_linear(state, x, weight, bias, head_dim, row_offset, seq_q, kind)
        return F.linear(x, weight, bias)

    def fast_reference(q, k, v, reuse_bits, skip_bits, block_q, block_kv, scale, compute_dtype=torch.float32):
        return masked_sdpa(q, k, v, reuse_bits, skip_bits, block_q, block_kv, scale, compute_dtype)

    runtime._dense_attention, runtime._dense_linear = fast_dense_attention, fast_dense_linear
    ops_attention.sparse_attention_reference = fast_reference
    try:
        yield
    finally:
        runtime._dense_attention, runtime._dense_linear = dense_attention, dense_linear
        ops_attention.sparse_attention_reference = reference


def masked_sdpa(q, k, v, reuse_bits, skip_bits, block_q: int, block_kv: int, scale: float,
                compute_dtype=torch.float32):
    """What ``ops.sparse_attention_reference`` computes, for finite inputs, through one SDPA call: each
    (query block, head) tile attends to the key blocks its bits keep; reused tiles and rows that keep no
    key are zero. Returns ``(out in q.dtype, NaN log-sum-exp)``."""
    from omni_compile.ops.symbols import unpack_bits

    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    n_q, n_k = -(-Sq // block_q), -(-Skv // block_kv)
    keep = ~unpack_bits(skip_bits, n_k) & ~unpack_bits(reuse_bits, n_q).unsqueeze(-1)  # [B, H, nQ, nK]
    # an additive mask, expanded from the blocks by one copy (a bool mask would be converted inside SDPA)
    add = torch.zeros(keep.shape, dtype=compute_dtype, device=q.device).masked_fill_(~keep, float("-inf"))
    mask = add[:, :, :, None, :, None].expand(B, H, n_q, block_q, n_k, block_kv)
    mask = mask.reshape(B, H, n_q * block_q, n_k * block_kv)[:, :, :Sq, :Skv]
    out = F.scaled_dot_product_attention(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype),
                                         attn_mask=mask, scale=scale)
    rows = keep.any(-1).repeat_interleave(block_q, -1)[..., :Sq].unsqueeze(-1)
    out = torch.where(rows, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(q.dtype), torch.full((B, H, Sq), float("nan"), device=q.device)


# ---- the quality table ---------------------------------------------------------------------------------

# the named attention-site settings keep the whole graph (no block caching) unless they name a rule
_BASE = dict(interval=5, warmup=8, taylor_order=1, block_cache=None)

# name -> OmniConfig fields (besides block size / use_inductor); None = the dense eager reference
SETTINGS: Dict[str, Optional[dict]] = {
    "dense": None,
    "default": {},  # what OmniConfig() gives (its docstring: the default chosen from this table)
    "flashomni": dict(_BASE, policy=FlashOmni(tau_q=0.5, tau_kv=0.05)),
    "aggressive": dict(_BASE, policy=FlashOmni(tau_q=0.8, tau_kv=0.15)),
    "fixed": dict(_BASE, policy=Fixed(reuse=0.3, skip=0.5)),
    "interval3": dict(_BASE, policy=FlashOmni(tau_q=0.5, tau_kv=0.05), interval=3),
    "dense-backend": dict(policy="dense", block_cache=None),  # sanity check: the backend with every tile computed
    # whole-block caching, alone (sites dense) and with attention sparsity in the blocks that run
    "blocks-fixed": dict(_BASE, policy="dense", block_cache=FixedBlocks(0.5)),
    "blocks-change": dict(_BASE, policy="dense", block_cache=ResidualChange()),
    "flashomni+blocks-fixed": dict(_BASE, policy=FlashOmni(), block_cache=FixedBlocks(0.5)),
    "flashomni+blocks-change": dict(_BASE, policy=FlashOmni(), block_cache=ResidualChange()),
    "flashomni+blocks-sq": dict(_BASE, policy=FlashOmni(), block_cache=ComputedShare()),
    "aggressive+blocks-fixed": dict(_BASE, policy=FlashOmni(tau_q=0.8, tau_kv=0.15), block_cache=FixedBlocks(0.5)),
}


def _strategy_settings() -> Dict[str, dict]:
    """The shipped strategies (docs/policies.md) with the zoo's grid: 32 x 32 image tokens after 12 text."""
    from .presets import STRATEGIES, strategy_policy

    base = dict(_BASE, token_layout=(1, 32, 32))
    return {f"policy:{n}": dict(base, policy=strategy_policy(n, (1, 32, 32))) for n in STRATEGIES if n != "dense"}


SETTINGS.update(_strategy_settings())
DEFAULT_SETTINGS = ("dense", "flashomni", "aggressive", "fixed", "interval3")


def parse_setting(spec: str) -> Tuple[str, Optional[dict]]:
    """A setting by name (:data:`SETTINGS`), or ``name=field=value;field=value`` with Python expressions
    over the config objects (``"t=policy=FlashOmni(tau_q=0.6);interval=4;block_cache=ResidualChange(0.2)"``),
    on top of the table's base (warm-up 8, interval 5, Taylor order 1)."""
    if spec in SETTINGS:
        return spec, SETTINGS[spec]
    if "=" not in spec:
        raise ValueError(f"unknown setting {spec!r}; choose from {', '.join(SETTINGS)} or give name=field=value;...")
    name, _, body = spec.partition("=")
    import omni_compile
    from omni_compile import policies

    env = {k: getattr(policies, k) for k in policies.__all__ if not k.startswith("_")}
    env.update(FixedBlocks=FixedBlocks, ComputedShare=ComputedShare, ResidualChange=ResidualChange,
               OmniConfig=omni_compile.OmniConfig)
    fields = dict(_BASE)
    for part in body.split(";"):
        if part.strip():
            key, _, expr = part.partition("=")
            fields[key.strip()] = eval(expr, {"__builtins__": {}}, env)  # a command-line expression, by design
    return name, fields


def image_metrics(images: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR (range 1, per image, averaged; ``inf`` for identical images) and SSIM vs ``ref``, ``[N, 3, H, W]``."""
    per = [psnr(images[i], ref[i], data_range=1.0) for i in range(len(ref))]
    return dict(psnr=sum(per) / len(per), psnr_min=min(per), ssim=ssim(images, ref, data_range=1.0))


def density_figures(state, traces=None) -> dict:
    """Work figures of a setting: from ``traces`` (one :class:`omni_compile.tune.Trace` per generation,
    averaged) when given, else from ``state.report()`` (its last generations)."""
    if traces:
        from omni_compile.tune import Trace, WorkModel

        tr = Trace.mean(traces)
        disp = [s for s, a in enumerate(tr.actions) if a == "dispatch"]
        ran = [c for s in disp for c in tr.cells[s] if c.ran > 0]
        w_ran = sum(w for s in disp for c, w in zip(tr.cells[s], tr.site_work) if c.ran > 0)
        row = dict(density=tr.attention_work(), dispatch_density=tr.attention_work(dispatch_only=True),
                   dispatch_steps=len(disp), cached_share=tr.cached_share(),
                   reused_dispatch=(sum(c.reuse * w for s in disp for c, w in zip(tr.cells[s], tr.site_work)
                                        if c.ran > 0) / w_ran) if w_ran else 0.0,
                   cache_mib=state.memory_bytes() / 2**20 if state is not None else 0.0,
                   trace=tr.to_dict())
        for key, model in (("flux", WorkModel.flux_h200()), ("hunyuan", WorkModel.hunyuan_h200())):
            cfg = state.config if state is not None else None
            p = model.predict(tr, steps=50, warmup=cfg.warmup if cfg else 8, interval=cfg.interval if cfg else 5,
                              final_dense=getattr(cfg, "final_dense", 0) if cfg else 0)
            row[f"ideal_{key}"] = p["speedup"]
        row["sites_ran"] = len(ran)
        return row
    rep = state.report()
    disp = [s for s in rep.steps if s["action"] == "dispatch"]
    w = sum(s["work"] for s in disp)
    return dict(density=rep.density(),
                dispatch_density=(sum(s["density"] * s["work"] for s in disp) / w) if w else 1.0,
                dispatch_steps=len({(s["generation"], s["step"]) for s in disp}),
                reused_dispatch=(sum(s["reused"] * s["work"] for s in disp) / w) if w else 0.0,
                cache_mib=rep.memory_bytes / 2**20)


class _BlockLog:
    """The block-cache decisions of a generation, read from the block records between steps (host values,
    no device read): per block, the update step, the cache bit and the figure its rule compared."""

    def __init__(self, state):
        self.state = state
        self.seen: Dict[tuple, dict] = {}

    def __call__(self, i=None, sigma=None) -> None:
        for b in getattr(self.state, "blocks", []) or []:
            for key, bs in b.streams.items():
                if bs.update_step is not None and bs.cached is not None:
                    self.seen[(b.order, key[0], bs.update_step)] = dict(
                        block=b.order, stream=key[0], update=bs.update_step, cached=bool(bs.cached),
                        change=bs.change, computed=bs.computed)

    def rows(self) -> List[dict]:
        self()
        return [self.seen[k] for k in sorted(self.seen)]


def sample_setting(zoo, captions: Sequence[str], setting: Optional[dict], *, steps: int, seed: int = 0,
                   batch: int = 8, block: int = 64, use_inductor: bool = False, device=None, dtype=None,
                   cfg: str = "batched", guidance: Optional[float] = None,
                   on_chunk: Optional[Callable[[int], None]] = None, record: Optional[dict] = None):
    """Images for ``captions`` (chunks of ``batch``; caption ``i`` seeded ``seed + i``) with ``setting``
    (``None``: eager dense) and the ``OmniState`` used (``None`` for eager). ``record`` (a dict), for a
    runtime setting: gets ``traces`` (one :class:`omni_compile.tune.Trace` per chunk, each chunk being one
    generation) and ``blocks`` (the block-cache decisions of every chunk)."""
    import omni_compile
    from omni_compile.tune import trace

    state = None
    model = zoo.transformer
    if setting is not None:
        torch._dynamo.reset()
        fields = dict(block_q=block, block_kv=block, use_inductor=use_inductor)
        fields.update(setting)
        state = omni_compile.OmniState(omni_compile.OmniConfig(**fields))
        model = torch.compile(zoo.transformer, backend="flashomni", options={"state": state})
    chunks = []
    for i in range(0, len(captions), batch):
        log = _BlockLog(state) if state is not None else None
        chunks.append(zsampler.sample(model, zoo.text_encoder, list(captions[i:i + batch]), config=zoo.config,
                                      num_inference_steps=steps, guidance_scale=guidance, cfg=cfg, seed=seed + i,
                                      device=device, dtype=dtype, on_step=log))
        if record is not None and state is not None:
            record.setdefault("traces", []).append(trace(state))
            record.setdefault("blocks", []).extend(dict(r, chunk=i // batch) for r in log.rows())
        if on_chunk is not None:
            on_chunk(i + len(chunks[-1]))
    return torch.cat(chunks), state


def evaluate_setting(images: torch.Tensor, ref: torch.Tensor, requested, state=None, record=None) -> dict:
    acc = zdet.accuracy(requested, images)
    row = dict(image_metrics(images, ref), object_accuracy=acc["object"], caption_exact=acc["caption_exact"],
               extra_per_image=acc["extra_per_image"])
    if state is None:
        row.update(dict(density=1.0, dispatch_density=1.0, dispatch_steps=0, reused_dispatch=0.0, cache_mib=0.0,
                        cached_share=0.0, ideal_flux=1.0, ideal_hunyuan=1.0))
    else:
        row.update(density_figures(state, (record or {}).get("traces")))
        if record and record.get("blocks"):
            row["block_decisions"] = record["blocks"]
    return row


def run_quality(captions: Sequence[str], settings: Sequence[Union[str, Tuple[str, Optional[dict]]]] = DEFAULT_SETTINGS, *, steps: Optional[int] = None,
                seed: int = 0, batch: int = 8, block: int = 64, use_inductor: bool = False, zoo=None,
                device=None, dtype=None, cfg: str = "batched", guidance: Optional[float] = None,
                on_row: Optional[Callable[[dict], None]] = None, log: Callable[[str], None] = lambda s: None,
                fast_cpu: bool = True, reference: Optional[torch.Tensor] = None) -> dict:
    """The quality table (``rows``, one per setting) and the images (``images``: name -> ``[N, 3, S, S]``).

    ``settings``: names from ``SETTINGS`` or ``(name, OmniConfig fields)`` pairs (``None`` fields: the
    eager dense reference itself). The dense reference is sampled first, unless ``reference`` (its images,
    e.g. from an earlier run with the same captions, steps and seed) is given. ``fast_cpu``: run under
    :func:`cpu_fast_paths` (same results, faster on a CPU)."""
    zoo = zoo or zsampler.load_zoo(device=device or "cpu", dtype=dtype or torch.float32)
    steps = int(steps or zoo.config["sampler"]["num_inference_steps"])
    guidance = float(zoo.config["sampler"]["guidance_scale"] if guidance is None else guidance)
    requested = [zdata.parse_caption(c) for c in captions]
    kw = dict(steps=steps, seed=seed, batch=batch, block=block, use_inductor=use_inductor, device=device,
              dtype=dtype, cfg=cfg, guidance=guidance)

    def timed(name, setting, record=None):
        t0 = time.time()
        with cpu_fast_paths(fast_cpu):
            imgs, st = sample_setting(zoo, captions, setting, record=record, on_chunk=lambda n: log(
                f"{name}: {n}/{len(captions)} captions, {time.time() - t0:.0f}s"), **kw)
        return imgs, st, time.time() - t0

    if reference is not None:
        ref, ref_s = reference, float("nan")
    else:
        ref, _, ref_s = timed("dense", None)
    images = {"dense": ref}
    rows = []
    for item in settings:
        name, setting = parse_setting(item) if isinstance(item, str) else item
        record: dict = {}
        if setting is None:
            imgs, st, secs = ref, None, ref_s
        else:
            imgs, st, secs = timed(name, setting, record)
            images[name] = imgs
        row = dict(setting=name, config=setting, seconds=round(secs, 1),
                   **evaluate_setting(imgs, ref, requested, st, record))
        rows.append(row)
        log(f"{name}: " + _fmt(row))
        if on_row is not None:
            on_row(row)
    return dict(rows=rows, images=images, steps=steps, guidance=guidance, cfg=cfg, block=block, seed=seed,
                captions=list(captions))


def _num(v, fmt):
    return "inf" if isinstance(v, float) and math.isinf(v) else format(v, fmt)


def _fmt(r: dict) -> str:
    return (f"work {r['density']:.3f} (dispatch {r['dispatch_density']:.3f}, blocks cached "
            f"{r.get('cached_share', 0.0):.2f}), PSNR {_num(r['psnr'], '.2f')} dB, SSIM {r['ssim']:.4f}, "
            f"object acc {r['object_accuracy']:.3f}, ideal FLUX {r.get('ideal_flux', 1.0):.2f}x / "
            f"Hunyuan {r.get('ideal_hunyuan', 1.0):.2f}x, {r['seconds']}s")


def describe(config: Optional[dict]) -> str:
    """A setting's fields in a table cell (what differs from the table's base)."""
    if config is None:
        return "dense (eager, reference)"
    if not config:  # "default": OmniConfig() as it comes
        from omni_compile.config import OmniConfig

        c = OmniConfig()
        return f"the defaults: `{c.policy!r}`, `{c.block_cache!r}`"
    if config.get("policy") == "dense" and config.get("block_cache") is None:
        return 'backend, policy="dense"'
    parts = [f"`{config['policy']!r}`" if config.get("policy") != "dense" else "sites dense"]
    bc = config.get("block_cache")
    if bc is not None:
        parts.append(f"`{bc!r}`")
    for key, base in (("interval", 5), ("warmup", 8), ("taylor_order", 1), ("final_dense", 0)):
        if config.get(key, base) != base:
            parts.append(f"{key} {config[key]}")
    return ", ".join(parts)


def _describe(row: dict) -> str:
    return describe(row["config"])


def markdown(meta: dict, rows: List[dict]) -> str:
    lines = [
        f"Zoo model, {meta['n_captions']} evaluation captions (`data.eval_captions({meta['n_captions']})`, seeds "
        f"{meta['seed']}..{meta['seed'] + meta['n_captions'] - 1}), {meta['steps']} steps, CFG {meta['cfg']} "
        f"(guidance {meta['guidance']:g}), block {meta['block']}, warm-up 8, interval 5, Taylor order 1 unless "
        f"stated, use_inductor={meta['use_inductor']}, {meta['device']} {meta['dtype']}. *Work*: fraction of the "
        "dense loop's attention work done, sites of cached blocks counting 0; *ideal*: the work model of a dense "
        "step's profile at full size (`omni_compile.tune.WorkModel`), 50 steps, against Inductor.",
        "",
        "| setting | work (loop) | work (dispatch steps) | blocks cached (dispatch) | PSNR dB vs dense (min) "
        "| SSIM vs dense | object acc. | caption exact | ideal FLUX | ideal Hunyuan | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']}: {_describe(r)} | {r['density']:.3f} | {r['dispatch_density']:.3f} | "
            f"{r.get('cached_share', 0.0):.2f} | "
            f"{_num(r['psnr'], '.2f')} ({_num(r['psnr_min'], '.2f')}) | {r['ssim']:.4f} | {r['object_accuracy']:.3f} | "
            f"{r['caption_exact']:.3f} | {r.get('ideal_flux', 1.0):.2f} | {r.get('ideal_hunyuan', 1.0):.2f} | "
            f"{_num(r['seconds'], '.0f')} |")
    if meta.get("partial"):
        lines += ["", f"*(partial: {len(rows)} of {len(meta['settings'])} settings done)*"]
    return "\n".join(lines) + "\n"


def split_settings(text: str) -> List[str]:
    """``--settings`` items: split at commas outside parentheses (a spec's policy takes several knobs)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [x for x in out if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for quality.json / quality.md / quality_samples.png")
    p.add_argument("--captions", type=int, default=64, help="number of evaluation captions (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config, 28)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"comma-separated: names from {', '.join(SETTINGS)}, or name=field=expr;field=expr")
    p.add_argument("--batch", type=int, default=8, help="captions per sampler call")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", choices=["batched", "separate"], default="batched")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--inductor", action="store_true", help="compile the graphs with Inductor (default: use_inductor=False, as in the shipped table)")
    p.add_argument("--grid", type=int, default=8, help="captions in quality_samples.png")
    p.add_argument("--reference-ops", action="store_true",
                   help="CPU: run the ops' reference paths (default: cpu_fast_paths, same results, faster)")
    p.add_argument("--no-dense-cache", action="store_true",
                   help="sample the dense reference again even if --out holds its images for these captions")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = split_settings(args.settings)
    for s in settings:
        try:
            parse_setting(s)
        except Exception as e:
            raise SystemExit(f"setting {s!r}: {e}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    use_inductor = args.inductor
    os.makedirs(args.out, exist_ok=True)
    zoo = zsampler.load_zoo(device=device, dtype=dtype)
    captions = zdata.eval_captions(args.captions)
    steps = args.steps or zoo.config["sampler"]["num_inference_steps"]
    meta = dict(n_captions=len(captions), steps=steps, seed=args.seed, cfg=args.cfg, block=args.block,
                guidance=zoo.config["sampler"]["guidance_scale"], use_inductor=use_inductor, device=str(device),
                dtype=args.dtype, settings=settings, torch=torch.__version__, threads=torch.get_num_threads(),
                fast_cpu=not args.reference_ops)
    rows: List[dict] = []
    t_start = time.time()

    def log(msg):
        print(f"[zoo.quality {time.time() - t_start:6.0f}s] {msg}", flush=True)

    def write(partial: bool):
        meta.update(partial=partial, wall_seconds=round(time.time() - t_start, 1))
        with open(os.path.join(args.out, "quality.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1, default=lambda v: repr(v))
        with open(os.path.join(args.out, "quality.md"), "w") as f:
            f.write(markdown(meta, rows))

    def on_row(row):
        rows.append(row)
        write(partial=len(rows) < len(settings))

    # the dense images of these captions, kept beside the table: later runs into the same --out reuse them
    ref_file = os.path.join(args.out, f"dense_{len(captions)}x{steps}_seed{args.seed}_{args.cfg}_{device.type}_"
                                      f"{args.dtype}.pt")
    reference = None
    if not args.no_dense_cache and os.path.exists(ref_file):
        reference = torch.load(ref_file)
        log(f"dense reference from {ref_file}")
    log(f"{len(captions)} captions x {steps} steps, settings {settings}, device {device}, "
        f"{torch.get_num_threads()} threads")
    if reference is None:  # sampled and kept first: a run cut short still leaves it for the next
        t0 = time.time()
        reference, _ = sample_setting(zoo, captions, None, steps=steps, seed=args.seed, batch=args.batch,
                                      device=device, dtype=dtype, cfg=args.cfg,
                                      on_chunk=lambda n: log(f"dense: {n}/{len(captions)} captions"))
        meta["dense_seconds"] = round(time.time() - t0, 1)
        torch.save(reference, ref_file)
    res = run_quality(captions, settings, steps=steps, seed=args.seed, batch=args.batch, block=args.block,
                      use_inductor=use_inductor, zoo=zoo, device=device, dtype=dtype, cfg=args.cfg,
                      on_row=on_row, log=log, fast_cpu=not args.reference_ops, reference=reference)
    write(partial=False)
    n = min(args.grid, len(captions))
    if n:
        from .figures import caption_grid

        names = ["dense"] + [r["setting"] for r in rows if r["setting"] in res["images"] and r["setting"] != "dense"]
        grid = torch.cat([res["images"][s][:n] for s in names])
        labels = [f"[{s}] {c}" if j == 0 else c for s in names for j, c in enumerate(captions[:n])]
        caption_grid(grid, labels, os.path.join(args.out, "quality_samples.png"), cols=n)
    print(markdown(meta, rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
