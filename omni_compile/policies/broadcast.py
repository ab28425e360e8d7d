"""``broadcast`` — whole-site reuse across steps (the idea behind pyramid attention broadcast, PAB): on
dispatch steps every vision query block of a chosen site is reused — its attention output is the cached
one, forecast by the Taylor terms — and nothing is skipped. Text query blocks are always computed (their
keys, vision included, are projected fresh every step). Reads no scores: the cheapest update.

PAB's pyramid — cross-attention broadcast over longer ranges than temporal, temporal longer than spatial —
is per-site intervals: ``OmniConfig(policy="broadcast", overrides={"*attn2": {"interval": 8}})``. Which
sites broadcast: ``kinds`` here, or per-site overrides (``{"transformer_blocks.0.*": {"policy": "dense"}}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from .base import BasePolicy, Bits, PolicyInput, no_bits

_KINDS = ("joint", "self", "cross")


@dataclass(frozen=True)
class Broadcast(BasePolicy):
    """Reuse every vision query block of the chosen site kinds between updates."""

    kinds: Tuple[str, ...] = _KINDS
    """Site kinds that broadcast (``"joint"``, ``"self"``, ``"cross"``); the others run with all tiles
    computed. Fewer kinds: better quality, less saved. PAB found cross-attention the most stable across
    steps, then temporal, then spatial attention."""

    name = "broadcast"

    def __post_init__(self):
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        bad = [k for k in kinds if k not in _KINDS]
        if bad or not kinds:
            raise ValueError(f"Broadcast.kinds must be a non-empty subset of {_KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)

    def __call__(self, inp: PolicyInput, config) -> Bits:
        reuse, skip = no_bits(inp)
        if inp.kind in self.kinds:
            reuse = reuse | (~inp.q_text).view(1, 1, -1)
        return reuse, skip
