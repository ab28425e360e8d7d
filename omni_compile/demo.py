"""The main job: a small DiT's denoising loop, dense and with ``torch.compile(backend="flashomni")``.

    python -m omni_compile.demo                 # make demo
    python -m omni_compile.demo --steps 28 --out out/demo.png

Builds a small FLUX transformer (``FluxTransformer2DModel`` with re-initialised attention weights, so
attention matters: design.md fact 8), runs the same flow-matching Euler loop (FlowMatchEulerDiscreteScheduler)
once dense and once compiled with the ``flashomni`` backend, and prints the site summary, per-step times
(update vs dispatch steps), the attention density the runtime reports, and the quality of the final latent
against the dense loop (relative L2, PSNR). Writes a PNG plot of density and step time per step.

On a GPU: bf16, a larger model, the dense loop compiled with Inductor and the flashomni loop too. On a CPU:
fp32 and small so it finishes in a minute or two; both loops skip Inductor (``use_inductor=False``) and the
dense one is the same backend with ``policy="dense"``. The CPU runs the ops' PyTorch reference, slower than PyTorch's SDPA, so
CPU times show the schedule, not the speed-up (the GPU kernels are what make dispatch steps fast).
Needs diffusers (the ``models`` extra) and Pillow (a diffusers dependency).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import omni_compile

from .quality import denoise, initial_latents, psnr, rel_l2, tiny_flux
from .schedule import step_action


class _Progress:
    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=True)
        except ImportError:  # pragma: no cover - tqdm comes with diffusers' dependencies
            self.bar = None
        self.desc, self.total, self.n = desc, total, 0

    def step(self, action: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(action)
            self.bar.update(1)
        else:
            print(f"\r{self.desc} {self.n}/{self.total} {action}", end="", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print()


def _plot(path: str, actions, density, t_dense, t_omni) -> None:
    """Two panels drawn with Pillow: attention density per step (bars coloured by action) and step time
    per step (dense loop vs flashomni loop)."""
    from PIL import Image, ImageDraw

    W, H, pad = 900, 560, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    n = len(actions)
    colors = {"dense": (150, 150, 150), "update": (220, 90, 60), "dispatch": (60, 120, 210)}
    panel_h = (H - 3 * pad) // 2

    def x_of(i):
        return pad + (W - 2 * pad) * (i + 0.5) / n

    def axes(top, title, ymax, unit):
        d.rectangle([pad, top, W - pad, top + panel_h], outline="black")
        d.text((pad, top - 18), title, fill="black")
        for frac in (0, 0.5, 1):
            y = top + panel_h * (1 - frac)
            d.line([pad - 4, y, pad, y], fill="black")
            d.text((4, y - 6), f"{ymax * frac:.0f}{unit}" if unit else f"{ymax * frac:.2g}", fill="black")
        for i in range(0, n, max(1, n // 14)):
            d.text((x_of(i) - 6, top + panel_h + 4), str(i), fill="black")

    top1 = pad
    axes(top1, "attention density per step (grey: warm-up, red: update, blue: dispatch)", 1.0, "")
    bw = max(2, (W - 2 * pad) / n * 0.7)
    for i, (a, dn) in enumerate(zip(actions, density)):
        x = x_of(i)
        d.rectangle([x - bw / 2, top1 + panel_h * (1 - dn), x + bw / 2, top1 + panel_h], fill=colors.get(a, (0, 0, 0)))
    top2 = 2 * pad + panel_h
    tmax = max(max(t_dense), max(t_omni)) * 1.1
    axes(top2, "step time (black: dense loop, blue: flashomni loop)", tmax * 1e3, " ms")
    for series, col in ((t_dense, (0, 0, 0)), (t_omni, (60, 120, 210))):
        pts = [(x_of(i), top2 + panel_h * (1 - t / tmax)) for i, t in enumerate(series)]
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    d.text((pad, H - 20), "step", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (28 on GPU, 20 on CPU)")
    ap.add_argument("--out", default="out/demo.png", help="where to write the plot")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        steps = args.steps or 28
        model, make_inputs, info = tiny_flux(side=64, text=256, layers=2, single_layers=4, heads=8, head_dim=128,
                                             device=device, dtype=dtype)
        config = omni_compile.OmniConfig(block_q=128, block_kv=128, warmup=4, interval=5, taylor_order=1)
    else:
        steps = args.steps or 20
        model, make_inputs, info = tiny_flux(side=16, text=32, layers=1, single_layers=3, heads=4, head_dim=32)
        config = omni_compile.OmniConfig(block_q=32, block_kv=32, warmup=4, interval=4, taylor_order=1,
                                         use_inductor=False)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"omni-compile demo on {where}: FLUX-style DiT, {info['tokens']} image + {info['text']} text tokens, "
          f"{str(dtype).replace('torch.', '')}, {steps} steps")
    print(f"config: policy={config.policy} warmup={config.warmup} interval={config.interval} "
          f"taylor_order={config.taylor_order} tau_q={config.tau_q} tau_kv={config.tau_kv} "
          f"block={config.block_q}")
    lat = initial_latents(info, device=device, dtype=dtype)

    # dense reference: Inductor on the GPU; on the CPU the same backend with policy="dense" (the same ops
    # and graph, every tile computed), so the two loops differ only by the runtime's decisions
    if cuda:
        dense_model, dense_name = torch.compile(model), "torch.compile (Inductor), dense"
    else:
        dense_state = omni_compile.OmniState(config.replace(policy="dense"))
        dense_model = torch.compile(model, backend="flashomni", options={"state": dense_state})
        dense_name = 'backend="flashomni", policy="dense"'
    t0 = time.perf_counter()
    denoise(dense_model, make_inputs, lat, 1)
    print(f"dense loop: {dense_name}; compile + 1 step: {time.perf_counter() - t0:.1f} s")
    t_dense = []
    bar = _Progress(steps, "dense    ")
    ref = denoise(dense_model, make_inputs, lat, steps, on_step=lambda i, s: (t_dense.append(s), bar.step()))
    bar.close()

    state = omni_compile.OmniState(config)
    omni = torch.compile(model, backend="flashomni", options={"state": state})
    t0 = time.perf_counter()
    denoise(omni, make_inputs, lat, 1)  # compile (one graph serves every later step)
    print(f"flashomni compile + 1 step: {time.perf_counter() - t0:.1f} s; {state.summary()}")
    state.reset()
    t_omni = []
    bar = _Progress(steps, "flashomni")

    def on_step(i, s):
        t_omni.append(s)
        pos = state.clock.position
        act = step_action(pos.step, config.warmup, config.interval) if pos else ""
        bar.step(act)

    out = denoise(omni, make_inputs, lat, steps, on_step=on_step)
    bar.close()

    rep = state.report()
    actions = [s["action"] for s in rep.steps]
    density = [s["density"] for s in rep.steps]
    print()
    print(rep.format(max_steps=0).split("\n\n")[0])
    print()
    print("per-step time (ms):")
    for kind in ("dense", "update", "dispatch"):
        ts = [t for t, a in zip(t_omni, actions) if a == kind]
        if ts:
            print(f"  flashomni {kind:8s} steps: {len(ts):3d}  mean {1e3 * sum(ts) / len(ts):8.2f}")
    print(f"  dense loop      steps: {steps:3d}  mean {1e3 * sum(t_dense) / steps:8.2f}")
    print(f"total: dense {sum(t_dense):.2f} s, flashomni {sum(t_omni):.2f} s "
          f"({sum(t_dense) / sum(t_omni):.2f}x)")
    print(f"attention density: {rep.density():.3f} overall; dispatch steps "
          f"{sum(d for d, a in zip(density, actions) if a == 'dispatch') / max(1, actions.count('dispatch')):.3f}")
    print(f"cache memory: {state.memory_bytes() / 2**20:.2f} MiB")
    print(f"quality of the final latent vs dense: rel. L2 {rel_l2(out, ref):.4f}, PSNR {psnr(out, ref):.1f} dB")
    if not cuda:
        print("(CPU: the ops run their PyTorch reference, so times show the schedule, not the GPU speed-up)")
    _plot(args.out, actions, density, t_dense, t_omni)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
