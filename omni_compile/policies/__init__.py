"""Sparsity policies: on update steps, turn what a site knows into reuse and skip bits (docs/policies.md).

One file per strategy; this package registers them by name::

    OmniConfig(policy="window")                          # a registered name, default knobs
    OmniConfig(policy=Window(size=(1, 8, 8)))            # an object with its knobs
    OmniConfig(policy=("window", "flashomni"))           # OR of bits (Compose)
    register_policy("mine", MyPolicy())                  # a user policy (protocol: base.Policy)

| name | strategy | reads |
|---|---|---|
| ``flashomni`` | the paper's caching + skipping (:mod:`.flashomni`) | pooled scores |
| ``dense`` | nothing sparse (:mod:`.dense`) | — |
| ``fixed`` | content-blind tiles for benchmarks (:mod:`.fixed`) | — |
| ``window`` | spatio-temporal window skipping (:mod:`.window`) | token layout |
| ``topk`` | per-row top-mass key blocks (:mod:`.topk`) | pooled scores |
| ``broadcast`` | whole-site reuse (:mod:`.broadcast`) | — |
| ``taylorseer`` | least-changing blocks reused (:mod:`.taylorseer`) | feature change |
"""

__all__ = [
    "POLICIES", "BasePolicy", "Bits", "Broadcast", "Compose", "Dense", "Fixed", "FlashOmni", "Policy",
    "PolicyFallback", "PolicyInput", "TaylorSeer", "TokenLayout", "TopK", "Window", "block_means",
    "block_text_mask", "check_policy", "dense", "feature_change", "finalize", "fixed", "flashomni",
    "keep_one_key", "needs_scores", "no_bits", "policy_name", "policy_symbols", "register_policy",
    "resolve_policy", "run_policy", "window_keep",
]

from .base import (POLICIES, BasePolicy, Bits, Compose, Policy, PolicyFallback, PolicyInput, TokenLayout,
                   block_means, block_text_mask, check_policy, feature_change, finalize, keep_one_key, no_bits,
                   policy_name, policy_symbols, register_policy, resolve_policy, run_policy)
from .broadcast import Broadcast
from .dense import Dense, dense
from .fixed import Fixed, fixed
from .flashomni import FlashOmni, flashomni
from .taylorseer import TaylorSeer
from .topk import TopK
from .window import Window, window_keep

for _name, _obj in (("flashomni", FlashOmni()), ("dense", Dense()), ("fixed", Fixed()), ("window", Window()),
                    ("topk", TopK()), ("broadcast", Broadcast()), ("taylorseer", TaylorSeer())):
    register_policy(_name, _obj, replace=True)
del _name, _obj


def needs_scores(spec) -> bool:
    return resolve_policy(spec).needs_scores
