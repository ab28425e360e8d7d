"""``OmniConfig``: every knob of the ``flashomni`` backend, each with its trade-off."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Policies the runtime implements today. Issue 4 adds "flashomni" and "fixed".
POLICIES = ("dense",)


@dataclass
class OmniConfig:
    policy: str = "dense"
    """How symbols are chosen. ``"dense"``: every tile computed, no key block skipped — the rewritten
    graph then equals the model (use it for equivalence tests and as the quality reference); costs the
    full attention and projections every step. Valid: ``"dense"``."""

    block_q: int = 128
    """Query rows per symbol block. Larger blocks mean fewer symbols and better kernel efficiency, but
    coarser caching decisions (a whole block of tokens is reused or computed together). Power of two,
    16 to 256."""

    block_kv: int = 128
    """Key rows per symbol block. Larger blocks skip work in bigger, more efficient chunks, but drop
    more useful keys with each skipped block. Power of two, 16 to 256."""

    use_inductor: bool = True
    """Compile the rewritten graph with Inductor (``compile_fx``) so everything around the sites is fused
    as with the default backend. ``False`` runs the rewritten FX graph as is: compiles in well under a
    second instead of 8–30 s on a small CPU, but runs unfused (for tests and debugging)."""

    attention: bool = True
    """Rewrite attention calls into the sparse attention op. Off leaves every site dense and untouched
    (then GEMM-Q/GEMM-O are off too, since their savings come from the attention symbols)."""

    gemm_q: bool = True
    """Rewrite q projections into GEMM-Q where the prologue is per-(token, head) local: reused tiles
    are not projected. Off computes q densely (slightly slower, identical output)."""

    gemm_o: bool = True
    """Rewrite output projections into GEMM-O: reduce only over computed heads and add a cache bias
    for the reused ones. Off keeps the dense projection; the runtime must then keep the attention
    output itself for reused tiles (more memory: one [B, S, H*D] cache per site instead of [B, S, C])."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"OmniConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"OmniConfig.{name} must be a power of two from 16 to 256, got {v!r}")
        for name in ("use_inductor", "attention", "gemm_q", "gemm_o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OmniConfig.{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "OmniConfig":
        return dataclasses.replace(self, **changes)
