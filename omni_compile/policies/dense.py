"""``dense`` — every tile computed, no key block skipped: the rewritten graph then equals the model. The
runtime does not even call it: a site whose effective policy is ``"dense"`` takes the dense path (vendor
kernels on CUDA). Use it for equivalence tests, as the quality reference, and per site through
``OmniConfig.overrides`` (e.g. dense first and last blocks)."""

from __future__ import annotations

from .base import BasePolicy, Bits, PolicyInput, no_bits


def dense(inp: PolicyInput, config) -> Bits:
    return no_bits(inp)


class Dense(BasePolicy):
    name = "dense"

    def __call__(self, inp: PolicyInput, config) -> Bits:
        return no_bits(inp)

    def __repr__(self) -> str:
        return "Dense()"

    def __eq__(self, other) -> bool:
        return isinstance(other, Dense)

    __hash__ = object.__hash__
