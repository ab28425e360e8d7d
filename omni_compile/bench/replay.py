"""Recorded-density replay: what a data-dependent setting did on the learned zoo model, replayed at full
size with random weights.

A full-size model with random weights has nearly uniform attention (docs/zoo.md), so a content-adaptive
policy run on it makes symbols unlike the ones it would make on a trained model. The quality table
(``omni_compile.bench.quality``) records, for every setting, a :class:`omni_compile.tune.Trace` of the
learned model: per site and step the reused share of vision query blocks, the skipped share of vision key
blocks and whether the site's block ran. :class:`Replay` is a policy that, on each update of a full-size
site, draws content-blind bits at the figures of the traced site at the same depth in the traced update
cycle at the same point of the loop; :func:`replay_config` turns a table row into the ``OmniConfig``
fields of its replay, block caching included (as ``FixedBlocks`` at the traced share of cached
block-steps, whatever the rule: blocks of FLUX.1 and HunyuanVideo cost within 5 % of each other, so the
same share is the same work, whichever blocks are picked).
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from omni_compile import ComputedShare, FixedBlocks, OmniConfig, ResidualChange
from omni_compile import policies
from omni_compile.policies import BasePolicy, PolicyInput
from omni_compile.tune import SiteStep, Trace


class Replay(BasePolicy):
    """Content-blind symbols at a traced setting's figures (module docstring). ``sites``: the number of
    attention sites of the model it runs on (site ``i`` of ``sites`` takes the traced site at the same
    depth); ``steps``: that loop's length (an update at step ``s`` takes the traced cycle whose update is
    nearest to ``s / steps`` of its own loop). Per (batch item, head) ``round(reuse · n_vision_q)`` vision
    query blocks are reused and per computed vision row ``round(skip · n_vision_kv)`` vision key blocks
    skipped (one key block always kept), drawn on the device from ``seed``, the site and the cycle."""

    name = "replay"

    def __init__(self, trace: Trace, steps: int, sites: Optional[int] = None, seed: int = 0,
                 needs_scores: bool = True, needs_features: bool = False, source: str = ""):
        self.trace = trace
        self.steps = int(steps)
        self.sites = sites
        self.seed = int(seed)
        self.needs_scores = bool(needs_scores)  # pay for what the replayed policy reads on an update
        self.needs_features = bool(needs_features)
        self.source = source
        self._cycles = trace.cycles()
        self._memo: dict = {}

    def bound(self, sites: int) -> "Replay":
        """The same replay for a model with ``sites`` attention sites."""
        return Replay(self.trace, self.steps, sites, self.seed, self.needs_scores, self.needs_features, self.source)

    def __repr__(self) -> str:
        return f"Replay({self.source or 'trace'}, steps={self.steps}, sites={self.sites})"

    def figures(self, site_id: int, step: int) -> SiteStep:
        """The traced figures a site takes at the update of ``step``."""
        if not self._cycles:
            return SiteStep()
        n_src = len(self.trace.sites)
        n_dst = self.sites or n_src
        src = min(n_src - 1, int((site_id + 0.5) * n_src / n_dst))
        where = step / self.steps
        c = min(range(len(self._cycles)), key=lambda j: abs(self._cycles[j][0] / self.trace.steps - where))
        return self._cycles[c][1][src]

    def __call__(self, inp: PolicyInput, config):
        fig = self.figures(inp.site_id, inp.step)
        return draw(inp, fig.reuse_vision, fig.skip_vision, self.seed * 1_000_003 + inp.site_id * 1009 + inp.step)


def draw(inp: PolicyInput, reuse: float, skip: float, seed: int):
    """``(reuse [B, H, nQ], skip [B, H, nQ, nK])`` bits of exactly ``round(reuse · n_vision_q)`` reused vision
    query blocks per (batch item, head) and ``round(skip · n_vision_kv)`` skipped vision key blocks per
    computed vision row (at least one key block kept), random from ``seed``, made on the device of the
    site (no host read)."""
    dev = inp.q_text.device
    B, H, nQ, nK = inp.batch, inp.heads, inp.num_q_blocks, inp.num_kv_blocks
    g = torch.Generator(device=dev).manual_seed(int(seed))
    n_vq = nQ - inp.text_q_blocks
    n_vk = nK - (inp.text_kv_blocks if inp.text_kv_blocks is not None else int(inp.kv_text.sum()))
    vis_q = ~inp.q_text
    r = torch.rand(B, H, nQ, generator=g, device=dev).masked_fill(inp.q_text, 2.0)
    reused = (r.argsort(-1).argsort(-1) < int(round(reuse * n_vq))) & vis_q
    k_skip = int(round(skip * n_vk))
    if n_vk == nK:
        k_skip = min(k_skip, nK - 1)
    rk = torch.rand(B, H, nQ, nK, generator=g, device=dev).masked_fill(inp.kv_text, 2.0)
    skipped = (rk.argsort(-1).argsort(-1) < k_skip) & ~inp.kv_text
    skipped &= (~reused & vis_q).unsqueeze(-1)
    return reused, skipped


def _env() -> dict:
    env = {k: getattr(policies, k) for k in policies.__all__}
    env.update(FixedBlocks=FixedBlocks, ComputedShare=ComputedShare, ResidualChange=ResidualChange)
    return env


def load_rows(path: str) -> dict:
    """``{setting name: row}`` of a quality table's JSON (``quality.json`` of ``omni_compile.bench.quality``)."""
    with open(path) as f:
        res = json.load(f)
    return {r["setting"]: r for r in res["rows"]}


def replay_config(row: dict, steps: int, fields=("interval", "warmup", "taylor_order", "final_dense")) -> dict:
    """``OmniConfig`` fields that replay a quality-table ``row`` on a ``steps``-step loop: its schedule
    fields; its policy itself when it reads nothing of the content (``dense``, ``fixed``, ``broadcast``),
    else a :class:`Replay` of its trace (bind the site count with :meth:`Replay.bound` after compiling);
    block caching as ``FixedBlocks`` at the traced share of cached block-steps."""
    cfg = row.get("config") or {}
    if row.get("config") is not None and not cfg:  # the "default" row: OmniConfig() as it comes
        base = OmniConfig()
        cfg = dict(policy=base.policy, block_cache=repr(base.block_cache))
    env = _env()

    def value(v):
        return eval(v, {"__builtins__": {}}, env) if isinstance(v, str) and "(" in v else v

    out = {k: cfg[k] for k in fields if k in cfg}
    pol = policies.resolve_policy(value(cfg.get("policy", "dense")))
    trace = Trace.from_dict(row["trace"]) if row.get("trace") else None
    if pol.name in ("dense", "fixed", "broadcast") or trace is None:
        out["policy"] = pol
    else:
        out["policy"] = Replay(trace, steps, needs_scores=pol.needs_scores, needs_features=pol.needs_features,
                               source=row["setting"])
    share = float(row.get("cached_share", 0.0))
    # the traced share, also for FixedBlocks: on the zoo model's 5 blocks FixedBlocks(0.5) caches 2 (0.4)
    out["block_cache"] = FixedBlocks(round(share, 3)) if value(cfg.get("block_cache")) is not None and share > 0 else None
    if out.get("final_dense"):
        out["steps"] = steps
    OmniConfig(**out)  # validate
    return out
