"""``fixed`` — content-blind tiles for benchmarks: a controlled density, the same tiles every update and
every run (``Fixed(reuse=..., skip=..., seed=...)``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BasePolicy, Bits, PolicyInput, _check_fraction, runs_own_call, symbols_from_call


_MEMO: dict = {}
_MEMO_MAX = 4096
_SYMBOLS: dict = {}  # site id -> (key, Symbols, the layout tensors the key's ids name)


def fixed(inp: PolicyInput, reuse: float = 0.5, skip: float = 0.5, seed: int = 0) -> Bits:
    """Content-blind tiles from ``seed`` and the site id: per (batch item, head), ``round(reuse *
    n_vision_q)`` vision query blocks reused; per computed vision query block, ``round(skip * n_vision_kv)``
    vision key blocks skipped (at least one key block kept).

    The bits depend on nothing but these arguments, so they are drawn once and memoised: drawing them on
    the CPU costs ~0.1 s per site at 33K tokens (256 x 256 blocks x 24 heads), which made every update
    step of a HunyuanVideo-size loop seconds slower than a dense step."""
    key = _key(inp, reuse, skip, seed)
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        hit = _MEMO[key] = (_draw(inp, reuse, skip, seed), inp.q_text, inp.kv_text)
    return hit[0]


def _key(inp: PolicyInput, reuse: float, skip: float, seed: int) -> tuple:
    # the layout tensors are cached per site by the runtime, so their identity stands for their content
    # (reading them back would be two device-to-host copies per site and update); the memo keeps them
    # alive so an id is never reused for another tensor while its entry exists
    return (int(seed), int(inp.site_id), inp.batch, inp.heads, inp.head_offset, inp.heads_total, float(reuse),
            float(skip), id(inp.q_text), id(inp.kv_text))


def _draw(inp: PolicyInput, reuse_fraction: float, skip_fraction: float, seed: int) -> Bits:
    """Drawn for every head of the site and cut to this call's (``head_offset``: a rank under Ulysses
    context parallelism attends some of them), so ranks draw as one process would."""
    B, H = inp.batch, max(inp.heads_total, inp.heads)
    h0, h1 = inp.head_offset, inp.head_offset + inp.heads
    nQ, nK = inp.q_text.numel(), inp.kv_text.numel()
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(inp.site_id))
    q_text, kv_text = inp.q_text.cpu(), inp.kv_text.cpu()
    vis_q = ~q_text
    n_vq = int(vis_q.sum())
    k_reuse = int(round(float(reuse_fraction) * n_vq))
    r = torch.rand(B, H, nQ, generator=g).masked_fill(q_text, float("inf"))
    rank = r.argsort(-1).argsort(-1)
    reuse = (rank < k_reuse) & vis_q
    cand = ~kv_text
    n_ck = int(cand.sum())
    k_skip = int(round(float(skip_fraction) * n_ck))
    if n_ck == nK:
        k_skip = min(k_skip, nK - 1)
    rk = torch.rand(B, H, nQ, nK, generator=g).masked_fill(kv_text, float("inf"))
    skip = (rk.argsort(-1).argsort(-1) < k_skip) & cand
    skip &= (~reuse & vis_q).unsqueeze(-1)
    dev = inp.q_text.device
    return reuse[:, h0:h1].to(dev), skip[:, h0:h1].to(dev)


@dataclass(frozen=True)
class Fixed(BasePolicy):
    """Content-blind tiles at a controlled density (benchmarks): ``OmniConfig(policy=Fixed(reuse=0.5,
    skip=0.8))``; ``policy="fixed"`` is this with its defaults. Worse quality than ``FlashOmni`` at the same
    density (it ignores the content)."""

    reuse: float = 0.5
    """Fraction of each (batch item, head)'s vision query blocks reused on dispatch steps (text query blocks
    are never reused). Number from 0 to 1."""
    skip: float = 0.5
    """Fraction of each computed vision query block's vision key blocks skipped (text key blocks and at
    least one key block are always kept). Number from 0 to 1."""
    seed: int = 0
    """Seed of the tile choice (with the site id), so a benchmark sees the same tiles every run."""

    name = "fixed"

    def __post_init__(self):
        _check_fraction("Fixed", "reuse", self.reuse)
        _check_fraction("Fixed", "skip", self.skip)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"Fixed.seed must be an integer, 0 or more, got {self.seed!r}")

    def __call__(self, inp: PolicyInput, config) -> Bits:
        return fixed(inp, self.reuse, self.skip, self.seed)

    def symbols(self, inp: PolicyInput, config, allow_reuse: bool = True):
        """The same ``Symbols`` object on every update of a site (its bits never change): after the first,
        no finalize, no packing, and no schedule decoding (the runtime's prefetch finds them decoded on the
        object it already has). Symbols are never modified after they are made, so sharing one is safe.
        One object is kept per site id, the one its stream holds anyway; a site whose streams differ in
        shape or ``allow_reuse`` alternates and rebuilds (as without the memo). None for a subclass that
        overrides ``__call__``."""
        if not runs_own_call(self, Fixed):
            return None

        key = (bool(allow_reuse), inp.block_q, inp.block_kv, inp.seq_q, inp.seq_kv) + _key(inp, self.reuse, self.skip,
                                                                                          self.seed)
        hit = _SYMBOLS.get(inp.site_id)
        if hit is None or hit[0] != key:
            # one entry per site: a new config or shape frees the old symbols (at HunyuanVideo size a site's
            # key lists alone are ~7 MB) instead of keeping every config's alive
            sym = symbols_from_call(self, inp, config, allow_reuse)
            hit = _SYMBOLS[inp.site_id] = (key, sym, inp.q_text, inp.kv_text)
        return hit[1]
