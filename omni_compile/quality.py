"""Quality of the update–dispatch runtime against the dense loop, on a tiny FLUX (CPU-sized).

    python -m omni_compile.quality            # the table in docs/runtime.md (28- and 50-step loops)
    python -m omni_compile.quality --steps 28 --quick

Builds a small ``FluxTransformer2DModel`` with re-initialised attention weights (so attention matters,
design.md fact 8), runs a FLUX-style denoising loop (``FlowMatchEulerDiscreteScheduler``, timesteps /1000
as FLUX pipelines pass them) once with ``policy="dense"`` and once per setting, and reports the relative
L2 error and PSNR of the final latent, and the attention density the runtime reports. Needs diffusers
(the ``models`` extra). Nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Optional

import torch
from torch import nn


def spread_attention(model: nn.Module, std: float = 0.5, seed: int = 1234) -> None:
    """Re-initialise q/k/v/out projections so attention logits spread (std ~3): with diffusers' default
    init a small model's attention is nearly uniform and barely affects its output (design.md fact 8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                fan_in = mod.in_features
                if leaf in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (std * 6 / fan_in**0.5))
                elif leaf in ("to_v", "add_v_proj"):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in**0.5)
                elif name.endswith("to_out.0") or leaf == "to_add_out" or (
                        name.startswith("single_transformer_blocks.") and leaf == "proj_out"):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (3 / fan_in**0.5))


def tiny_flux(side: int = 16, text: int = 32, layers: int = 2, single_layers: int = 4, heads: int = 4,
              head_dim: int = 32, channels: int = 16, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small FLUX transformer and a ``make_inputs(latents, timestep, cond)`` for it.

    ``side × side`` image tokens (patch size 1), ``text`` text tokens first (as in FLUX). ``cond`` picks
    the prompt: 0 = "cond", 1 = "uncond" (two fixed random prompt embeddings).
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
        pooled_projection_dim=32, axes_dims_rope=rope,
    )
    spread_attention(m)
    m = m.eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randn(1, text, 64, generator=g) for _ in range(2)]
    pooled = [torch.randn(1, 32, generator=g) for _ in range(2)]
    ids = torch.zeros(side * side, 3)
    ids[:, 1] = torch.arange(side * side) // side
    ids[:, 2] = torch.arange(side * side) % side

    def make_inputs(latents: torch.Tensor, timestep: torch.Tensor, cond=(0,)):
        B = latents.shape[0]
        enc = torch.cat([prompts[c] for c in cond]).to(device=device, dtype=dtype)
        pool = torch.cat([pooled[c] for c in cond]).to(device=device, dtype=dtype)
        reps = B // len(cond)
        return dict(
            hidden_states=latents,
            encoder_hidden_states=enc.repeat_interleave(reps, 0),
            pooled_projections=pool.repeat_interleave(reps, 0),
            timestep=timestep.to(device=device, dtype=dtype).expand(B),
            img_ids=ids.to(device=device, dtype=dtype),
            txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
            return_dict=False,
        )

    info = dict(tokens=side * side, text=text, channels=channels)
    return m, make_inputs, info


def initial_latents(info: dict, batch: int = 1, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, info["tokens"], info["channels"], generator=g).to(device=device, dtype=dtype)


