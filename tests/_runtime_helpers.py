"""What the runtime-loop, block-cache and policy tests share: the state they start from, the tiny FLUX they
denoise and how they compile."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from omni_compile import OmniConfig, OmniState

from _tiny_models import spread_attention

BLOCK = 16


def make_state(**kw) -> OmniState:
    """An FX-run (no Inductor) state with blocks of 16, warm-up 2 and interval 3, and the graph kept whole
    (``block_cache=None``: the site runtime alone; block-caching tests pass their rule), overridden by
    ``kw``."""
    base = dict(use_inductor=False, block_q=BLOCK, block_kv=BLOCK, warmup=2, interval=3, block_cache=None)
    return OmniState(OmniConfig(**{**base, **kw}))


def tiny_flux_case(single_layers: int = 1):
    """``(model, make_inputs, latents)`` of the tiny FLUX the loop tests denoise: 64 image tokens (an 8 x 8
    grid, packed: no conv) + 16 text tokens = 5 blocks of 16 (1 text, 4 vision), 1 double-stream block and
    ``single_layers`` single-stream blocks, 2 heads of 16."""
    model, make_inputs, info = tiny_flux(side=8, text=16, layers=1, single_layers=single_layers, heads=2, head_dim=16)
    return model, make_inputs, initial_latents(info)


def compile_with(model, state):
    return torch.compile(model, backend="flashomni", options={"state": state})


def tiny_flux(side: int = 16, text: int = 32, layers: int = 2, single_layers: int = 4, heads: int = 4,
              head_dim: int = 32, channels: int = 16, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small FLUX transformer and a ``make_inputs(latents, timestep, cond)`` for it.

    ``side × side`` image tokens (patch size 1; ``make_inputs`` takes square latents of any side), ``text``
    text tokens first (as in FLUX). ``cond`` picks
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

    def make_inputs(latents: torch.Tensor, timestep: torch.Tensor, cond=(0,)):
        B, n = latents.shape[0], latents.shape[1]
        s = int(round(n ** 0.5))  # square latents of any side (another resolution)
        ids = torch.zeros(n, 3)
        ids[:, 1] = torch.arange(n) // s
        ids[:, 2] = torch.arange(n) % s
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
