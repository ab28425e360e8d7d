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
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from omni_compile.policies import Fixed, FlashOmni

from ..zoo import data as zdata
from ..zoo import detector as zdet
from ..zoo import sampler as zsampler

# ---- image metrics -----------------------------------------------------------------------------------


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: Optional[float] = None) -> float:
    """PSNR in dB over the whole tensor; the signal range is ``data_range`` (e.g. 1 for images in [0, 1]),
    by default the reference's peak-to-peak range."""
    ref = ref.float()
    mse = float(((x.float() - ref) ** 2).mean())
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of images ``[N, C, H, W]`` (or ``[C, H, W]``) against ``ref``: an
    ``window x window`` Gaussian window (``sigma``), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with
    ``L = data_range``, statistics over valid window positions only (no padding), the SSIM map averaged
    over positions, then over channels and images. Computed in fp64 on the inputs' device."""
    x, ref = x.double(), ref.double()
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() == 3:
        x, ref = x[None], ref[None]
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {window}x{window} window")
    coords = torch.arange(window, dtype=torch.float64, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(ref * ref) - mu_y * mu_y
    sxy = blur(x * ref) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return float(smap.mean())


# ---- the quality table ---------------------------------------------------------------------------------

# name -> OmniConfig fields (besides block size / use_inductor); None = the dense eager reference
SETTINGS: Dict[str, Optional[dict]] = {
    "dense": None,
    "flashomni": dict(policy=FlashOmni(tau_q=0.5, tau_kv=0.05), interval=5, warmup=8, taylor_order=1),
    "aggressive": dict(policy=FlashOmni(tau_q=0.8, tau_kv=0.15), interval=5, warmup=8, taylor_order=1),
    "fixed": dict(policy=Fixed(reuse=0.3, skip=0.5), interval=5, warmup=8, taylor_order=1),
    "interval3": dict(policy=FlashOmni(tau_q=0.5, tau_kv=0.05), interval=3, warmup=8, taylor_order=1),
    "dense-backend": dict(policy="dense"),  # sanity check: the backend with every tile computed
}


def _strategy_settings() -> Dict[str, dict]:
    """The shipped strategies (docs/policies.md) with the zoo's grid: 32 x 32 image tokens after 12 text."""
    from .presets import STRATEGIES, strategy_policy

    base = dict(interval=5, warmup=8, taylor_order=1, token_layout=(1, 32, 32))
    return {f"policy:{n}": dict(base, policy=strategy_policy(n, (1, 32, 32))) for n in STRATEGIES if n != "dense"}


SETTINGS.update(_strategy_settings())
DEFAULT_SETTINGS = ("dense", "flashomni", "aggressive", "fixed", "interval3")


def image_metrics(images: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR (range 1, per image, averaged; ``inf`` for identical images) and SSIM vs ``ref``, ``[N, 3, H, W]``."""
    per = [psnr(images[i], ref[i], data_range=1.0) for i in range(len(ref))]
    return dict(psnr=sum(per) / len(per), psnr_min=min(per), ssim=ssim(images, ref, data_range=1.0))


def density_figures(state) -> dict:
    rep = state.report()
    disp = [s for s in rep.steps if s["action"] == "dispatch"]
    w = sum(s["work"] for s in disp)
    return dict(density=rep.density(),
                dispatch_density=(sum(s["density"] * s["work"] for s in disp) / w) if w else 1.0,
                dispatch_steps=len({(s["generation"], s["step"]) for s in disp}),
                reused_dispatch=(sum(s["reused"] * s["work"] for s in disp) / w) if w else 0.0,
                cache_mib=rep.memory_bytes / 2**20)


def sample_setting(zoo, captions: Sequence[str], setting: Optional[dict], *, steps: int, seed: int = 0,
                   batch: int = 8, block: int = 64, use_inductor: bool = False, device=None, dtype=None,
                   cfg: str = "batched", guidance: Optional[float] = None,
                   on_chunk: Optional[Callable[[int], None]] = None):
    """Images for ``captions`` (chunks of ``batch``; caption ``i`` seeded ``seed + i``) with ``setting``
    (``None``: eager dense) and the ``OmniState`` used (``None`` for eager)."""
    import omni_compile

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
        chunks.append(zsampler.sample(model, zoo.text_encoder, list(captions[i:i + batch]), config=zoo.config,
                                      num_inference_steps=steps, guidance_scale=guidance, cfg=cfg, seed=seed + i,
                                      device=device, dtype=dtype))
        if on_chunk is not None:
            on_chunk(i + len(chunks[-1]))
    return torch.cat(chunks), state


def evaluate_setting(images: torch.Tensor, ref: torch.Tensor, requested, state=None) -> dict:
    acc = zdet.accuracy(requested, images)
    row = dict(image_metrics(images, ref), object_accuracy=acc["object"], caption_exact=acc["caption_exact"],
               extra_per_image=acc["extra_per_image"])
    row.update(density_figures(state) if state is not None else
               dict(density=1.0, dispatch_density=1.0, dispatch_steps=0, reused_dispatch=0.0, cache_mib=0.0))
    return row


def run_quality(captions: Sequence[str], settings: Sequence[Union[str, Tuple[str, Optional[dict]]]] = DEFAULT_SETTINGS, *, steps: Optional[int] = None,
                seed: int = 0, batch: int = 8, block: int = 64, use_inductor: bool = False, zoo=None,
                device=None, dtype=None, cfg: str = "batched", guidance: Optional[float] = None,
                on_row: Optional[Callable[[dict], None]] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """The quality table (``rows``, one per setting) and the images (``images``: name -> ``[N, 3, S, S]``).

    ``settings``: names from ``SETTINGS`` or ``(name, OmniConfig fields)`` pairs (``None`` fields: the
    eager dense reference itself). The dense reference is always sampled first."""
    zoo = zoo or zsampler.load_zoo(device=device or "cpu", dtype=dtype or torch.float32)
    steps = int(steps or zoo.config["sampler"]["num_inference_steps"])
    guidance = float(zoo.config["sampler"]["guidance_scale"] if guidance is None else guidance)
    requested = [zdata.parse_caption(c) for c in captions]
    kw = dict(steps=steps, seed=seed, batch=batch, block=block, use_inductor=use_inductor, device=device,
              dtype=dtype, cfg=cfg, guidance=guidance)

    def timed(name, setting):
        t0 = time.time()
        imgs, st = sample_setting(zoo, captions, setting, on_chunk=lambda n: log(
            f"{name}: {n}/{len(captions)} captions, {time.time() - t0:.0f}s"), **kw)
        return imgs, st, time.time() - t0

    ref, _, ref_s = timed("dense", None)
    images = {"dense": ref}
    rows = []
    for item in settings:
        name, setting = (item, SETTINGS[item]) if isinstance(item, str) else item
        if setting is None:
            imgs, st, secs = ref, None, ref_s
        else:
            imgs, st, secs = timed(name, setting)
            images[name] = imgs
        row = dict(setting=name, config=setting, seconds=round(secs, 1),
                   **evaluate_setting(imgs, ref, requested, st))
        rows.append(row)
        log(f"{name}: " + _fmt(row))
        if on_row is not None:
            on_row(row)
    return dict(rows=rows, images=images, steps=steps, guidance=guidance, cfg=cfg, block=block, seed=seed,
                captions=list(captions))


def _num(v, fmt):
    return "inf" if isinstance(v, float) and math.isinf(v) else format(v, fmt)


def _fmt(r: dict) -> str:
    return (f"density {r['density']:.3f} (dispatch {r['dispatch_density']:.3f}), PSNR {_num(r['psnr'], '.2f')} dB, "
            f"SSIM {r['ssim']:.4f}, object acc {r['object_accuracy']:.3f}, {r['seconds']}s")


def _describe(row: dict) -> str:
    s = row["config"]
    if s is None:
        return "dense (eager, reference)"
    if s["policy"] == "dense":
        return 'backend, policy="dense"'
    return f"`{s['policy']!r}`, N={s.get('interval', 5)}"


def markdown(meta: dict, rows: List[dict]) -> str:
    lines = [
        f"Zoo model, {meta['n_captions']} evaluation captions (`data.eval_captions({meta['n_captions']})`, seeds "
        f"{meta['seed']}..{meta['seed'] + meta['n_captions'] - 1}), {meta['steps']} steps, CFG {meta['cfg']} "
        f"(guidance {meta['guidance']:g}), block {meta['block']}, warm-up 8, Taylor order 1, "
        f"use_inductor={meta['use_inductor']}, {meta['device']} {meta['dtype']}.",
        "",
        "| setting | density (loop) | density (dispatch steps) | PSNR dB vs dense (min) | SSIM vs dense "
        "| object acc. | caption exact | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_describe(r)} | {r['density']:.3f} | {r['dispatch_density']:.3f} | "
            f"{_num(r['psnr'], '.2f')} ({_num(r['psnr_min'], '.2f')}) | {r['ssim']:.4f} | {r['object_accuracy']:.3f} | "
            f"{r['caption_exact']:.3f} | {r['seconds']:.0f} |")
    if meta.get("partial"):
        lines += ["", f"*(partial: {len(rows)} of {len(meta['settings'])} settings done)*"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for quality.json / quality.md / quality_samples.png")
    p.add_argument("--captions", type=int, default=64, help="number of evaluation captions (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config, 28)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--batch", type=int, default=8, help="captions per sampler call")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", choices=["batched", "separate"], default="batched")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--inductor", action="store_true", help="compile the graphs with Inductor (default: use_inductor=False, as in the shipped table)")
    p.add_argument("--grid", type=int, default=8, help="captions in quality_samples.png")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    use_inductor = args.inductor
    os.makedirs(args.out, exist_ok=True)
    zoo = zsampler.load_zoo(device=device, dtype=dtype)
    captions = zdata.eval_captions(args.captions)
    steps = args.steps or zoo.config["sampler"]["num_inference_steps"]
    meta = dict(n_captions=len(captions), steps=steps, seed=args.seed, cfg=args.cfg, block=args.block,
                guidance=zoo.config["sampler"]["guidance_scale"], use_inductor=use_inductor, device=str(device),
                dtype=args.dtype, settings=settings, torch=torch.__version__, threads=torch.get_num_threads())
    rows: List[dict] = []
    t_start = time.time()

    def log(msg):
        print(f"[zoo.quality {time.time() - t_start:6.0f}s] {msg}", flush=True)

    def write(partial: bool):
        meta.update(partial=partial, wall_seconds=round(time.time() - t_start, 1))
        with open(os.path.join(args.out, "quality.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1, default=lambda v: str(v))
        with open(os.path.join(args.out, "quality.md"), "w") as f:
            f.write(markdown(meta, rows))

    def on_row(row):
        rows.append(row)
        write(partial=len(rows) < len(settings))

    log(f"{len(captions)} captions x {steps} steps, settings {settings}, device {device}, "
        f"{torch.get_num_threads()} threads")
    res = run_quality(captions, settings, steps=steps, seed=args.seed, batch=args.batch, block=args.block,
                      use_inductor=use_inductor, zoo=zoo, device=device, dtype=dtype, cfg=args.cfg,
                      on_row=on_row, log=log)
    write(partial=False)
    n = min(args.grid, len(captions))
    if n:
        from .figures import caption_grid

        names = [s for s in settings if s in res["images"]]
        grid = torch.cat([res["images"][s][:n] for s in names])
        labels = [f"[{s}] {c}" if j == 0 else c for s in names for j, c in enumerate(captions[:n])]
        caption_grid(grid, labels, os.path.join(args.out, "quality_samples.png"), cols=n)
    print(markdown(meta, rows))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