def denoise(model, make_inputs, latents: torch.Tensor, steps: int, cfg: str = "none", guidance: float = 3.5,
            on_step: Optional[Callable[[int, float], None]] = None) -> torch.Tensor:
    """A FLUX-style flow-matching Euler loop. ``cfg``: ``"none"`` (one call per step), ``"two-call"``
    (cond then uncond, two calls per step) or ``"batched"`` (one call on ``cat([cond, uncond])``).
    ``on_step(i, seconds)`` is called after each step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    x = latents
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            t0 = time.perf_counter()
            ts = (t / 1000).reshape(1)
            if cfg == "none":
                v = model(**make_inputs(x, ts, (0,)))[0]
            elif cfg == "two-call":
                vc = model(**make_inputs(x, ts, (0,)))[0]
                vu = model(**make_inputs(x, ts, (1,)))[0]
                v = vu + guidance * (vc - vu)
            elif cfg == "batched":
                vc, vu = model(**make_inputs(torch.cat([x, x]), ts, (0, 1)))[0].chunk(2)
                v = vu + guidance * (vc - vu)
            else:
                raise ValueError(f"cfg must be 'none', 'two-call' or 'batched', got {cfg!r}")
            x = sched.step(v, t, x, return_dict=False)[0]
            if x.is_cuda:
                torch.cuda.synchronize()
            if on_step is not None:
                on_step(i, time.perf_counter() - t0)
    return x


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


SETTINGS = [
    dict(interval=1),
    dict(interval=3, taylor_order=0),
    dict(interval=3, taylor_order=1),
    dict(interval=5, taylor_order=0),
    dict(interval=5, taylor_order=1),
    dict(interval=5, taylor_order=2),
    dict(interval=5, taylor_order=1, tau_q=0.8),
    dict(interval=5, taylor_order=1, tau_kv=0.15),
]


def run(steps_list=(28, 50), settings=SETTINGS, warmup: int = 4, block: int = 16, quick: bool = False):
    import omni_compile

    if quick:
        model, make_inputs, info = tiny_flux(side=8, text=16, layers=1, single_layers=1, heads=2, head_dim=16)
    else:  # 144 image + 16 text tokens = 10 blocks of 16 (1 text, 9 vision); 1 double + 3 single blocks
        model, make_inputs, info = tiny_flux(side=12, text=16, layers=1, single_layers=3, heads=4, head_dim=16)
    lat = initial_latents(info)
    base = dict(use_inductor=False, block_q=block, block_kv=block, warmup=warmup)
    rows = []
    for steps in steps_list:
        torch._dynamo.reset()
        dense = torch.compile(model, backend="flashomni",
                              options={"state": omni_compile.OmniState(omni_compile.OmniConfig(policy="dense", **base))})
        ref = denoise(dense, make_inputs, lat, steps)
        for s in settings:
            torch._dynamo.reset()
            state = omni_compile.OmniState(omni_compile.OmniConfig(**{**base, **s}))
            out = denoise(torch.compile(model, backend="flashomni", options={"state": state}), make_inputs, lat, steps)
            rep = state.report()
            rows.append(dict(steps=steps, **{k: s.get(k, getattr(state.config, k)) for k in
                                              ("interval", "taylor_order", "tau_q", "tau_kv")},
                             density=rep.density(), rel_l2=rel_l2(out, ref), psnr=psnr(out, ref),
                             cache_mib=max(1, rep.memory_bytes) / 2**20))
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r) -> str:
    p = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
    return (f"| {r['steps']} | {r['interval']} | {r['taylor_order']} | {r['tau_q']} | {r['tau_kv']} | "
            f"{r['density']:.3f} | {r['rel_l2']:.4f} | {p} |")


def run_policies(steps: int = 28, names=None, warmup: int = 4, interval: int = 5, block: int = 16,
                 quick: bool = False):
    """Each shipped strategy (``policies.presets.STRATEGIES``, their table knobs) on the tiny FLUX: rows with
    the loop's attention density, the density over dispatch steps, rel. L2 and PSNR vs ``policy="dense"``.
    The table in docs/policies.md: ``python -m omni_compile.quality --policies``."""
    import omni_compile
    from omni_compile.policies.presets import STRATEGIES, strategy_config

    side = 8 if quick else 12
    if quick:
        model, make_inputs, info = tiny_flux(side=8, text=16, layers=1, single_layers=1, heads=2, head_dim=16)
    else:
        model, make_inputs, info = tiny_flux(side=12, text=16, layers=1, single_layers=3, heads=4, head_dim=16)
    lat = initial_latents(info)
    rows, ref = [], None
    for name in names or STRATEGIES:
        torch._dynamo.reset()
        cfg = strategy_config(name, token_layout=(1, side, side), block=block, use_inductor=False, warmup=warmup,
                              interval=interval)
        state = omni_compile.OmniState(cfg)
        out = denoise(torch.compile(model, backend="flashomni", options={"state": state}), make_inputs, lat, steps)
        if ref is None:
            if name != "dense":
                raise ValueError("the first strategy must be 'dense' (the reference)")
            ref = out
        rep = state.report()
        disp = [x for x in rep.steps if x["action"] in ("dispatch", "mixed")]
        w = sum(x["work"] for x in disp)
        rows.append(dict(strategy=name, policy=repr(cfg.policy), density=rep.density(),
                         dispatch_density=sum(x["density"] * x["work"] for x in disp) / w if w else 1.0,
                         rel_l2=rel_l2(out, ref), psnr=psnr(out, ref)))
        r = rows[-1]
        p = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        print(f"| {name} | `{r['policy']}` | {r['density']:.3f} | {r['dispatch_density']:.3f} | {r['rel_l2']:.4f} "
              f"| {p} | |", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="*", default=[28, 50])
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="a smaller model (for a fast look)")
    ap.add_argument("--policies", action="store_true",
                    help="compare the shipped strategies (docs/policies.md) instead of the flashomni settings")
    args = ap.parse_args(argv)
    if args.policies:
        print("| strategy | policy | attention density (loop) | density (dispatch steps) | rel. L2 vs dense | PSNR dB "
              "| GPU ms per dispatch step |")
        print("|---|---|---|---|---|---|---|")
        for steps in args.steps:
            run_policies(steps, warmup=args.warmup, block=args.block, quick=args.quick)
        return
    print("| steps | interval | taylor_order | tau_q | tau_kv | attention density | rel. L2 vs dense | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    run(args.steps, warmup=args.warmup, block=args.block, quick=args.quick)


if __name__ == "__main__":
    main()
