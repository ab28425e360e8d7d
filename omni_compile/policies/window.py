"""``window`` — static spatial / spatio-temporal locality (the idea behind sliding-tile attention, STA,
and radial attention): each vision query block keeps only the key blocks that hold a token within a
(frame, row, column) window of one of its tokens, plus every text key block. Nothing is reused.

Exact at token level: a vision key block is kept iff some vision query token of the block and some vision
key token of the key block satisfy ``|Δframe| <= frames // 2``, ``|Δrow| <= rows // 2`` and
``|Δcol| <= cols // 2`` (``size = (frames, rows, cols)``). Computed on boxes, not tokens
(:func:`window_keep`). The bits depend only on the layout, so they are built once per shape and cached.

Tokens are in the model's order (row-major frames × rows × columns): a block of 128 tokens on a 64-wide
grid is two full rows, so its window spans every column; sliding-tile attention reorders tokens into 3D
tiles to get tighter windows, which a torch.compile backend cannot do without changing the model's
layout (noted in docs/policies.md). Radial attention's window shrinking with temporal distance is not
implemented. Needs the token layout (inferred by the passes for conv patch embeddings, else
``OmniConfig(token_layout=...)``): without it the site falls back to dense with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .base import BasePolicy, Bits, PolicyFallback, PolicyInput, TokenLayout, no_bits

_CACHE: dict = {}


def _boxes(a: int, b: int, dims) -> list:
    """The row-major index range ``[a, b)`` over a grid of ``dims`` as disjoint boxes, each a tuple of
    inclusive ``(lo, hi)`` per axis: at most ``2·len(dims) − 1`` of them (partial row, full rows, …)."""
    if a >= b:
        return []
    if len(dims) == 1:
        return [((a, b - 1),)]
    inner = 1
    for d in dims[1:]:
        inner *= d
    fa, ra = divmod(a, inner)
    fb, rb = divmod(b, inner)
    if fa == fb:
        return [((fa, fa),) + x for x in _boxes(ra, rb, dims[1:])]
    out = []
    if ra:
        out += [((fa, fa),) + x for x in _boxes(ra, inner, dims[1:])]
        fa += 1
    if fa < fb:
        out.append(((fa, fb - 1),) + tuple((0, d - 1) for d in dims[1:]))
    if rb:
        out += [((fb, fb),) + x for x in _boxes(0, rb, dims[1:])]
    return out


def _block_boxes(start: int, n: int, seq: int, block: int, dims) -> tuple:
    """``(lo [nB, 5, 3], hi [nB, 5, 3], valid [nB, 5])``: each block's vision tokens as grid boxes."""
    nB = -(-seq // block)
    lo = torch.zeros(nB, 5, 3, dtype=torch.long)
    hi = torch.full((nB, 5, 3), -1, dtype=torch.long)
    valid = torch.zeros(nB, 5, dtype=torch.bool)
    for j in range(nB):
        a, b = max(start, j * block) - start, min(start + n, (j + 1) * block) - start
        for i, box in enumerate(_boxes(a, b, dims)):
            lo[j, i] = torch.tensor([x[0] for x in box])
            hi[j, i] = torch.tensor([x[1] for x in box])
            valid[j, i] = True
    return lo, hi, valid


def window_keep(layout: TokenLayout, size: Tuple[int, int, int], seq_q: int, seq_kv: int, block_q: int,
                block_kv: int) -> torch.Tensor:
    """``[nQ, nK]`` bool (CPU): key block ``j`` holds a vision token within the window of a vision token of
    query block ``i`` (blocks without vision tokens stay False).

    A block's tokens form a row-major range of the grid, which splits into at most five boxes (partial row,
    full rows, full frames, …); a pair of boxes holds a token pair within the window iff on every axis their
    intervals are at most ``extent // 2`` apart. So the test is exact and costs ``nQ × nK × 25`` box pairs
    — no per-token mask (``S × S`` would be 10^10 at HunyuanVideo size)."""
    key = (layout, tuple(size), seq_q, seq_kv, block_q, block_kv)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    dims = (layout.frames, layout.height, layout.width)
    n = layout.tokens
    kv_start = layout.start if layout.kv_start is None else layout.kv_start
    qlo, qhi, qv = _block_boxes(layout.start, n, seq_q, block_q, dims)
    klo, khi, kv = _block_boxes(kv_start, n, seq_kv, block_kv, dims)
    half = torch.tensor([max(0, int(s) // 2) for s in size])
    near = torch.ones(qlo.shape[0], 5, klo.shape[0], 5, dtype=torch.bool)
    for ax in range(3):
        ql, qh = qlo[:, :, ax].view(-1, 5, 1, 1), qhi[:, :, ax].view(-1, 5, 1, 1)
        kl, kh = klo[:, :, ax].view(1, 1, -1, 5), khi[:, :, ax].view(1, 1, -1, 5)
        near &= (ql - half[ax] <= kh) & (kl <= qh + half[ax])
    near &= qv.view(-1, 5, 1, 1) & kv.view(1, 1, -1, 5)
    keep = near.any(3).any(1)
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = keep
    return keep


@dataclass(frozen=True)
class Window(BasePolicy):
    """Keep, per vision query block, the key blocks within a (frames, rows, cols) window, and all text."""

    size: Tuple[int, int, int] = (3, 16, 16)
    """Window extent in tokens (frames, rows, cols); a key token is inside when ``|Δ| <= extent // 2`` on
    every axis. Smaller windows skip more (faster) but cut long-range attention (global layout, far
    frames): quality drops first on content that needs it. Images use ``frames`` 1 (or any: one frame).
    Two numbers ``(rows, cols)`` mean one frame."""

    name = "window"

    def __post_init__(self):
        size = tuple(self.size)
        if len(size) == 2:
            size = (1,) + size
        if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
            raise ValueError(f"Window.size must be (frames, rows, cols) or (rows, cols), positive ints, got {self.size!r}")
        object.__setattr__(self, "size", size)

    def __call__(self, inp: PolicyInput, config) -> Bits:
        reuse, skip = no_bits(inp)
        keys_all_text = (inp.text_kv_blocks == inp.num_kv_blocks if inp.text_kv_blocks is not None
                         else bool(inp.kv_text.all()))  # the host count where the runtime gave it: no sync
        if inp.kind == "cross" or keys_all_text:
            return reuse, skip  # keys are all text: nothing to skip
        if inp.layout is None:
            raise PolicyFallback(f"window needs the token layout: {inp.layout_reason}")
        from omni_compile.ops._common import device_constant

        args = (inp.layout, self.size, inp.seq_q, inp.seq_kv, inp.block_q, inp.block_kv)
        # kept on the device per shape: a .to(device) per call was a host-to-device copy per site and update
        keep = device_constant(("window_keep", *args), inp.device, lambda: window_keep(*args))
        rows = ~inp.q_text.view(-1, 1)
        s = ~keep & rows & ~inp.kv_text.view(1, -1)
        return reuse, skip | s.view(1, 1, *s.shape)
