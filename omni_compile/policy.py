"""Compatibility module: the policies moved to :mod:`omni_compile.policies` (one file per strategy).

``POLICIES`` maps registered names to policy objects (callable as ``policy(inp, config)``);
``NEEDS_SCORES`` is the set of registered names whose policy reads pooled scores.
"""

from __future__ import annotations

from .policies import (POLICIES, Bits, PolicyInput, block_text_mask, contribution, dense, fixed, flashomni,
                       guidance, low_tail, skip_tail)

__all__ = ["POLICIES", "NEEDS_SCORES", "Bits", "PolicyInput", "block_text_mask", "contribution", "dense", "fixed",
           "flashomni", "guidance", "low_tail", "skip_tail"]


class _NeedsScores:
    """Live view: the registered names whose policy declares ``needs_scores``."""

    def __contains__(self, name) -> bool:
        p = POLICIES.get(name) if isinstance(name, str) else None
        return bool(p is not None and p.needs_scores)

    def __iter__(self):
        return iter([n for n, p in POLICIES.items() if p.needs_scores])

    def __repr__(self) -> str:
        return repr(set(self))


NEEDS_SCORES = _NeedsScores()
