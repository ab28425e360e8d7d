"""What the runtime-loop, block-cache and policy tests share: the state they start from, the tiny FLUX they
denoise and how they compile."""

from __future__ import annotations

import torch

from omni_compile import OmniConfig, OmniState

BLOCK = 16


def make_state(**kw) -> OmniState:
    """An FX-run (no Inductor) state with blocks of 16, warm-up 2 and interval 3, overridden by ``kw``."""
    base = dict(use_inductor=False, block_q=BLOCK, block_kv=BLOCK, warmup=2, interval=3)
    return OmniState(OmniConfig(**{**base, **kw}))


def tiny_flux_case(single_layers: int = 1):
    """``(model, make_inputs, latents)`` of the tiny FLUX the loop tests denoise: 64 image tokens (an 8 x 8
    grid, packed: no conv) + 16 text tokens = 5 blocks of 16 (1 text, 4 vision), 1 double-stream block and
    ``single_layers`` single-stream blocks, 2 heads of 16."""
    from omni_compile.quality import initial_latents, tiny_flux

    model, make_inputs, info = tiny_flux(side=8, text=16, layers=1, single_layers=single_layers, heads=2, head_dim=16)
    return model, make_inputs, initial_latents(info)


def compile_with(model, state):
    return torch.compile(model, backend="flashomni", options={"state": state})
