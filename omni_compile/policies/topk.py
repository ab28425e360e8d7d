"""``topk`` — dynamic per-query-block selection of key blocks from pooled scores (the idea behind
SpargeAttn's sparse prediction: block-mean-pooled q/k, softmax over key blocks, keep the blocks that carry
the top cumulative mass — "Top-Cdf"), recomputed at every update step. Nothing is reused.

Per computed vision query block (text query blocks keep every key) and per (batch item, head):

* ``mass`` mode (default): vision key blocks are skipped, smallest pooled score first, while the skipped
  mass stays ``<= 1 - mass``: the kept blocks (text blocks included, they are never skipped) carry
  ``>= mass`` of the row's pooled score (rows sum to 1). The row's largest block is always kept.
* ``k`` mode: the ``k`` vision key blocks with the largest pooled score are kept (ties: lower index first)
  and every text key block.

Not implemented from SpargeAttn: its self-similarity check (blocks whose tokens are not alike are always
computed in full, since a pooled mean misrepresents them) and its second, in-kernel warp-level filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from omni_compile.ops.flashomni_policy import skip_tail

from .base import BasePolicy, Bits, PolicyInput, no_bits, runs_own_call


@dataclass(frozen=True)
class TopK(BasePolicy):
    """Keep, per computed vision query block, the key blocks with the most pooled attention."""

    mass: float = 0.9
    """Pooled score mass the kept key blocks carry at least (0 < mass <= 1). Lower skips more (faster) but
    drops more real attention (less exact); 1 skips nothing. Ignored when ``k`` is set."""
    k: Optional[int] = None
    """Keep exactly the ``k`` highest-scoring vision key blocks per row (plus all text blocks): a fixed
    budget (predictable speed) whatever the attention's shape — peaked rows waste it, flat rows lose mass."""

    name = "topk"
    needs_scores = True

    def __post_init__(self):
        from .base import _check_fraction

        _check_fraction("TopK", "mass", self.mass, lo_open=True)
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1):
            raise ValueError(f"TopK.k must be None or an integer, 1 or more, got {self.k!r}")

    def __call__(self, inp: PolicyInput, config) -> Bits:
        reuse, _ = no_bits(inp)
        rows = (~inp.q_text).view(1, 1, -1).expand_as(reuse)
        if self.k is None:
            return reuse, skip_tail(inp.scores, rows, inp.kv_text, 1.0 - float(self.mass))
        nK = inp.num_kv_blocks
        cand = ~inp.kv_text
        s = torch.where(cand.view(1, 1, 1, nK), inp.scores.float(), -float("inf"))
        order = torch.sort(-s, dim=-1, stable=True).indices  # descending, ties by index
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nK, device=inp.device).expand_as(order))
        skip = (rank >= self.k) & cand.view(1, 1, 1, nK) & rows.unsqueeze(-1)
        return reuse, skip

    def symbols(self, inp: PolicyInput, config, allow_reuse: bool = True):
        """``mass`` mode through ``ops.flashomni_symbols``' skip kernel (the same tail with budget ``1 -
        mass`` and nothing reused): bits and key lists in one launch. None in ``k`` mode and for a subclass
        that overrides ``__call__``."""
        if self.k is not None or not runs_own_call(self, TopK):
            return None
        from omni_compile.ops.flashomni_policy import MODES

        from .flashomni import fused_symbols

        return fused_symbols(inp, MODES["cross"], 0.0, 1.0 - float(self.mass), allow_reuse)
