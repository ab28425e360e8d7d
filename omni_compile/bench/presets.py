"""Each shipped strategy as an ``OmniConfig`` at a given size: what the quality table and the GPU
benchmark run (``strategy_configs(token_layout=..., block=128)``), and a small example site for the docs."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from omni_compile.config import OmniConfig
from omni_compile.ops import Symbols
from omni_compile.policies import (Broadcast, Compose, FlashOmni, PolicyInput, TaylorSeer, TokenLayout, TopK, Window,
                                   block_text_mask, run_policy)

#: Strategy names in the order of the comparison table.
STRATEGIES = ("dense", "flashomni", "window", "topk", "broadcast", "taylorseer", "window+flashomni")


def _window_size(token_layout: Optional[Tuple[int, ...]]) -> Tuple[int, int, int]:
    """Half of each grid axis (at least 1): a key token is kept within a quarter of the grid each way."""
    if token_layout is None:
        return (3, 16, 16)
    f, h, w = (1,) * (3 - len(token_layout)) + tuple(token_layout)
    return (max(1, f // 2) | 1, max(1, h // 2), max(1, w // 2))


def strategy_policy(name: str, token_layout: Optional[Tuple[int, ...]] = None):
    """The policy object (or name) of strategy ``name`` (one of :data:`STRATEGIES`) with the table's knobs."""
    win = Window(size=_window_size(token_layout))
    table = {
        "dense": "dense",
        "flashomni": FlashOmni(),
        "window": win,
        "topk": TopK(mass=0.9),
        "broadcast": Broadcast(),
        "taylorseer": TaylorSeer(fraction=0.5),
        # window skipping + flashomni caching (its own skipping off): the composition shown in the docs
        "window+flashomni": Compose(win, FlashOmni(tau_kv=0.0)),
    }
    if name not in table:
        raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")
    return table[name]


def strategy_config(name: str, token_layout: Optional[Tuple[int, ...]] = None, block: int = 128, **fields):
    """``OmniConfig`` for strategy ``name`` with blocks of ``block`` rows, ``token_layout`` (frames, height,
    width of the vision tokens; needed by ``window`` where the passes cannot infer it, e.g. FLUX) and any
    further ``OmniConfig`` fields (``interval``, ``warmup``, ``use_inductor`` …)."""
    fields.setdefault("block_cache", None)  # a strategy is compared on its attention sites alone
    return OmniConfig(policy=strategy_policy(name, token_layout), block_q=block, block_kv=block,
                      token_layout=tuple(token_layout) if token_layout is not None else None, **fields)


def strategy_configs(token_layout: Optional[Tuple[int, ...]] = None, block: int = 128, names=STRATEGIES,
                     **fields) -> Dict[str, object]:
    """``{name: OmniConfig}`` for every strategy in ``names`` (:func:`strategy_config`)."""
    return {n: strategy_config(n, token_layout, block, **fields) for n in names}


def example_input(seed: int = 0):
    """A small joint site for docs and tests: 16 text tokens then a 12 x 16 grid of vision tokens (208
    tokens, blocks of 16: 1 text + 12 vision query blocks of one grid row each), one head; pooled scores that fall off with the distance between blocks (plus noise, attention to text
    blocks strong), and a feature change that grows towards the bottom rows."""
    seq, text, block = 16 + 12 * 16, 16, 16
    segs = [("text", 0, text), ("vision", text, seq)]
    q_text = block_text_mask(segs, seq, block)
    n = q_text.numel()
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n).view(-1, 1).float()
    j = torch.arange(n).view(1, -1).float()
    logits = -0.9 * (i - j).abs() + 0.8 * torch.randn(n, n, generator=g)
    logits[:, 0] += 2.0  # text keys matter to everyone
    logits[0, :] = 0.3 * torch.randn(n, generator=g)  # text queries spread
    P = torch.softmax(logits, -1).view(1, 1, n, n)
    change = (0.01 + 0.02 * torch.rand(1, 1, n, generator=g) + 0.03 * torch.linspace(0, 1, n)).clamp_min(0)
    return PolicyInput(scores=P, scores_square=P, kind="joint", q_text=q_text, kv_text=q_text, batch=1, heads=1,
                       seq_q=seq, seq_kv=seq, block_q=block, block_kv=block, text_q_blocks=1, site_name="example",
                       layout=TokenLayout(1, 12, 16, text), change=change)


def example_symbols(name: str, config=None):
    """``Symbols`` of strategy ``name`` (a :data:`STRATEGIES` entry) on :func:`example_input`, as the
    runtime builds them (``run_policy``): ``print(example_symbols("window"))`` shows the grid."""
    inp = example_input()
    cfg = config or OmniConfig(block_q=16, block_kv=16)
    pol = strategy_policy(name, token_layout=(1, 6, 6))  # window (1, 3, 3): ±1 row and column
    reuse, skip = run_policy(pol, inp, cfg)
    return Symbols.from_dense(reuse, skip, 16, 16, inp.seq_q, inp.seq_kv)
