"""The main job: the learned zoo DiT sampled dense and with ``torch.compile(backend="flashomni")``.

    python -m omni_compile.zoo.demo                 # make demo
    python -m omni_compile.zoo.demo --captions 4 --steps 28 --out out/demo.png

Loads the zoo model shipped in the package (``omni_compile.zoo``: a small text-to-image FLUX DiT trained by
this repo, whose attention has learned structure; docs/zoo.md), samples a few evaluation captions (same
seeds) once dense and once through the ``flashomni`` backend (policy ``flashomni``, block 64), and prints the
site summary, per-step times (update vs dispatch steps), the attention density the runtime reports, and the
quality of the accelerated images against the dense ones (PSNR, SSIM, the detector's object accuracy).
Writes ``--out`` (a PNG plot of density and step time per step) and ``<out>_images.png`` (dense and
accelerated images side by side, caption under each pair).

On a GPU: bf16, the dense sampler compiled with Inductor and the flashomni loop with Inductor too, 4 captions,
28 steps. On a CPU: fp32, both without Inductor: the dense sampler is eager (diffusers' SDPA attention) and
the flashomni loop runs the ops' PyTorch reference, which is slower than SDPA, so CPU times show the schedule,
not the speed-up (the GPU kernels are what make dispatch steps fast). On a CPU the default is 3 captions (about
1.5 minutes on 2 idle cores; 4 captions take about 2 minutes); the schedule and settings are those of the
quality table's ``flashomni`` row (docs/zoo.md).
Needs diffusers (the ``models`` extra) and Pillow (a diffusers dependency).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import omni_compile

from omni_compile.bench.quality import psnr, ssim
from omni_compile.schedule import config_action


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
    """Two panels (:mod:`omni_compile.bench.figures`): attention density per step (bars coloured by action) and step
    time per step (dense loop vs flashomni loop)."""
    from omni_compile.bench.figures import Chart, Series, save

    colors = {"dense": (150, 150, 150), "update": (220, 90, 60), "dispatch": (60, 120, 210)}
    bars = Chart("attention density per step", xlabel="step", ylabel="density", ylim=(0.0, 1.0), bars_overlay=True)
    for act, color in colors.items():
        steps = [i for i, a in enumerate(actions) if a == act]
        if steps:
            bars.series.append(Series(act, steps, [density[i] for i in steps], "bars", color))
    times = Chart("step time", xlabel="step", ylabel="ms", series=[
        Series("dense loop", list(range(len(t_dense))), [1e3 * t for t in t_dense], "line", (0, 0, 0)),
        Series("flashomni loop", list(range(len(t_omni))), [1e3 * t for t in t_omni], "line", colors["dispatch"])])
    save([bars, times], path, cols=1, size=(900, 300))


class _StepTimer:
    """``on_step`` for the zoo sampler (called before each step's transformer call): step ``i - 1``'s time is
    the gap to call ``i``; ``finish()`` closes the last step. Synchronises CUDA so times are real."""

    def __init__(self, bar=None, action=None):
        self.times, self.bar, self.action, self._t = [], bar, action, None

    def _now(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, i, sigma):
        now = self._now()
        if self._t is not None:
            self._close(now)
        self._t, self._i = now, i

    def _close(self, now):
        self.times.append(now - self._t)
        if self.bar is not None:
            self.bar.step(self.action(self._i) if self.action else "")

    def finish(self):
        if self._t is not None:
            self._close(self._now())
            self._t = None
        if self.bar is not None:
            self.bar.close()
        return self.times


def _side_by_side(path: str, dense, omni, captions, labels) -> None:
    """Rows of (dense, flashomni) image pairs with the caption and a label under each image."""
    from omni_compile.bench.figures import caption_grid

    images = torch.stack([im for pair in zip(dense, omni) for im in pair])
    caps = [c for c in captions for _ in range(2)]
    caption_grid(images, caps, path, cols=2, scale=4, extra_lines=labels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 28)")
    ap.add_argument("--captions", type=int, default=None, help="evaluation captions to sample (4 on GPU, 3 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/demo.png", help="where to write the plot (images: <out>_images.png)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = ap.parse_args(argv)
    from . import data as zdata
    from . import detector as zdet
    from . import sampler as zsampler

    cuda = torch.cuda.is_available() and not args.cpu
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    steps = args.steps or 28
    n_cap = args.captions or (4 if cuda else 3)
    config = omni_compile.OmniConfig(block_q=64, block_kv=64, warmup=8, interval=5, taylor_order=1,
                                     use_inductor=cuda)
    zoo = zsampler.load_zoo(device=device, dtype=dtype)
    captions = zdata.eval_captions(n_cap)
    requested = [zdata.parse_caption(c) for c in captions]
    guidance = zoo.config["sampler"]["guidance_scale"]
    kw = dict(config=zoo.config, num_inference_steps=steps, seed=args.seed, cfg="batched")
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"omni-compile demo on {where}: zoo text-to-image FLUX DiT (learned weights, docs/zoo.md), "
          f"{len(captions)} captions, 1,024 image + 12 text tokens, {str(dtype).replace('torch.', '')}, "
          f"{steps} steps, batched CFG {guidance:g}")
    print(f"config: policy={config.policy!r} warmup={config.warmup} interval={config.interval} "
          f"taylor_order={config.taylor_order} "
          f"block={config.block_q} use_inductor={config.use_inductor}")

    # dense reference: Inductor on the GPU; eager on the CPU (diffusers' SDPA, faster there than the ops'
    # PyTorch reference that policy="dense" would run)
    if cuda:
        dense_model, dense_name = torch.compile(zoo.transformer), "torch.compile (Inductor), dense"
    else:
        dense_model, dense_name = zoo.transformer, "eager (SDPA), dense"
    t0 = time.perf_counter()
    zsampler.sample(dense_model, zoo.text_encoder, captions, **{**kw, "num_inference_steps": 1})
    print(f"dense sampler: {dense_name}; warm-up (compile) + 1 step: {time.perf_counter() - t0:.1f} s")
    timer = _StepTimer(_Progress(steps, "dense    "))
    ref = zsampler.sample(dense_model, zoo.text_encoder, captions, on_step=timer, **kw)
    t_dense = timer.finish()

    state = omni_compile.OmniState(config)
    omni = torch.compile(zoo.transformer, backend="flashomni", options={"state": state})
    t0 = time.perf_counter()
    # compile (one graph); on the GPU also run through an update and two dispatch steps so Triton has
    # compiled every kernel before the timed loop (the CPU runs the ops' PyTorch reference: nothing to JIT)
    warm = min(steps, config.warmup + 2) if cuda else 1
    zsampler.sample(omni, zoo.text_encoder, captions, **{**kw, "num_inference_steps": warm})
    print(f"flashomni compile + {warm}-step warm-up: {time.perf_counter() - t0:.1f} s; {state.summary()}")
    state.reset()
    timer = _StepTimer(_Progress(steps, "flashomni"), lambda i: config_action(config, i))
    out = zsampler.sample(omni, zoo.text_encoder, captions, on_step=timer, **kw)
    t_omni = timer.finish()

    rep = state.report()
    gen = max(s["generation"] for s in rep.steps)
    steps_rep = [s for s in rep.steps if s["generation"] == gen]
    actions = [s["action"] for s in steps_rep]
    density = [s["density"] for s in steps_rep]
    print()
    print(rep.format(max_steps=0).split("\n\n")[0])
    print()
    print("per-step time (ms):")
    for kind in ("dense", "update", "dispatch"):
        ts = [t for t, a in zip(t_omni, actions) if a == kind]
        if ts:
            print(f"  flashomni {kind:8s} steps: {len(ts):3d}  mean {1e3 * sum(ts) / len(ts):8.2f}")
    print(f"  dense sampler   steps: {steps:3d}  mean {1e3 * sum(t_dense) / steps:8.2f}")
    print(f"total: dense {sum(t_dense):.2f} s, flashomni {sum(t_omni):.2f} s "
          f"({sum(t_dense) / sum(t_omni):.2f}x)")
    disp = [(d, s["work"]) for d, s in zip(density, steps_rep) if s["action"] == "dispatch"]
    w = sum(x[1] for x in disp)
    print(f"attention density: {rep.density():.3f} over the loop; {sum(d * x for d, x in disp) / w if w else 1.0:.3f} "
          f"over dispatch steps")
    print(f"cache memory: {state.memory_bytes() / 2**20:.2f} MiB")
    per = [psnr(out[i], ref[i], data_range=1.0) for i in range(len(captions))]
    acc_d, acc_o = zdet.accuracy(requested, ref), zdet.accuracy(requested, out)
    print(f"quality of the images vs dense: PSNR {sum(per) / len(per):.2f} dB (range 1, mean over images), "
          f"SSIM {ssim(out, ref):.4f}; detector object accuracy dense {acc_d['object']:.3f}, "
          f"flashomni {acc_o['object']:.3f}")
    if not cuda:
        print("(CPU: dense is eager SDPA while flashomni runs the ops' PyTorch reference, so times show the "
              "schedule, not the GPU speed-up)")
    else:
        print("(GPU: this model's step is a few ms of small kernels, so the runtime's per-site host work "
              "decides its time; the speed-ups are measured at FLUX.1-dev / HunyuanVideo size: "
              "python -m omni_compile.bench.e2e, docs/benchmarks.md)")
    _plot(args.out, actions, density, t_dense, t_omni)
    root, ext = os.path.splitext(args.out)
    img_path = f"{root}_images{ext or '.png'}"
    labels = []
    for i in range(len(captions)):
        labels += [f"dense ({zdet.score(requested[i], zdet.detect(ref[i]))['object']}/{len(requested[i])} obj)",
                   f"flashomni {per[i]:.1f} dB ({zdet.score(requested[i], zdet.detect(out[i]))['object']}"
                   f"/{len(requested[i])} obj)"]
    _side_by_side(img_path, ref, out, captions, labels)
    print(f"plot: {args.out}; images (dense | flashomni): {img_path}")


if __name__ == "__main__":
    main()
