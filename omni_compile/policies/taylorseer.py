"""``taylorseer`` — token-block caching driven by feature change, with Taylor forecasting (the idea behind
TaylorSeer: features change smoothly across steps, so cached features extrapolated with finite-difference
Taylor terms stand in for recomputation). No key block is skipped.

The runtime keeps, for sites under a policy that declares ``needs_features``, the block means of the
attention output at the last two full steps (the last warm-up step and every update) and hands the
relative change per step ``‖m_now − m_prev‖ / ‖m_prev‖ / Δsteps`` per (batch item, head, query block) to
the policy (``PolicyInput.change``). The vision query blocks that changed least are reused on the
following dispatch steps, and their outputs forecast (``OmniConfig.taylor_order``; the same Taylor terms
as every policy, folded into GEMM-O's cache bias). Text query blocks are always computed. With fewer than
two full steps observed (``warmup=1``) nothing is reused at that update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import BasePolicy, Bits, PolicyInput, no_bits


@dataclass(frozen=True)
class TaylorSeer(BasePolicy):
    """Reuse the vision query blocks (per head) whose output changed least between the last full steps."""

    fraction: Optional[float] = 0.5
    """Share of each (batch item, head)'s vision query blocks reused, least change first (rounded). Higher is
    faster but forecasts blocks that move more (lower quality). Ignored when ``threshold`` is set."""
    threshold: Optional[float] = None
    """Reuse the vision blocks whose relative change per step is ``<= threshold`` instead (e.g. 0.02):
    adapts the amount of reuse to how fast the features move — few blocks early, many late — at the cost
    of an unpredictable speed-up."""

    name = "taylorseer"
    needs_features = True

    def __post_init__(self):
        from .base import _check_fraction

        if self.threshold is None:
            _check_fraction("TaylorSeer", "fraction", self.fraction)
        elif not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or self.threshold < 0:
            raise ValueError(f"TaylorSeer.threshold must be None or a number, 0 or more, got {self.threshold!r}")

    def __call__(self, inp: PolicyInput, config) -> Bits:
        reuse, skip = no_bits(inp)
        if inp.change is None:
            inp.notes.append("taylorseer: no feature change observed yet (one full step so far): nothing reused")
            return reuse, skip
        vis = ~inp.q_text
        change = inp.change.float()
        if self.threshold is not None:
            return (change <= float(self.threshold)) & vis.view(1, 1, -1), skip
        # the host count, not int(vis.sum()): reading a device tensor back would stall the pipelined loop
        # once per site and update
        n_vis = inp.q_text.numel() - int(inp.text_q_blocks)
        k = int(round(float(self.fraction) * n_vis))
        if k == 0:
            return reuse, skip
        key = torch.where(vis.view(1, 1, -1), change, float("inf"))
        order = torch.sort(key, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return (rank < k) & vis.view(1, 1, -1), skip
