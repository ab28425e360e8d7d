"""What the runtime-loop and block-cache tests share: the state they start from and how they compile."""

from __future__ import annotations

import torch

from omni_compile import OmniConfig, OmniState

BLOCK = 16


def make_state(**kw) -> OmniState:
    """An FX-run (no Inductor) state with blocks of 16, warm-up 2 and interval 3, overridden by ``kw``."""
    base = dict(use_inductor=False, block_q=BLOCK, block_kv=BLOCK, warmup=2, interval=3)
    return OmniState(OmniConfig(**{**base, **kw}))


def compile_with(model, state):
    return torch.compile(model, backend="flashomni", options={"state": state})
