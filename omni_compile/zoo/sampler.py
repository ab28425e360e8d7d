"""Sampling the zoo model: ``FlowMatchEulerDiscreteScheduler`` + classifier-free guidance.

    from omni_compile.zoo import sampler
    zoo = sampler.load_zoo(device="cuda", dtype=torch.bfloat16)      # shipped weights by default
    images = sampler.sample(zoo.transformer, zoo.text_encoder, ["large red circle top left"],
                            config=zoo.config, seed=0)

``transformer`` is an argument so callers can pass a ``torch.compile``d module (e.g. with
``backend="flashomni"``). CFG runs either as one batched call per step (``cfg="batched"``: cond and
uncond concatenated, batch ``2B``) or as two calls (``cfg="separate"``: cond then uncond, batch ``B``
each). The initial noise of caption ``i`` comes from a CPU generator seeded ``seed + i``, so a caption's
image depends on its seed alone, not on the rest of the batch or the device's RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import data
from . import model as zmodel


@dataclass
class Zoo:
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    config: dict
    tokenizer: data.Tokenizer


def load_zoo(weights_dir: Optional[str] = None, device="cpu", dtype=torch.float32) -> Zoo:
    """Weights from ``weights_dir`` (default: ``omni_compile/zoo/weights``)."""
    transformer, text_encoder, config = zmodel.load(weights_dir, device, dtype)
    return Zoo(transformer, text_encoder, config, data.Tokenizer(config["data"]["max_len"]))


def make_scheduler(config: Optional[dict] = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = (config or zmodel.SAMPLER_CONFIG)
    cfg = cfg.get("sampler", cfg)
    return FlowMatchEulerDiscreteScheduler(**cfg["scheduler_config"])


def initial_noise(n: int, seed: int, image_size: int = zmodel.IMAGE_SIZE, channels: int = zmodel.CHANNELS) -> torch.Tensor:
    """``[n, C, S, S]`` fp32 on the CPU; item ``i`` from ``torch.Generator().manual_seed(seed + i)``."""
    return torch.stack([
        torch.randn(channels, image_size, image_size, generator=torch.Generator().manual_seed(seed + i))
        for i in range(n)
    ])


@torch.no_grad()
def encode_text(text_encoder, tokens: torch.Tensor):
    return text_encoder(tokens)


@torch.no_grad()
def sample(
    transformer,
    text_encoder,
    captions: Sequence[str],
    *,
    config: Optional[dict] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    cfg: str = "batched",
    seed: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Images ``[B, 3, S, S]`` fp32 in [0, 1] on the CPU for ``captions``.

    ``config``: the zoo config (``config.json``; default: the built-in one) for image size and the
    sampler defaults (``num_inference_steps``, ``guidance_scale``). ``cfg``: ``"batched"`` | ``"separate"``;
    ``guidance_scale == 1`` skips the unconditional call. ``device`` / ``dtype`` default to the
    transformer's parameters'. ``on_step(i, t)`` is called before the transformer call(s) of step ``i``
    (``t`` = sigma in [0, 1]). ``noise`` overrides the seeded initial noise (``[B, 3, S, S]``)."""
    if cfg not in ("batched", "separate"):
        raise ValueError(f"cfg must be 'batched' or 'separate', got {cfg!r}")
    config = config or zmodel.default_config()
    scfg = config["sampler"]
    steps = int(num_inference_steps or scfg["num_inference_steps"])
    gs = float(scfg["guidance_scale"] if guidance_scale is None else guidance_scale)
    image_size = int(config["data"]["image_size"])
    param = next(iter(transformer.parameters()))
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    tok = data.Tokenizer(config["data"]["max_len"])

    B = len(captions)
    cond_h, cond_p = encode_text(text_encoder, tok(captions, device=device))
    use_cfg = gs != 1.0
    if use_cfg:
        unc_h, unc_p = encode_text(text_encoder, data.empty_tokens(B, device=device))
    x0 = initial_noise(B, seed, image_size) if noise is None else noise.float().cpu()
    latents = zmodel.pack(x0).to(device)  # fp32 state; cast per call
    img_ids = zmodel.image_ids(image_size, device=device)
    txt_ids = zmodel.text_ids(cond_h.shape[1], device=device)
    if use_cfg and cfg == "batched":
        both_h = torch.cat([cond_h, unc_h]).to(dtype)
        both_p = torch.cat([cond_p, unc_p]).to(dtype)

    sched = make_scheduler(config)
    sched.set_timesteps(steps, device=device)
    for i, t in enumerate(sched.timesteps):
        sigma = float(t) / sched.config.num_train_timesteps
        if on_step is not None:
            on_step(i, sigma)
        x_in = latents.to(dtype)
        if not use_cfg:
            ts = torch.full((B,), sigma, device=device, dtype=dtype)
            v = zmodel.predict(transformer, x_in, ts, cond_h.to(dtype), cond_p.to(dtype), img_ids, txt_ids).float()
        elif cfg == "batched":
            ts = torch.full((2 * B,), sigma, device=device, dtype=dtype)
            out = zmodel.predict(transformer, torch.cat([x_in, x_in]), ts, both_h, both_p, img_ids, txt_ids).float()
            v_c, v_u = out[:B], out[B:]
            v = v_u + gs * (v_c - v_u)
        else:
            ts = torch.full((B,), sigma, device=device, dtype=dtype)
            v_c = zmodel.predict(transformer, x_in, ts, cond_h.to(dtype), cond_p.to(dtype), img_ids, txt_ids).float()
            v_u = zmodel.predict(transformer, x_in, ts, unc_h.to(dtype), unc_p.to(dtype), img_ids, txt_ids).float()
            v = v_u + gs * (v_c - v_u)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    images = zmodel.unpack(latents.float(), image_size)
    return ((images + 1) / 2).clamp(0, 1).cpu()


__all__ = ["Zoo", "load_zoo", "make_scheduler", "initial_noise", "encode_text", "sample"]
